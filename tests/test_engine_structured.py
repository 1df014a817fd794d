"""Constrained and free rows, single adapters and mixtures, in one engine batch: each constrained answer parses and
validates against its schema, and each free row's answer is the one it gets alone (PEFT's)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema_rs
from conftest import peft_reference
from engines import lora_store, make_engine, run_all, solo_reference, text_of

from loraswap.adapters.base import load_tokenizer, resolve_base
from loraswap.adapters.prompt import prompt_ids
from loraswap.server.jobs import Job

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["mild", "severe"]},
    },
    "required": ["n", "ok", "tag"],
}


def test_constrained_and_free_rows_share_a_batch(lively_base: Path, tmp_path: Path) -> None:
    store = lora_store(lively_base, tmp_path)
    engine = make_engine(lively_base, store, max_batch_size=8)
    tokenizer = load_tokenizer(resolve_base(str(lively_base)))
    question = "What are the symptoms of carditis ?"
    ids = prompt_ids(tokenizer, question)
    grammar = json.dumps({"schema": SCHEMA, "strict": True})
    jobs = [
        Job("free-s", ids, "symptoms", max_tokens=12, ignore_eos=True),
        Job("json-t", ids, "treatment", max_tokens=80, grammar=grammar),
        Job("json-mix", ids, None, max_tokens=80, grammar=grammar, mixture=(("symptoms", 0.6), ("treatment", 0.4))),
        Job("free-base", ids, None, max_tokens=12, ignore_eos=True),
        Job("json-base", ids, None, max_tokens=80, grammar=grammar, temperature=1.0, seed=3),
    ]
    for job in jobs:
        engine.submit(job)
    events = run_all(engine)
    assert max(e.batch for evs in events.values() for e in evs) == len(jobs)  # one batch held them all
    validator = jsonschema_rs.validator_for(SCHEMA)
    for uid in ("json-t", "json-mix", "json-base"):
        assert events[uid][-1].finish_reason == "stop", uid
        answer = json.loads(text_of(events[uid]))
        assert validator.is_valid(answer), (uid, answer)
    for uid, adapter in (("free-s", "symptoms"), ("free-base", None)):
        ref = solo_reference(lively_base, store, adapter, question, 12)
        assert text_of(events[uid]) == tokenizer.decode(ref, skip_special_tokens=True), uid


def test_a_schema_that_does_not_compile_fails_its_job_only(lively_base: Path, tmp_path: Path) -> None:
    store = lora_store(lively_base, tmp_path)
    engine = make_engine(lively_base, store)
    tokenizer = load_tokenizer(resolve_base(str(lively_base)))
    ids = prompt_ids(tokenizer, "What is osteitis ?")
    bad = json.dumps({"schema": {"type": "no-such-type"}, "strict": True})
    engine.submit(Job("bad", ids, None, max_tokens=5, grammar=bad))
    engine.submit(Job("good", ids, "symptoms", max_tokens=5, ignore_eos=True))
    events = run_all(engine)
    assert events["bad"][-1].error_kind == "invalid_job" and "schema" in (events["bad"][-1].error or "")
    assert events["good"][-1].finish_reason == "length"


def test_a_mixture_row_generates_what_peft_generates_with_the_weighted_adapter(
    lively_base: Path, tmp_path: Path
) -> None:
    """Through the engine (prefill, prefix cache, decoding steps beside plain rows): a mixture row's greedy tokens
    equal PEFT's `generate` with `add_weighted_adapter(..., combination_type="cat")` of the same adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = lora_store(lively_base, tmp_path / "store")
    weights = {"symptoms": 0.7, "treatment": 0.3}
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(lively_base), str(store.get("symptoms").path), adapter_name="symptoms"
    )
    model.load_adapter(str(store.get("treatment").path), adapter_name="treatment")
    model.add_weighted_adapter(list(weights), list(weights.values()), "mixed", combination_type="cat")
    model.save_pretrained(str(tmp_path / "peft"), selected_adapters=["mixed"])
    question = "What are the treatments for hepatitis ?"
    mixed_ref = peft_reference(lively_base, tmp_path / "peft" / "mixed", question, 16)

    engine = make_engine(lively_base, store, max_batch_size=4)
    tokenizer = load_tokenizer(resolve_base(str(lively_base)))
    ids = prompt_ids(tokenizer, question)
    engine.submit(Job("plain", ids, "symptoms", max_tokens=16, ignore_eos=True))
    engine.submit(Job("mix", ids, None, max_tokens=16, ignore_eos=True, mixture=tuple(weights.items())))
    engine.submit(Job("base", ids, None, max_tokens=8, ignore_eos=True))
    events = run_all(engine)
    assert text_of(events["mix"]) == tokenizer.decode(mixed_ref, skip_special_tokens=True)
    plain_ref = solo_reference(lively_base, store, "symptoms", question, 16)
    assert text_of(events["plain"]) == tokenizer.decode(plain_ref, skip_special_tokens=True)
    assert text_of(events["mix"]) != text_of(events["plain"])  # the mixture is not its largest part
