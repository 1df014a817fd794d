"""Seq2seq (T5) bases, on a tiny T5 built from a config: train -> save -> serve -> answer, with mixed-batch
parity against PEFT's `generate` with each adapter alone, evaluation, export, and the real server."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import PARITY_QUESTIONS as QUESTIONS
from conftest import build_tiny_t5, peft_reference, random_lora_adapter, run_cli

from loraswap.adapters.base import load_base, resolve_base
from loraswap.adapters.manifest import AdapterError, read_manifest
from loraswap.adapters.prompt import prompt_ids, stop_token_ids
from loraswap.adapters.store import AdapterStore
from loraswap.adapters.validate import validate_adapter
from loraswap.server.jobs import Job, JobEvent
from loraswap.server.settings import LoraImpl
from loraswap.server.worker.seq2seq import Seq2SeqEngine
from loraswap.train.data import load_qa
from loraswap.train.trainer import TrainConfig, train_qtype


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Large random weights (as the lively Llama's): greedy output changes with the prompt and the adapter."""
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"), initializer_factor=30.0)


@pytest.fixture(scope="module")
def store_dir(t5: Path, qa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two random LoRA adapters, and one trained here (QLoRA over the NF4 base, as `loraswap train` does)."""
    out = tmp_path_factory.mktemp("t5-store")
    random_lora_adapter(t5, out, "symptoms", seed=1, qtype="symptoms")
    random_lora_adapter(t5, out, "treatment", seed=2, qtype="treatment")
    cfg = TrainConfig(max_steps=6, lr=5e-3, batch_size=4, max_examples=16, eval_examples=4, save_steps=100)
    train_qtype(str(t5), load_qa(str(qa_csv)), "symptoms", out, cfg, "qa.csv", name="trained", progress=False)
    return out


def run(engine: Seq2SeqEngine, joins: dict[int, list[Job]]) -> tuple[dict[str, list[JobEvent]], dict[str, list[int]]]:
    """Step the engine to the end, submitting `joins[step]` at that step; events and generated ids by request."""
    events: dict[str, list[JobEvent]] = {}
    generated: dict[str, list[int]] = {}
    retire = engine._retire

    def keep_ids(finished: list[Any]) -> None:
        generated.update({r.req.uid: list(r.generated) for r in finished})
        retire(finished)

    engine._retire = keep_ids  # type: ignore[method-assign]
    for step in range(500):
        for req in joins.get(step, []):
            engine.submit(req)
        if step > max(joins) and not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    return events, generated


@pytest.mark.parametrize("impl", ["batched", "peft"])
def test_mixed_batch_with_joins_matches_each_adapter_alone(t5: Path, store_dir: Path, impl: LoraImpl) -> None:
    store = AdapterStore(store_dir, shipped_dir=None)
    base = load_base(str(t5), quant="none")
    engine = Seq2SeqEngine(base.model, base.tokenizer, store.get, lora_impl=impl)
    tok = base.tokenizer
    plan = [
        ("symptoms", QUESTIONS[0], 0),
        ("treatment", QUESTIONS[1], 0),
        (None, QUESTIONS[2], 0),
        ("treatment", QUESTIONS[3], 3),  # these join a running batch (other prompt lengths, shorter caches)
        ("symptoms", QUESTIONS[2], 3),
        ("trained", QUESTIONS[0], 5),
    ]
    joins: dict[int, list[Job]] = {}
    for i, (adapter, q, step) in enumerate(plan):
        joins.setdefault(step, []).append(Job(f"r{i}", prompt_ids(tok, q), adapter, max_tokens=10))
    events, generated = run(engine, joins)
    assert engine.running == 0 and not engine.has_work()
    for i, (adapter, q, _) in enumerate(plan):
        want = peft_reference(t5, None if adapter is None else store_dir / adapter, q, 10)
        assert [t for t in generated[f"r{i}"] if t not in stop_token_ids(tok)] == want, (adapter, q)
        assert "".join(e.text for e in events[f"r{i}"]) == tok.decode(want, skip_special_tokens=True)
        final = events[f"r{i}"][-1]
        assert final.finish_reason in ("stop", "length") and final.completion_tokens == len(want)
        assert final.prompt_tokens == len(prompt_ids(tok, q))
    # Non-zero adapters and a lively base: every row's ids differ, so the parity above could fail.
    first = [tuple(generated[f"r{i}"]) for i in range(3)]
    assert len(set(first)) == 3 and all(len(set(g)) > 3 for g in first)


def test_a_cancelled_row_leaves_and_the_others_still_match(t5: Path, store_dir: Path) -> None:
    store = AdapterStore(store_dir, shipped_dir=None)
    base = load_base(str(t5), quant="none")
    engine = Seq2SeqEngine(base.model, base.tokenizer, store.get)
    tok = base.tokenizer
    plan = [("symptoms", QUESTIONS[0]), ("treatment", QUESTIONS[1]), (None, QUESTIONS[2])]
    for i, (adapter, q) in enumerate(plan):
        engine.submit(Job(f"r{i}", prompt_ids(tok, q), adapter, max_tokens=10))
    engine.step()
    engine.step()
    engine.cancel("r1")  # the row with the longest prompt, in the middle of the batch's caches
    events, generated = run(engine, {0: []})
    assert events["r1"][-1].finish_reason == "cancelled"
    for i in (0, 2):
        adapter, q = plan[i]
        want = peft_reference(t5, None if adapter is None else store_dir / adapter, q, 10)
        assert [t for t in generated[f"r{i}"] if t not in stop_token_ids(tok)] == want, adapter


def test_nf4_base_serves_and_matches_peft_on_the_same_nf4_weights(t5: Path, store_dir: Path) -> None:
    from peft import PeftModel

    store = AdapterStore(store_dir, shipped_dir=None)
    base = load_base(str(t5), quant="nf4")
    engine = Seq2SeqEngine(base.model, base.tokenizer, store.get)
    tok = base.tokenizer
    plan = [("symptoms", QUESTIONS[0]), ("treatment", QUESTIONS[1])]
    _, generated = run(
        engine, {0: [Job(f"r{i}", prompt_ids(tok, q), a, max_tokens=8) for i, (a, q) in enumerate(plan)]}
    )
    assert "Linear4bit" in type(base.model.encoder.block[0].layer[0].SelfAttention.q.base_layer).__name__
    for i, (adapter, q) in enumerate(plan):  # each adapter alone on a fresh load of the NF4 base
        model = PeftModel.from_pretrained(load_base(str(t5), quant="nf4").model, str(store_dir / adapter)).eval()
        ids = torch.tensor([prompt_ids(tok, q)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        want = [t for t in out[0, 1:].tolist() if t not in stop_token_ids(tok)]
        assert [t for t in generated[f"r{i}"] if t not in stop_token_ids(tok)] == want, adapter
    assert generated["r0"] != generated["r1"]


def test_trained_adapter_is_a_seq2seq_lora_with_its_evaluation(t5: Path, store_dir: Path) -> None:
    ref = resolve_base(str(t5))
    folder = store_dir / "trained"
    assert validate_adapter(folder, ref) == []
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]
    m = read_manifest(folder)
    assert m.base_fingerprint == ref.fingerprint and m.training["steps"] == 6
    # QLoRA over the NF4 T5 lowered the decoder's loss and the held-out answer NLL (the lively base starts high).
    losses = [x["loss"] for x in json.loads((folder / "loss.json").read_text())]
    assert len(losses) == 6 and sum(losses[-3:]) < sum(losses[:3])
    assert m.metrics["quant"] == "nf4" and 0 < m.metrics["nll"] < m.metrics["base_nll"]


def test_answer_nll_is_the_decoders_loss_on_the_answer(t5: Path, qa_csv: Path) -> None:
    from loraswap.adapters.prompt import build_example
    from loraswap.train.evaluate import answer_nll, greedy_answers

    base = load_base(str(t5), quant="none")
    rows = load_qa(str(qa_csv))[:3]
    got = answer_nll(base.model, base.tokenizer, rows, batch_size=2)  # two batches, padded
    total, count = 0.0, 0
    for r in rows:  # one at a time, no padding: transformers' own loss (a mean over the labels)
        ex = build_example(base.tokenizer, r.question, r.answer, 256, seq2seq=True)
        assert ex is not None and ex.input_ids == prompt_ids(base.tokenizer, r.question)
        assert ex.labels[-1] == base.tokenizer.eos_token_id
        with torch.no_grad():
            loss = base.model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
        total += float(loss) * len(ex.labels)
        count += len(ex.labels)
    assert got == pytest.approx(total / count, rel=1e-4)
    # `loraswap eval`'s greedy answers: a left-padded batch, the decoder's tokens only.
    want = [base.tokenizer.decode(peft_reference(t5, None, q, 6), skip_special_tokens=True).strip() for q in QUESTIONS]
    assert greedy_answers(base.model, base.tokenizer, QUESTIONS, max_new_tokens=6) == want


def test_prompt_learning_training_is_refused_on_seq2seq_bases(
    t5: Path, qa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--base", str(t5), "--data", str(qa_csv), "--qtype", "symptoms", "--out", str(tmp_path)]
    code, _, err = run_cli([*args, "--method", "prompt"], capsys)
    assert code == 2 and "seq2seq (t5) base" in err and "LoRA only" in err
    assert not any(tmp_path.iterdir())


def test_merged_export_matches_the_adapter_and_gguf_is_refused(t5: Path, store_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from loraswap.adapters.export import export_adapter

    ref = resolve_base(str(t5))
    result = export_adapter(store_dir / "symptoms", ref, "merged", tmp_path / "merged", progress=False)
    assert "probe_max_abs_logit_diff" in result.info["merged"]  # checked by the export, through both stacks
    assert "AutoModelForSeq2SeqLM" in (tmp_path / "merged" / "README.md").read_text()
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    peft = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5), str(store_dir / "symptoms")).eval()
    tok = load_base(str(t5), quant="none").tokenizer
    for q in QUESTIONS[:2]:
        ids = torch.tensor([prompt_ids(tok, q)])
        gen = {"max_new_tokens": 10, "do_sample": False}
        assert merged.generate(input_ids=ids, **gen).tolist() == peft.generate(input_ids=ids, **gen).tolist()
    with pytest.raises(AdapterError, match=r"seq2seq base .*merged"):
        export_adapter(store_dir / "symptoms", ref, "gguf", tmp_path / "gguf", progress=False)


# ---- the real server, on the T5 base ------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(t5: Path, store_dir: Path) -> Iterator[str]:
    from loraswap.bench.launch import launch, stop

    proc, url = launch(str(t5), store_dir, quant="none", max_batch_size=4, timeout=120)
    yield url
    stop(proc)


def sse_data(r: httpx.Response) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_server_answers_mixed_requests_and_streams_chat(url: str, t5: Path, store_dir: Path) -> None:
    tok = load_base(str(t5), quant="none").tokenizer
    plan = [("symptoms", QUESTIONS[0]), ("treatment", QUESTIONS[1]), ("base", QUESTIONS[2]), ("trained", QUESTIONS[3])]

    def ask(item: tuple[str, str]) -> dict[str, Any]:
        r = httpx.post(f"{url}/v1/answer", json={"adapter": item[0], "question": item[1], "max_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        return dict(r.json())

    with ThreadPoolExecutor(len(plan)) as pool:
        answers = list(pool.map(ask, plan))
    for (adapter, q), got in zip(plan, answers, strict=True):
        want = peft_reference(t5, None if adapter == "base" else store_dir / adapter, q, 8)
        assert got["answer"] == tok.decode(want, skip_special_tokens=True), adapter
        assert got["usage"]["completion_tokens"] == len(want)
        assert got["usage"]["prompt_tokens"] == len(prompt_ids(tok, q))

    # Chat without a chat template: a user turn after the default system prompt is the plain prompt, the same
    # tokens as /v1/answer's; streamed with usage.
    body = {"model": "symptoms", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 8}
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        chunks = sse_data(r)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answers[0]["answer"]
    assert chunks[-1]["usage"] == answers[0]["usage"]
    done = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert done["choices"][0]["message"]["content"] == text


def test_server_refuses_prompt_learning_upload_on_a_t5_base(url: str, t5: Path, tmp_path: Path) -> None:
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    model = get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(t5),
        PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=4),
    )
    model.save_pretrained(tmp_path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(tmp_path / f, arcname=f)
    r = httpx.post(
        f"{url}/v1/adapters", data={"name": "prefix"}, files={"file": ("a.tar.gz", buf.getvalue())}, timeout=60
    )
    assert r.status_code == 422, r.text
    assert "seq2seq base" in r.json()["error"]["message"]
