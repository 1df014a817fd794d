"""Training on a tiny Llama built from a config: train, save, reload, generate, evaluate, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraswap.adapters.base import load_base, resolve_base
from loraswap.adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, read_manifest, sha256_of
from loraswap.adapters.prompt import PROMPT_FORMAT_VERSION, build_example, prompt_ids
from loraswap.adapters.store import AdapterStore
from loraswap.adapters.validate import validate_adapter
from loraswap.train.artifact import save_adapter
from loraswap.train.batching import PadCollator
from loraswap.train.data import load_qa, split
from loraswap.train.evaluate import BASE, answer_nll, evaluate_adapters, greedy_answers
from loraswap.train.trainer import TrainConfig, _optimizer, attach_adapter, train_many

FAST = TrainConfig(max_steps=12, lr=5e-3, batch_size=4, save_steps=4, eval_examples=4, quant="none")


@pytest.fixture(scope="module")
def trained(tiny_base: Path, qa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store")
    train_many(str(tiny_base), str(qa_csv), ["symptoms", "treatment"], out, FAST, progress=False)
    return out


def test_prompt_is_masked_and_shared_with_serving(tiny_base: Path) -> None:
    tok = load_base(str(tiny_base), quant="none").tokenizer
    ex = build_example(tok, "What are the symptoms of carditis ?", "Fever  and\n\n\n cough.", max_len=200)
    assert ex is not None
    p = prompt_ids(tok, "What are the symptoms of carditis ?")
    assert ex.input_ids[: len(p)] == p  # training sees exactly the serving prompt
    assert ex.labels[: len(p)] == [-100] * len(p)  # loss only on the answer
    assert ex.labels[len(p) :] == ex.input_ids[len(p) :]
    assert ex.input_ids[-1] == tok.eos_token_id
    cut = build_example(tok, "What are the symptoms of carditis ?", "word " * 300, max_len=len(p) + 10)
    assert cut is not None and len(cut.input_ids) == len(p) + 10  # answer cut, prompt kept
    assert build_example(tok, "What are the symptoms of carditis ?", "x", max_len=len(p) + 3) is None


def test_collator_pads_to_a_multiple_of_eight_and_masks_the_padding() -> None:
    causal = PadCollator(pad_id=0)
    batch = causal([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5] * 9, "labels": [5] * 9}])
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert (causal.tokens, causal.slots) == (12, 32)
    seq2seq = PadCollator(pad_id=0, seq2seq=True)
    batch = seq2seq([{"input_ids": [5, 6], "labels": [7] * 10}])
    assert batch["input_ids"].shape == (1, 8) and batch["labels"].shape == (1, 16)  # labels padded to their own
    assert (seq2seq.tokens, seq2seq.slots) == (2 + 10, 8 + 16)


def test_a_failed_save_publishes_nothing(tiny_base: Path, tmp_path: Path) -> None:
    class Unsaveable:
        def save_pretrained(self, folder: str) -> None:
            (Path(folder) / WEIGHTS_FILE).write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_adapter(Unsaveable(), tmp_path, "symptoms", resolve_base(str(tiny_base)), [], "title")
    assert list(tmp_path.iterdir()) == []


def test_training_writes_a_complete_adapter(trained: Path, tiny_base: Path) -> None:
    ref = resolve_base(str(tiny_base))
    folder = trained / "symptoms"
    for f in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "loss.json", "loss.png"):
        assert (folder / f).is_file(), f
    m = read_manifest(folder)
    assert m.name == "symptoms" and m.qtype == "symptoms" and m.method == "lora"
    assert m.base_fingerprint == ref.fingerprint and m.base_id == ref.base_id
    assert m.prompt_format_version == PROMPT_FORMAT_VERSION
    assert (m.rank, m.alpha, m.target_modules) == (8, 32.0, ["q_proj", "v_proj"])
    assert m.weights_sha256 == sha256_of(folder / WEIGHTS_FILE)
    assert m.split_hash and m.data_source == "qa.csv"
    assert m.training["max_steps"] == 12 and m.training["steps"] == 12 and m.training["other_rows"] == 0.0
    losses = json.loads((folder / "loss.json").read_text())
    assert len(losses) == 12
    assert sum(x["loss"] for x in losses[-3:]) < sum(x["loss"] for x in losses[:3])
    assert m.metrics["nll"] < m.metrics["base_nll"]
    assert not (trained / ".work" / "symptoms").exists()  # checkpoints are cleaned up after publishing
    assert [p.name for p in trained.iterdir() if p.name.startswith(".tmp")] == []
    assert validate_adapter(folder, ref) == []
    # Nothing of this machine in the artifact: the base is named by id, PEFT's model card is dropped.
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == ref.base_id
    assert not (folder / "README.md").exists()
    for f in folder.iterdir():
        if f.suffix == ".json":
            assert str(tiny_base) not in f.read_text() and "/tmp" not in f.read_text(), f.name


def test_reload_and_generate_with_each_adapter(trained: Path, tiny_base: Path, qa_csv: Path) -> None:
    from peft import PeftModel

    base = load_base(str(tiny_base), quant="none")
    model = PeftModel.from_pretrained(base.model, str(trained / "symptoms"), adapter_name="symptoms")
    model.load_adapter(str(trained / "treatment"), adapter_name="treatment")
    model.eval()
    q = "What are the symptoms of carditis ?"
    ids = torch.tensor([prompt_ids(base.tokenizer, q)] * 2)
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, adapter_names=["symptoms", "treatment"])
    assert out.shape[1] > ids.shape[1]
    # The two adapters were trained on different answers and must not produce the same continuation.
    assert not torch.equal(out[0], out[1])
    assert greedy_answers(model, base.tokenizer, [q], max_new_tokens=4)[0] != ""


def test_evaluation_scores_base_and_adapters(trained: Path, tiny_base: Path, qa_csv: Path) -> None:
    rows = load_qa(str(qa_csv))
    store = AdapterStore(trained, shipped_dir=None)
    base = load_base(str(tiny_base), quant="none")
    held = {q: split(rows, q).heldout or split(rows, q).train[:4] for q in ("symptoms", "treatment")}
    res = evaluate_adapters(base, list(store.entries().values()), held, ("nll", "rougeL"), max_new_tokens=8)
    for q in ("symptoms", "treatment"):
        assert set(res[q]) == {BASE, "symptoms", "treatment"}
        assert res[q][q]["nll"] < res[q][BASE]["nll"]
        assert 0.0 <= res[q][q]["rougeL"] <= 1.0
    # A specialised adapter is best on its own qtype.
    assert res["symptoms"]["symptoms"]["nll"] < res["symptoms"]["treatment"]["nll"]
    assert res["treatment"]["treatment"]["nll"] < res["treatment"]["symptoms"]["nll"]


def test_interrupted_training_resumes_and_never_leaves_half_an_adapter(
    tiny_base: Path, qa_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Trainer

    real_step = Trainer.training_step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_many(str(tiny_base), str(qa_csv), ["symptoms"], tmp_path, FAST, progress=False)
    assert not (tmp_path / "symptoms").exists()
    assert (tmp_path / ".work" / "symptoms" / "checkpoint-4").is_dir()
    monkeypatch.setattr(Trainer, "training_step", real_step)
    calls["n"] = 0
    counting = {"n": 0}

    def counting_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counting["n"] += 1
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counting_step)
    train_many(str(tiny_base), str(qa_csv), ["symptoms"], tmp_path, FAST, progress=False)
    assert counting["n"] == 12 - 4  # resumed after checkpoint-4
    assert [h["step"] for h in json.loads((tmp_path / "symptoms" / "loss.json").read_text())] == list(range(1, 13))
    assert validate_adapter(tmp_path / "symptoms", resolve_base(str(tiny_base))) == []


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_prompt_learning_methods_train_and_evaluate(method: str, tiny_base: Path, qa_csv: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(method=method, max_steps=6, batch_size=4, num_virtual_tokens=4, eval_examples=4, quant="none")  # type: ignore[arg-type]
    [result] = train_many(str(tiny_base), str(qa_csv), ["symptoms"], tmp_path, cfg, progress=False)
    m = read_manifest(result.path)
    assert m.method == method and m.num_virtual_tokens == 4 and m.rank is None
    assert validate_adapter(result.path, resolve_base(str(tiny_base))) == []
    base = load_base(str(tiny_base), quant="none")
    held = {"symptoms": split(load_qa(str(qa_csv)), "symptoms").heldout[:3] or load_qa(str(qa_csv))[:3]}
    entry = AdapterStore(tmp_path, shipped_dir=None).get("symptoms")
    res = evaluate_adapters(base, [entry], held, ("nll", "rougeL"), max_new_tokens=4)
    assert res["symptoms"]["symptoms"]["nll"] > 0 and "rougeL" in res["symptoms"]["symptoms"]
    assert res["symptoms"][BASE]["nll"] > 0


def test_rows_of_other_qtypes_are_trained_on_and_recorded(tiny_base: Path, qa_csv: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(max_steps=1, batch_size=4, eval_examples=0, quant="none", other_rows=0.5)
    [result] = train_many(str(tiny_base), str(qa_csv), ["treatment"], tmp_path, cfg, progress=False)
    own = len(split(load_qa(str(qa_csv)), "treatment").train)
    training = read_manifest(result.path).training
    assert training["other_rows"] == 0.5 and training["examples"] == own + round(0.5 * own)


def test_loraplus_gives_the_b_matrices_their_own_rate(tiny_base: Path, qa_csv: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(max_steps=1, batch_size=4, eval_examples=0, quant="none", lr=1e-3, loraplus_ratio=8)
    model = attach_adapter(load_base(str(tiny_base), quant="none"), cfg)
    rates = {id(p): g["lr"] for g in _optimizer(model, cfg).param_groups for p in g["params"]}
    lora = {n: rates[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert {r for n, r in lora.items() if "lora_A" in n} == {1e-3}
    assert {r for n, r in lora.items() if "lora_B" in n} == {8e-3}
    assert len(lora) == len(rates)  # every trainable weight is in the optimizer, the frozen base in none
    assert _optimizer(model, TrainConfig(quant="none")) is None  # plain LoRA keeps the Trainer's own AdamW
    [result] = train_many(str(tiny_base), str(qa_csv), ["treatment"], tmp_path, cfg, progress=False)
    assert read_manifest(result.path).training["loraplus_ratio"] == 8


def test_nf4_training_on_tiny_base(tiny_base: Path, qa_csv: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(max_steps=3, batch_size=2, eval_examples=2, quant="nf4")
    [result] = train_many(str(tiny_base), str(qa_csv), ["treatment"], tmp_path, cfg, progress=False)
    assert result.metrics["quant"] == "nf4"
    base = load_base(str(tiny_base), quant="nf4")
    assert base.model.is_loaded_in_4bit
    nll = answer_nll(base.model, base.tokenizer, load_qa(str(qa_csv))[:2])
    assert nll > 0


def test_compute_dtype_follows_the_device() -> None:
    from loraswap.adapters.base import compute_dtype_for

    assert compute_dtype_for("cpu") == torch.float32


@pytest.mark.gpu
def test_nf4_on_cuda_computes_in_bf16(tiny_base: Path, qa_csv: Path, tmp_path: Path) -> None:
    base = load_base(str(tiny_base), quant="nf4", device="cuda")
    assert base.compute_dtype == torch.bfloat16 and base.model.is_loaded_in_4bit
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_examples=2, quant="nf4")
    [result] = train_many(str(tiny_base), str(qa_csv), ["symptoms"], tmp_path, cfg, progress=False)
    assert result.metrics["nll"] > 0
