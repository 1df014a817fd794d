"""The engine's caches and step order on the tiny base: the KV cache's spare columns, the prefix cache, freed memory
handed back, short requests first; every answer still matches PEFT's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PARITY_QUESTIONS as QUESTIONS
from engines import IMPLS, lora_store, make_engine, run_all, solo_reference, text_of

from loraswap.adapters.prompt import prompt_ids
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import Job, JobEvent
from loraswap.server.settings import LoraImpl


@pytest.fixture(scope="module")
def store(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    return lora_store(lively_base, tmp_path_factory.mktemp("engine-store"))


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


@IMPLS
@pytest.mark.parametrize("join", [True, False], ids=["joined", "prefilled"])
def test_a_wave_joining_in_the_running_rows_decoding_step_matches_peft(
    lively_base: Path, store: AdapterStore, impl: LoraImpl, join: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests whose prompts' leading blocks are cached join a running request in its decoding forward
    (`joining.py`): one forward, each new row's remaining prompt beside the running row's next token, padding in the
    running row's cache. Every answer, the running one's included, is still PEFT's; with `join_in_step` off
    (LORASWAP_JOIN_IN_STEP=false) the wave gets a prefill of its own, with the same answers."""
    from loraswap.server.worker import joining

    engine = make_engine(lively_base, store, impl, max_batch_size=16, join_in_step=join)
    tok = engine.tokenizer
    adapters = ["symptoms", "treatment", None]
    for i, q in enumerate(QUESTIONS):  # every prompt once, so that its leading blocks are cached
        for a in adapters:
            engine.submit(Job(f"warm{i}{a}", prompt_ids(tok, q), a, max_tokens=1))
    run_all(engine)
    joined: list[int] = []
    join_and_decode = joining.join_and_decode

    def counted(engine: object, new: list[object], *rest: object) -> object:
        joined.append(len(new))
        return join_and_decode(engine, new, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(joining, "join_and_decode", counted)
    engine.submit(Job("running", prompt_ids(tok, QUESTIONS[0]), "symptoms", max_tokens=12))
    events: dict[str, list[JobEvent]] = {}
    wave = [(f"w{i}", adapters[i % 3], QUESTIONS[i % 4]) for i in range(8)]
    for step in range(200):
        if step == 3:
            for uid, adapter, q in wave:
                engine.submit(Job(uid, prompt_ids(tok, q), adapter, max_tokens=8))
        if step > 3 and not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    assert joined == ([8] if join else [])  # the wave joined in one decoding forward, or in none
    assert all(events[uid][0].cached_tokens > 0 for uid, _, _ in wave)
    expected = {"running": ("symptoms", QUESTIONS[0], 12), **{uid: (a, q, 8) for uid, a, q in wave}}
    for uid, (adapter, q, n) in expected.items():
        ref = solo_reference(lively_base, store, adapter, q, n)
        assert text_of(events[uid]) == tok.decode(ref, skip_special_tokens=True), uid
