"""The continuous-batching engine on the tiny base: mixed-adapter parity with PEFT, joins, cancels, eviction."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PARITY_QUESTIONS as QUESTIONS
from conftest import peft_reference, random_lora_adapter

from loraswap.adapters.base import load_base
from loraswap.adapters.manifest import AdapterNotFound
from loraswap.adapters.prompt import prompt_ids
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import Job, JobEvent
from loraswap.server.settings import LoraImpl
from loraswap.server.worker.engine import Engine
from loraswap.server.worker.lru import AdapterLRU, CacheFull


@pytest.fixture(scope="module")
def store(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    out = tmp_path_factory.mktemp("engine-store")
    random_lora_adapter(lively_base, out, "symptoms", seed=1)
    random_lora_adapter(lively_base, out, "treatment", seed=2)
    return AdapterStore(out, shipped_dir=None)


IMPLS = pytest.mark.parametrize("impl", ["batched", "peft"])


def make_engine(lively_base: Path, store: AdapterStore, impl: LoraImpl = "batched", **kw: int) -> Engine:
    base = load_base(str(lively_base), quant="none")
    return Engine(base.model, base.tokenizer, store.get, lora_impl=impl, **kw)


def run_all(engine: Engine, max_steps: int = 500) -> dict[str, list[JobEvent]]:
    events: dict[str, list[JobEvent]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    assert not engine.has_work()
    return events


def solo_reference(lively_base: Path, store: AdapterStore, adapter: str | None, question: str, n: int) -> list[int]:
    return peft_reference(lively_base, None if adapter is None else store.get(adapter).path, question, n)


def text_of(events: list[JobEvent]) -> str:
    return "".join(e.text for e in events)


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


def test_a_cache_growing_past_its_spare_columns_while_rows_come_and_go_still_matches(
    lively_base: Path, store: AdapterStore
) -> None:
    """The KV cache writes decoding steps in place and reallocates every ROOM columns; rows joining and leaving
    rebuild it. A long answer crosses that boundary with rows joining and leaving around it."""
    from loraswap.server.worker.kvcache import ROOM

    engine = make_engine(lively_base, store)
    tok = engine.tokenizer
    n = ROOM + 12
    engine.submit(Job("long", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=n))
    events: dict[str, list[JobEvent]] = {}
    for step in range(300):
        if step in (2, ROOM - 3):
            engine.submit(Job(f"join{step}", prompt_ids(tok, QUESTIONS[1]), "treatment", max_tokens=5))
        if step > ROOM and not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    assert events["long"][-1].completion_tokens > ROOM
    ref = solo_reference(lively_base, store, "symptoms", QUESTIONS[0], n)
    assert text_of(events["long"]) == tok.decode(ref, skip_special_tokens=True)
    short = solo_reference(lively_base, store, "treatment", QUESTIONS[1], 5)
    for uid in ("join2", f"join{ROOM - 3}"):
        assert text_of(events[uid]) == tok.decode(short, skip_special_tokens=True), uid


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


@IMPLS
def test_prefix_cache_reuses_prompt_blocks_of_the_same_adapter_and_matches_peft(
    lively_base: Path, store: AdapterStore, impl: LoraImpl
) -> None:
    engine = make_engine(lively_base, store, impl)
    tok = engine.tokenizer
    plan = [
        [("r0", "symptoms", QUESTIONS[0])],
        [("r1", "symptoms", QUESTIONS[1]), ("r2", "treatment", QUESTIONS[1]), ("r3", None, QUESTIONS[2])],
        [("r4", "treatment", QUESTIONS[3]), ("r5", None, QUESTIONS[3])],
    ]
    events: dict[str, list[JobEvent]] = {}
    for wave in plan:  # each wave after the previous one's prefill: its blocks are in the cache
        for uid, adapter, q in wave:
            engine.submit(Job(uid, prompt_ids(tok, q), adapter, max_tokens=10))
        events.update(run_all(engine))
    cached = {uid: events[uid][0].cached_tokens for wave in plan for uid, _, _ in wave}
    # The system turn is shared by every prompt, but blocks are per adapter: first use of each computes them.
    assert cached["r0"] == cached["r2"] == cached["r3"] == 0
    assert cached["r1"] > 0 and cached["r4"] > 0 and cached["r5"] > 0
    assert all(n % engine.prompt_cache.block == 0 for n in cached.values())  # type: ignore[union-attr]
    for wave in plan:
        for uid, adapter, q in wave:
            ref = solo_reference(lively_base, store, adapter, q, 10)
            assert text_of(events[uid]) == tok.decode(ref, skip_special_tokens=True), uid
            assert events[uid][-1].prompt_tokens == len(prompt_ids(tok, q))


def test_prefix_cache_off_and_dropped_with_its_adapter(lively_base: Path, store: AdapterStore) -> None:
    off = make_engine(lively_base, store, prefix_cache_bytes=0)
    assert off.prompt_cache is None
    for uid in ("a", "b"):
        off.submit(Job(uid, prompt_ids(off.tokenizer, QUESTIONS[0]), "symptoms", max_tokens=2))
        assert run_all(off)[uid][0].cached_tokens == 0
    engine = make_engine(lively_base, store, max_loaded=1)
    cache = engine.prompt_cache
    assert cache is not None
    engine.submit(Job("a", prompt_ids(engine.tokenizer, QUESTIONS[0]), "symptoms", max_tokens=2))
    run_all(engine)
    assert len(cache) > 0 and cache.bytes > 0
    engine.submit(Job("b", prompt_ids(engine.tokenizer, QUESTIONS[0]), "treatment", max_tokens=2))
    run_all(engine)  # "symptoms" was evicted for "treatment": its blocks went with it
    assert {name[0] for name in cache._blocks} == {engine.residency.lru.names()[0]}


def test_prefix_cache_bookkeeping() -> None:
    import torch

    from loraswap.server.worker.prefix import PrefixCache

    def kv_of(t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:  # [layers, heads, tokens, dim]: token index
        k = torch.arange(t0, t1, dtype=torch.float32).view(1, 1, -1, 1).expand(2, 3, -1, 4).contiguous()
        return k, -k

    cache = PrefixCache(block=4, max_bytes=3 * 2 * (2 * 3 * 4 * 4 * 4))  # three blocks
    prompt = list(range(100, 113))  # 13 tokens: blocks end at 4, 8, 12; the 12th token is the last -> 3 blocks
    assert cache.reusable_blocks(prompt) == 3
    assert cache.lookup("a", prompt) == (0, None)
    cache.store("a", prompt, 0, kv_of)
    assert len(cache) == 3
    n, kv = cache.lookup("a", prompt)
    assert n == 12 and kv is not None
    assert kv[0][0, 0, :, 0].tolist() == list(range(12)) and bool((kv[1] == -kv[0]).all())
    assert cache.lookup("b", prompt)[0] == 0  # another adapter's blocks are not this one's
    assert cache.lookup("a", [*prompt[:5], 0, 0, 0, 0, 0])[0] == 4  # shares only the first block
    assert cache.lookup("a", prompt[:12])[0] == 8  # its last token is in block 3: that block is computed
    # Full: storing a new run evicts the least recently used blocks, later blocks of a run before earlier ones.
    cache.store("b", prompt[:9], 0, kv_of)  # two blocks in, two of "a" out
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.lookup("a", prompt)[0] == 4
    assert cache.lookup("b", prompt)[0] == 8
    cache.drop("b")
    assert len(cache) == 1 and cache.lookup("b", prompt)[0] == 0
    assert cache.hit_tokens == 12 + 4 + 8 + 4 + 8 and cache.prompt_tokens > cache.hit_tokens


def test_freed_memory_is_handed_back_when_the_last_request_leaves(
    lively_base: Path, store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraswap.server.worker import engine as engine_module

    engine = make_engine(lively_base, store)
    trims: list[tuple[int, int]] = []  # (step, rows running) at each hand-back
    step = 0
    monkeypatch.setattr(engine_module, "return_freed_memory", lambda: trims.append((step, engine.running)))
    tok = engine.tokenizer
    for uid, n in (("a", 3), ("b", 6)):
        engine.submit(Job(uid, prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=n, ignore_eos=True))
    finished: dict[str, int] = {}
    for step in range(20):
        for e in engine.step():
            if e.finish_reason:
                finished[e.uid] = step
        if step == 10:  # the engine has been idle for a few steps: one more request, one more hand-back
            engine.submit(Job("c", prompt_ids(tok, QUESTIONS[1]), None, max_tokens=2))
    assert finished["a"] < finished["b"] < finished["c"]
    assert trims == [(finished["b"], 0), (finished["c"], 0)]  # never while a request runs, once per idle spell
    engine_module.return_freed_memory()  # the real one runs here (glibc) or does nothing


def test_short_requests_go_first_and_every_answer_still_matches(lively_base: Path, store: AdapterStore) -> None:
    """Rows of short requests run some decoding steps alone (the long rows wait those out, with a masked column in
    the cache); each answer is still its adapter's alone, whichever steps ran it."""
    engine = make_engine(lively_base, store, short_first_steps=2)
    tok = engine.tokenizer
    plan = [
        ("long", "symptoms", QUESTIONS[0], 40, 0),
        ("long-base", None, QUESTIONS[1], 40, 0),
        ("short", "treatment", QUESTIONS[2], 9, 3),
        ("short-too", "symptoms", QUESTIONS[3], 7, 5),
    ]
    events: dict[str, list[JobEvent]] = {}
    for step in range(300):
        for uid, adapter, q, n, at in plan:
            if at == step:
                engine.submit(Job(uid, prompt_ids(tok, q), adapter, max_tokens=n))
        if step > 5 and not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    for uid, adapter, q, n, _ in plan:
        ref = solo_reference(lively_base, store, adapter, q, n)
        assert text_of(events[uid]) == tok.decode(ref, skip_special_tokens=True), uid
    # Steps ran the short rows alone (an event's batch counts the rows of the step that made it).
    assert any(e.batch < 3 for uid in ("short", "short-too") for e in events[uid][1:])


@pytest.mark.parametrize("steps", [0, 3])
def test_short_requests_decode_every_step_and_long_ones_every_few(
    lively_base: Path, store: AdapterStore, steps: int
) -> None:
    engine = make_engine(lively_base, store, short_first_steps=steps)
    engine.stop_ids = set()  # every answer runs to its max_tokens
    tok = engine.tokenizer
    for i, adapter in enumerate(("symptoms", "treatment", None)):
        engine.submit(Job(f"long{i}", prompt_ids(tok, QUESTIONS[i]), adapter, max_tokens=64))
    engine.submit(Job("medium", prompt_ids(tok, QUESTIONS[3]), "symptoms", max_tokens=17))
    engine.step()  # their prefill and one decoding step: 2 tokens each
    engine.submit(Job("short", prompt_ids(tok, QUESTIONS[0]), "treatment", max_tokens=12))
    taken = 0
    while "short" in {r.req.uid for r in engine.batch.rows} or taken == 0:
        engine.step()
        taken += 1
    assert taken == 11  # one token from its prefill, then one at every step, whatever the others do
    # The long requests (and the medium one: 17 * 4 > 64, not short) decoded in every (steps + 1)th step meanwhile.
    generated = {r.req.uid: len(r.generated) for r in engine.batch.rows}
    assert generated == dict.fromkeys(("long0", "long1", "long2", "medium"), 2 + 11 // (steps + 1))
    events = run_all(engine)  # and they all finish
    assert {uid: events[uid][-1].completion_tokens for uid in ("long0", "long1", "long2", "medium")} == {
        "long0": 64,
        "long1": 64,
        "long2": 64,
        "medium": 17,
    }


def test_front_first_moves_the_fewest_rows() -> None:
    from loraswap.server.worker.batch import front_first

    assert front_first([False, True, False, True]) == [3, 1, 2, 0]  # row 3 trades places with row 0
    assert front_first([True, True, False]) == [0, 1, 2]  # already in front: nothing moves
    assert front_first([False, False, True]) == [2, 1, 0]
    assert front_first([]) == []
    order = front_first([False, True, True, False, False, True])
    assert sorted(order) == list(range(6)) and [o in (1, 2, 5) for o in order] == [True] * 3 + [False] * 3
    assert sum(i != o for i, o in enumerate(order)) == 2  # one swap
