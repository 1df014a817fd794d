"""The continuous-batching engine on the tiny base: mixed-adapter parity with PEFT, joins, cancels, eviction,
failures, sampling, prompt-learning adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PARITY_QUESTIONS as QUESTIONS
from conftest import random_lora_adapter
from engines import IMPLS, lora_store, make_engine, run_all, solo_reference, text_of

from loraswap.adapters.manifest import AdapterNotFound
from loraswap.adapters.prompt import prompt_ids
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import Job, JobEvent
from loraswap.server.settings import LoraImpl
from loraswap.server.worker.lru import AdapterLRU, CacheFull


@pytest.fixture(scope="module")
def store(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    return lora_store(lively_base, tmp_path_factory.mktemp("engine-store"))


@IMPLS
def test_mixed_batch_matches_each_adapter_alone(lively_base: Path, store: AdapterStore, impl: LoraImpl) -> None:
    engine = make_engine(lively_base, store, impl)
    tok = engine.tokenizer
    plan = [("symptoms", QUESTIONS[0]), ("treatment", QUESTIONS[1]), (None, QUESTIONS[2]), ("symptoms", QUESTIONS[3])]
    for i, (adapter, q) in enumerate(plan):
        engine.submit(Job(f"r{i}", prompt_ids(tok, q), adapter, max_tokens=12))
    events = run_all(engine)
    outputs = {}
    for i, (adapter, q) in enumerate(plan):
        ref = solo_reference(lively_base, store, adapter, q, 12)
        assert text_of(events[f"r{i}"]) == tok.decode(ref, skip_special_tokens=True), (adapter, q)
        final = events[f"r{i}"][-1]
        assert final.finish_reason in ("stop", "length")
        assert final.completion_tokens == len(ref)
        outputs[i] = text_of(events[f"r{i}"])
    # The adapters are non-zero and the outputs varied: this parity could fail.
    assert len(set(outputs.values())) == len(plan)
    assert all(len(set(t)) > 5 for t in outputs.values())


@IMPLS
def test_requests_join_a_running_batch_and_still_match(lively_base: Path, store: AdapterStore, impl: LoraImpl) -> None:
    engine = make_engine(lively_base, store, impl)
    tok = engine.tokenizer
    engine.submit(Job("long", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=16))
    events: dict[str, list[JobEvent]] = {}
    for step in range(200):
        if step == 3:
            engine.submit(Job("late", prompt_ids(tok, QUESTIONS[1]), "treatment", max_tokens=6))
            engine.submit(Job("late-base", prompt_ids(tok, QUESTIONS[2]), None, max_tokens=6))
        if step > 3 and not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    for uid, adapter, q, n in [
        ("long", "symptoms", QUESTIONS[0], 16),
        ("late", "treatment", QUESTIONS[1], 6),
        ("late-base", None, QUESTIONS[2], 6),
    ]:
        ref = solo_reference(lively_base, store, adapter, q, n)
        assert text_of(events[uid]) == tok.decode(ref, skip_special_tokens=True), uid


def test_short_request_leaves_before_the_long_one(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    tok = engine.tokenizer
    engine.submit(Job("long", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=40))
    engine.submit(Job("short", prompt_ids(tok, QUESTIONS[1]), "treatment", max_tokens=2))
    finished_at: dict[str, int] = {}
    for step in range(100):
        for e in engine.step():
            if e.finish_reason:
                finished_at[e.uid] = step
        if not engine.has_work():
            break
    assert finished_at["short"] <= 2
    if finished_at["long"] > 2:  # the long one may stop early on its own end-of-turn token
        assert engine.running == 0


def test_unknown_adapter_is_refused_before_queueing(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    with pytest.raises(AdapterNotFound, match="did you mean 'symptoms'"):
        engine.submit(Job("x", [1, 2, 3], "symtoms"))
    assert not engine.has_work()
    with pytest.raises(ValueError, match="context holds"):
        engine.submit(Job("x", list(range(5000)), None))


def test_cancel_frees_the_row(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    tok = engine.tokenizer
    engine.submit(Job("a", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=50))
    engine.submit(Job("b", prompt_ids(tok, QUESTIONS[1]), "symptoms", max_tokens=5))
    engine.step()
    engine.cancel("a")
    events = run_all(engine)
    assert events["a"][-1].finish_reason == "cancelled"
    assert events["b"][-1].finish_reason in ("stop", "length")
    assert engine.residency.lru.in_use(next(iter(engine.residency.lru.names()))) == 0


@IMPLS
def test_lru_eviction_with_one_slot(lively_base: Path, store: AdapterStore, impl: LoraImpl) -> None:
    engine = make_engine(lively_base, store, impl, max_loaded=1)
    tok = engine.tokenizer
    engine.submit(Job("a", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=4))
    engine.submit(Job("b", prompt_ids(tok, QUESTIONS[1]), "treatment", max_tokens=4))
    events = run_all(engine)
    # "b" waits until "a" releases the only slot, then evicts it: both complete, correctly.
    for uid, adapter, q in [("a", "symptoms", QUESTIONS[0]), ("b", "treatment", QUESTIONS[1])]:
        ref = solo_reference(lively_base, store, adapter, q, 4)
        assert text_of(events[uid]) == tok.decode(ref, skip_special_tokens=True)
    assert len(engine.residency.lru) == 1
    assert len(engine.residency.slots if engine.residency.slots is not None else engine.residency.peft.peft_config) == 1


def test_stop_strings_cut_the_text(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    tok = engine.tokenizer
    engine.submit(Job("free", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=12))
    free = text_of(run_all(engine)["free"])
    assert len(free) > 4
    stop = free[2:4]
    engine.submit(Job("cut", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=12, stop=(stop,)))
    events = run_all(engine)["cut"]
    assert text_of(events) == free[: free.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_a_failed_forward_fails_its_rows_and_the_engine_recovers(
    lively_base: Path, store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(lively_base, store, "peft")
    tok = engine.tokenizer
    engine.submit(Job("a", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=6))
    engine.step()
    head = engine.residency.peft.get_base_model().lm_head
    real = head.forward
    calls = {"n": 0}

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1  # raised inside PeftModel.forward, while its adapter_names hooks are attached
        raise RuntimeError("simulated device error")

    monkeypatch.setattr(head, "forward", boom)
    events = run_all(engine)
    assert events["a"][-1].finish_reason == "error"
    assert calls["n"] == 1
    stale = [
        h
        for m in engine.residency.peft.modules()
        for h in m._forward_pre_hooks.values()
        if getattr(getattr(h, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook"
    ]
    assert stale == []  # peft#3475: a failed call leaves its hooks attached unless they are removed
    monkeypatch.setattr(head, "forward", real)
    engine.submit(Job("b", prompt_ids(tok, QUESTIONS[1]), "treatment", max_tokens=5))
    after = run_all(engine)
    ref = solo_reference(lively_base, store, "treatment", QUESTIONS[1], 5)
    assert text_of(after["b"]) == tok.decode(ref, skip_special_tokens=True)


def test_a_failed_batched_forward_leaves_no_rows_set(
    lively_base: Path, store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(lively_base, store)
    tok = engine.tokenizer
    engine.submit(Job("a", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=6))
    engine.step()
    head = engine.base_model.lm_head

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated device error")

    monkeypatch.setattr(head, "forward", boom)
    assert run_all(engine)["a"][-1].finish_reason == "error"
    assert engine.residency.slots is not None and engine.residency.slots.rows is None
    monkeypatch.undo()
    engine.submit(Job("b", prompt_ids(tok, QUESTIONS[1]), "treatment", max_tokens=5))
    ref = solo_reference(lively_base, store, "treatment", QUESTIONS[1], 5)
    assert text_of(run_all(engine)["b"]) == tok.decode(ref, skip_special_tokens=True)


def test_sampling_is_reproducible_with_a_seed(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    tok = engine.tokenizer
    texts = []
    for uid in ("s1", "s2"):
        engine.submit(Job(uid, prompt_ids(tok, QUESTIONS[0]), None, max_tokens=10, temperature=1.0, seed=7))
        texts.append(text_of(run_all(engine)[uid]))
    assert texts[0] == texts[1]


def test_lru_bookkeeping() -> None:
    lru = AdapterLRU(max_count=2, max_bytes=100)
    assert lru.plan_load("a", 40) == []
    lru.added("a", 40)
    lru.added("b", 40)
    lru.acquire("a")
    assert lru.plan_load("c", 40) == ["b"]  # "a" is busy, "b" is not
    lru.acquire("b")
    with pytest.raises(CacheFull, match="in use"):
        lru.plan_load("c", 40)
    with pytest.raises(RuntimeError, match="running request"):
        lru.removed("a")
    lru.release("a")
    assert lru.plan_load("c", 40) == ["a"]
    with pytest.raises(CacheFull, match="at most 100"):
        lru.plan_load("huge", 101)
    with pytest.raises(RuntimeError, match="released more often"):
        lru.release("c")


@pytest.fixture(scope="module")
def prompt_store(lively_base: Path, qa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    from loraswap.train.data import load_qa
    from loraswap.train.trainer import TrainConfig, train_qtype

    out = tmp_path_factory.mktemp("prompt-store")
    rows = load_qa(str(qa_csv))
    for method in ("prompt", "ptuning", "prefix"):
        cfg = TrainConfig(method=method, max_steps=2, num_virtual_tokens=4, eval_examples=0, quant="none")  # type: ignore[arg-type]
        train_qtype(str(lively_base), rows, "symptoms", out, cfg, data_source="qa.csv", name=method, progress=False)
    random_lora_adapter(lively_base, out, "lora", seed=1)
    return AdapterStore(out, shipped_dir=None)


@IMPLS
def test_prompt_learning_adapters_mix_with_lora_and_match_peft(
    lively_base: Path, prompt_store: AdapterStore, impl: LoraImpl
) -> None:
    engine = make_engine(lively_base, prompt_store, impl)
    tok = engine.tokenizer
    plan = [
        ("prompt", QUESTIONS[0]),
        ("lora", QUESTIONS[1]),
        ("ptuning", QUESTIONS[2]),
        (None, QUESTIONS[3]),
        ("prefix", QUESTIONS[0]),
    ]
    for i, (adapter, q) in enumerate(plan):
        engine.submit(Job(f"r{i}", prompt_ids(tok, q), adapter, max_tokens=8))
    events = run_all(engine)
    for i, (adapter, q) in enumerate(plan):
        ref = solo_reference(lively_base, prompt_store, adapter, q, 8)
        assert text_of(events[f"r{i}"]) == tok.decode(ref, skip_special_tokens=True), adapter
    # The learned prompts change the answer: each prompt-learning row differs from the base on its question.
    base_answer = tok.decode(solo_reference(lively_base, prompt_store, None, QUESTIONS[0], 8), skip_special_tokens=True)
    assert base_answer not in (text_of(events["r0"]), text_of(events["r4"]))
    assert text_of(events["r0"]) != text_of(events["r4"])


def test_cancels_of_finished_requests_are_forgotten(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    engine.submit(Job("a", prompt_ids(engine.tokenizer, QUESTIONS[0]), None, max_tokens=2))
    run_all(engine)
    engine.cancel("a")  # the client left after the answer was complete
    engine.submit(Job("b", prompt_ids(engine.tokenizer, QUESTIONS[1]), None, max_tokens=2))
    assert run_all(engine)["b"][-1].finish_reason in ("stop", "length")
    assert engine.cancelled == set()


def test_ignore_eos_generates_max_tokens_past_the_end_of_the_answer(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    ids = prompt_ids(engine.tokenizer, QUESTIONS[0])
    engine.stop_ids = set(range(len(engine.tokenizer)))  # every token ends an answer
    engine.submit(Job("plain", ids, "symptoms", max_tokens=6))
    engine.submit(Job("bench", ids, "symptoms", max_tokens=6, ignore_eos=True))
    events = run_all(engine)
    assert (events["plain"][-1].finish_reason, events["plain"][-1].completion_tokens) == ("stop", 0)
    assert (events["bench"][-1].finish_reason, events["bench"][-1].completion_tokens) == ("length", 6)


def test_prefill_budget_admits_requests_over_several_steps(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store, max_prefill_tokens=1)
    tok = engine.tokenizer
    for i in range(3):
        engine.submit(Job(f"r{i}", prompt_ids(tok, QUESTIONS[i]), "symptoms", max_tokens=8, ignore_eos=True))
    running = []
    for _ in range(3):
        engine.step()
        running.append(engine.running)
    assert running == [1, 2, 3]  # each prompt is over the budget alone: one joins per step
    events = run_all(engine)
    assert all(events[f"r{i}"][-1].completion_tokens == 8 for i in range(3))
