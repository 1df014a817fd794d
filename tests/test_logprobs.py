"""Log-probabilities computed by the engine (server/worker/logprobs.py): a scored row, in a mixed batch with other
adapters and plain rows, reports what PEFT computes for that adapter alone."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from engines import IMPLS, lora_store, make_engine, run_all

from loraswap.adapters.base import load_base
from loraswap.adapters.prompt import prompt_ids
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import Job
from loraswap.server.settings import LoraImpl


@pytest.fixture(scope="module")
def store(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    return lora_store(lively_base, tmp_path_factory.mktemp("logprob-store"))


def peft_logprobs(lively_base: Path, store: AdapterStore, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocabulary]: PEFT's log-softmax at every position of `ids`, the adapter alone."""
    from peft import PeftModel

    base = load_base(str(lively_base), quant="none")
    model = base.model if adapter is None else PeftModel.from_pretrained(base.model, str(store.get(adapter).path))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@IMPLS
def test_echo_and_generated_logprobs_match_peft_in_a_mixed_batch(
    lively_base: Path, store: AdapterStore, impl: LoraImpl
) -> None:
    engine = make_engine(lively_base, store, impl, prefix_cache_bytes=1 << 20)
    tok = engine.tokenizer
    scored_prompt = prompt_ids(tok, "What are the symptoms of carditis ?")
    jobs = [
        Job(str(uuid.uuid4()), scored_prompt, "symptoms", max_tokens=5, logprobs=3, prompt_logprobs=2),
        Job(str(uuid.uuid4()), prompt_ids(tok, "What is osteitis ?"), "treatment", max_tokens=7),
        Job(str(uuid.uuid4()), prompt_ids(tok, "How to prevent dermitis ?"), None, max_tokens=4, logprobs=0),
    ]
    for j in jobs:
        engine.submit(j)
    events = run_all(engine)
    first = events[jobs[0].uid]
    prompt_lp = first[0].prompt_logprobs
    assert prompt_lp is not None and prompt_lp[0] is None and len(prompt_lp) == len(scored_prompt)
    assert all(e.prompt_logprobs is None for e in first[1:])
    generated = [x for e in first for x in (e.logprobs or []) if not x.get("end")]
    assert len(generated) == first[-1].completion_tokens
    gen_ids = [x["id"] for x in generated]
    ref = peft_logprobs(lively_base, store, "symptoms", scored_prompt + gen_ids)
    for t in range(1, len(scored_prompt)):
        entry = prompt_lp[t]
        assert entry is not None and entry["id"] == scored_prompt[t]
        assert entry["logprob"] == pytest.approx(float(ref[t - 1, scored_prompt[t]]), abs=1e-3)
        assert [a for a, _ in entry["top"]] == ref[t - 1].topk(2).indices.tolist()
    for k, entry in enumerate(generated):
        row = ref[len(scored_prompt) - 1 + k]
        assert entry["logprob"] == pytest.approx(float(row[entry["id"]]), abs=1e-3)
        assert entry["id"] == int(row.argmax())  # greedy: the chosen token is the most likely one
        assert len(entry["top"]) == 3 and entry["top"][0][0] == entry["id"]
    plain = events[jobs[1].uid]
    assert all(e.logprobs is None and e.prompt_logprobs is None for e in plain)
    zero = [x for e in events[jobs[2].uid] for x in (e.logprobs or [])]
    assert zero and all(x["top"] == [] for x in zero)
    # Without the adapter's LoRA the prompt scores differently: the scored row ran with its own adapter.
    base_ref = peft_logprobs(lively_base, store, None, scored_prompt)
    assert abs(prompt_lp[1]["logprob"] - float(base_ref[0, scored_prompt[1]])) > 1e-3  # type: ignore[index]


def test_the_stop_token_that_ends_a_row_is_reported_as_its_end(lively_base: Path, store: AdapterStore) -> None:
    engine = make_engine(lively_base, store)
    eos = next(iter(engine.stop_ids))
    ids = prompt_ids(engine.tokenizer, "What is osteitis ?")
    probe = Job(str(uuid.uuid4()), ids, None, max_tokens=1, logprobs=1)
    engine.submit(probe)
    first = [x for e in run_all(engine)[probe.uid] for x in (e.logprobs or [])]
    # Make the stop token the greedy choice: the engine then ends the row on it, and reports it, marked.
    engine.stop_ids = {first[0]["id"]}
    again = Job(str(uuid.uuid4()), ids, None, max_tokens=3, logprobs=1)
    engine.submit(again)
    events = run_all(engine)[again.uid]
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 0
    reported = [x for e in events for x in (e.logprobs or [])]
    assert len(reported) == 1 and reported[0]["end"] and reported[0]["id"] == first[0]["id"] != eos


def test_a_scored_prompt_is_computed_whole_even_when_its_blocks_are_cached(
    lively_base: Path, store: AdapterStore
) -> None:
    engine = make_engine(lively_base, store, prefix_cache_bytes=1 << 20)
    ids = prompt_ids(engine.tokenizer, "What are the treatments for hepatitis ?")
    warm = Job(str(uuid.uuid4()), ids, "treatment", max_tokens=2)
    engine.submit(warm)
    run_all(engine)
    again = Job(str(uuid.uuid4()), ids, "treatment", max_tokens=1, prompt_logprobs=0)
    engine.submit(again)
    ev = run_all(engine)[again.uid]
    assert ev[0].cached_tokens == 0
    assert ev[0].prompt_logprobs is not None and len(ev[0].prompt_logprobs) == len(ids)
    ref = peft_logprobs(lively_base, store, "treatment", ids)
    last = ev[0].prompt_logprobs[-1]
    assert last is not None and last["logprob"] == pytest.approx(float(ref[-2, ids[-1]]), abs=1e-3)


def test_logit_bias_and_penalties_change_only_their_own_row(
    lively_base: Path, tiny_base: Path, store: AdapterStore
) -> None:
    engine = make_engine(lively_base, store)
    ids = prompt_ids(engine.tokenizer, "What are the symptoms of carditis ?")
    forced = 7
    plain = Job(str(uuid.uuid4()), ids, "symptoms", max_tokens=6, ignore_eos=True)
    biased = Job(str(uuid.uuid4()), ids, "symptoms", max_tokens=6, ignore_eos=True, logit_bias=((forced, 100.0),))
    for j in (plain, biased):
        engine.submit(j)
    events = run_all(engine)
    alone = Job(str(uuid.uuid4()), ids, "symptoms", max_tokens=6, ignore_eos=True, logprobs=0)
    engine.submit(alone)
    reference = [x["id"] for e in run_all(engine)[alone.uid] for x in (e.logprobs or [])]
    assert forced not in reference
    tokens = engine.tokenizer.decode([forced] * 6)
    assert "".join(e.text for e in events[biased.uid]) == tokens  # +100: the biased token every time
    assert "".join(e.text for e in events[plain.uid]) == engine.tokenizer.decode(reference)  # its neighbour: untouched
    # The tiny base with its default init repeats a token soon; a frequency penalty makes it move on.
    dull = make_engine(tiny_base, store)
    ids = prompt_ids(dull.tokenizer, "What is osteitis ?")
    same = Job(str(uuid.uuid4()), ids, None, max_tokens=12, ignore_eos=True, logprobs=0)
    varied = Job(str(uuid.uuid4()), ids, None, max_tokens=12, ignore_eos=True, logprobs=0, frequency_penalty=2.0)
    for j in (same, varied):
        dull.submit(j)
    got = run_all(dull)
    distinct = {u: len({x["id"] for e in got[u] for x in (e.logprobs or [])}) for u in (same.uid, varied.uid)}
    assert distinct[varied.uid] > distinct[same.uid], distinct


def test_a_long_prompt_is_scored_in_chunks_with_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraswap.server.worker import logprobs
    from loraswap.server.worker.batch import Row

    torch.manual_seed(0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    logits = torch.randn(1, 12, 20)  # two more positions than the prompt: it is right-aligned

    def scored(chunk: int) -> list[dict | None]:  # type: ignore[type-arg]
        monkeypatch.setattr(logprobs, "CHUNK", chunk)
        row = Row(Job("u", prompt, None, prompt_logprobs=2), "base", None)
        logprobs.score_prompts([row], logits)
        assert row.prompt_logprobs is not None
        return row.prompt_logprobs

    whole, chunked = scored(1000), scored(3)
    assert chunked == whole and len(whole) == len(prompt) and whole[0] is None
    expect = torch.log_softmax(logits[0, 2 + 4 - 1], -1)[prompt[4]]  # token 4, scored by the position before it
    assert whole[4] is not None and whole[4]["logprob"] == pytest.approx(float(expect))
