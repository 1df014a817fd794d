"""Structured output: the grammar a schema compiles to admits only valid instances, and what it cannot enforce is
refused by name.

Every keyword `structured.SUPPORTED` claims is checked on random walks through its grammar (no model: each step
draws one of the tokens the row's mask allows, on the embedded base's real tokenizer) whose every finished output
must parse and validate against the schema with an independent validator (jsonschema-rs, formats checked too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import pytest
import torch
from conftest import WEATHER

from loraswap.server.api.errors import APIError
from loraswap.server.api.structured import SUPPORTED, Plan, _tool_plan, checked_schema, tool_calls, unsupported
from loraswap.server.jobs import Job
from loraswap.server.worker.failures import InvalidJob
from loraswap.server.worker.grammar import Grammars

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 3, "maximum": 7},
            "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "s": {"type": "string", "minLength": 2, "maxLength": 4},
            "e": {"enum": ["red", "green", 3]},
            "c": {"const": "five"},
            "o": {"type": ["integer", "null"]},
        },
        "required": ["n", "x", "s", "e", "c"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "pattern": "^[a-c]+x$"}], "items": False},
    {
        "$defs": {"p": {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}},
        "anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}],
    },
    {
        "definitions": {"d": {"type": "string", "format": "uuid"}},
        "type": "object",
        "properties": {
            "d": {"$ref": "#/definitions/d"},
            "u": {"type": "string", "format": "uuid"},
        },
        "required": ["d", "u"],
    },
    {"type": "string", "format": "ipv6"},
    {"type": "object", "additionalProperties": {"type": "integer", "minimum": -2, "maximum": 2}, "maxLength": 3},
    {"type": "number", "minimum": -2.5, "maximum": 2.5},
]


@dataclass
class _Row:
    req: Job
    matcher: Any


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    from loraswap.adapters.base import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base("embedded"))
    return Grammars(tokenizer, [tokenizer.eos_token_id], 49152)


@pytest.fixture(scope="module")
def closing(grammars: Grammars) -> torch.Tensor:
    """Per token: 50 if its text closes something (a quote, a brace, a bracket), else 1: walks favour ending."""
    tok = grammars.tokenizer
    return torch.tensor([50.0 if any(c in tok.decode([t]) for c in '"}]') else 1.0 for t in range(len(tok))])


def walk(
    grammars: Grammars, schema: dict[str, Any], weights: torch.Tensor, gen: torch.Generator, grammar: str | None = None
) -> str | None:
    """One random answer under `schema`'s grammar (or `grammar`), or None if it did not end within 150 tokens."""
    job = Job("w", [1], None, grammar=grammar or json.dumps({"schema": schema, "strict": True}))
    row = _Row(job, grammars.start(job))
    eos = grammars.stop_ids[0]
    out: list[int] = []
    for _ in range(150):
        logits = torch.zeros(1, grammars.vocab_size)
        grammars.mask([row], logits)
        allowed = torch.isfinite(logits[0])
        assert allowed.any(), "the grammar allowed no token"
        if allowed[eos]:
            return str(grammars.tokenizer.decode(out))
        w = torch.zeros(grammars.vocab_size)
        w[: len(weights)] = weights
        token = int(torch.multinomial(w * allowed, 1, generator=gen))
        grammars.accept(row, token)
        out.append(token)
    return None


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_every_finished_output_of_a_schemas_grammar_validates(
    grammars: Grammars, closing: torch.Tensor, schema: dict[str, Any]
) -> None:
    checked_schema(schema, "schema")  # within what is claimed enforced (maxLength on an object is a no-op keyword)
    validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    gen = torch.Generator().manual_seed(7)
    finished = [t for t in (walk(grammars, schema, closing, gen) for _ in range(6)) if t is not None]
    assert len(finished) >= 3
    for text in finished:
        assert validator.is_valid(json.loads(text)), text
        # No free whitespace: JSON's own separators only (a small model cannot loop on newlines).
        assert json.dumps(json.loads(text), ensure_ascii=False) == text


def test_the_walks_cover_every_supported_keyword() -> None:
    used: set[str] = set()

    def visit(s: Any) -> None:
        if isinstance(s, dict):
            used.update(s)
            for v in s.values():
                visit(v)
        elif isinstance(s, list):
            for v in s:
                visit(v)

    visit(SCHEMAS)
    assert used | {"properties"} >= SUPPORTED


def test_what_the_grammar_cannot_enforce_is_refused_by_name() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "n": {"type": "integer", "multipleOf": 3},
            "alt": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "w": {"type": "string", "pattern": "^(?=a)\\w+$"},
            "f": {"type": "string", "format": "uuid", "maxLength": 9},
            "day": {"type": "string", "format": "date"},  # its grammar admits February 30th
            "ip": {"type": "string", "format": "ipv4"},  # its grammar admits leading zeros (1.02.3.4)
        },
        "not": {"required": ["x"]},
    }
    found = unsupported(schema)
    for where in ("#: not", "#/properties/tags: uniqueItems", "#/properties/n: multipleOf", "#/properties/alt: oneOf"):
        assert where in found
    assert any(f.startswith("#/properties/w: pattern") for f in found)
    assert any(f.startswith("#/properties/f: minLength/maxLength") for f in found)
    assert any(f.startswith("#/properties/day: format 'date'") for f in found)
    assert any(f.startswith("#/properties/ip: format 'ipv4'") for f in found)
    with pytest.raises(APIError) as e:
        checked_schema(schema, "response_format.json_schema.schema")
    assert e.value.status_code == 400 and "uniqueItems" in str(e.value.detail)
    assert unsupported({"type": "object", "title": "T", "description": "d", "properties": {"a": {"default": 1}}}) == []


def test_a_schema_the_compiler_rejects_fails_its_job_only(grammars: Grammars) -> None:
    job = Job("bad", [1], None, grammar=json.dumps({"schema": {"type": "no-such-type"}, "strict": True}))
    with pytest.raises(InvalidJob, match="schema"):
        grammars.start(job)


def test_tool_choice_auto_holds_every_tagged_call_to_its_schema(grammars: Grammars, closing: torch.Tensor) -> None:
    """Random walks through the "auto" grammar, pushed into the opening tag at once: the call that follows is a
    valid call, and the text is split into content and calls."""
    plan = _tool_plan([WEATHER], "auto")
    assert plan.tagged and plan.grammar
    tok = grammars.tokenizer
    params = jsonschema_rs.validator_for(WEATHER["function"]["parameters"])  # type: ignore[index]
    gen = torch.Generator().manual_seed(5)
    done = 0
    for _ in range(4):
        job = Job("auto", [1], None, grammar=plan.grammar)
        row = _Row(job, grammars.start(job))
        out = tok.encode("Let me check. <tool_call>", add_special_tokens=False)
        for t in out:
            grammars.accept(row, t)
        for _ in range(120):
            logits = torch.zeros(1, grammars.vocab_size)
            grammars.mask([row], logits)
            allowed = torch.isfinite(logits[0])
            if "</tool_call>" in tok.decode(out):
                break
            w = torch.zeros(grammars.vocab_size)
            w[: len(closing)] = closing
            token = int(torch.multinomial(w * allowed, 1, generator=gen))
            grammars.accept(row, token)
            out.append(token)
        text = tok.decode(out)
        if "</tool_call>" not in text:
            continue
        text = text[: text.index("</tool_call>") + len("</tool_call>")]  # the last token may run past the tag
        content, calls = tool_calls(text, plan)
        assert content == "Let me check." and len(calls) == 1
        assert calls[0]["function"]["name"] == "get_weather"
        assert params.is_valid(json.loads(calls[0]["function"]["arguments"]))
        done += 1
    assert done >= 2


def test_text_without_calls_stays_content() -> None:
    plan = Plan("{}", (WEATHER["function"],), tagged=True)  # type: ignore[arg-type]
    assert tool_calls("It is sunny.", plan) == ("It is sunny.", [])
    cut = 'Sure <tool_call>{"name": "get_weather", "argu'
    assert tool_calls(cut, plan) == (cut, [])


def test_json_object_gives_a_json_object(grammars: Grammars, closing: torch.Tensor) -> None:
    """response_format json_object: any object, extra properties allowed (strict off)."""
    from loraswap.server.api.structured import _format_grammar

    grammar = _format_grammar({"type": "json_object"})
    gen = torch.Generator().manual_seed(11)
    finished = [t for t in (walk(grammars, {}, closing, gen, grammar=grammar) for _ in range(6)) if t is not None]
    assert len(finished) >= 3
    assert all(isinstance(json.loads(t), dict) for t in finished)
    assert any(json.loads(t) for t in finished)  # not only {}: the object's properties are free


def test_any_json_as_a_schema_is_answered_never_raised() -> None:
    """Bodies come from anyone: malformed schemas are reported, never an exception (a 500)."""
    import random

    rng = random.Random(3)
    keys = ["type", "properties", "items", "anyOf", "prefixItems", "$defs", "additionalProperties", "enum", "pattern"]

    def junk(depth: int) -> Any:
        kind = rng.randrange(6 if depth < 4 else 4)
        if kind == 0:
            return rng.choice([None, True, False, 0, 1.5, "x", "(?=a)"])
        if kind in (1, 2, 3):
            return rng.choice([[], {}, "string", 7])
        if kind == 4:
            return [junk(depth + 1) for _ in range(rng.randrange(3))]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randrange(4))}

    for _ in range(500):
        assert isinstance(unsupported(junk(0)), list)


def test_an_auto_answer_streams_its_text_and_holds_its_calls() -> None:
    from loraswap.server.api.structured import CallStream

    plan = _tool_plan([WEATHER], "auto")
    s = CallStream(plan)
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}'
    sent = [s.feed(p) for p in ["Checking", " <to", "ol_call>", call, "</tool_call>", " done"]]
    assert sent == ["Checking", " ", "", "", "", ""]  # "<to" held back: it could open a call
    content, calls = s.finish("stop")
    assert content == "done" and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    plain = CallStream(plan)
    assert [plain.feed(p) for p in ["a <to", "m> b"]] == ["a ", "<tom> b"]  # not a tag after all
    assert plain.finish("stop") == (None, [])
    cut = CallStream(plan)
    cut.feed('x <tool_call>{"name": "get_w')
    assert cut.finish("length") == ('<tool_call>{"name": "get_w', [])  # cut short: the raw text, no call
    forced = CallStream(_tool_plan([WEATHER], "required"))
    assert forced.feed(call) == "" and forced.finish("stop")[0] is None


def test_tools_with_nested_models_keep_their_references(grammars: Grammars, closing: torch.Tensor) -> None:
    """A pydantic model with a nested one has `$defs` and references to them; inside the call's schema they are
    moved to its root (each tool's under its own prefix) and the references follow."""
    from pydantic import BaseModel

    class Place(BaseModel):
        city: str

    class Trip(BaseModel):
        start: Place
        end: Place

    visit = {"type": "object", "$defs": {"Place": {"type": "integer"}}, "properties": {"p": {"$ref": "#/$defs/Place"}}}
    tools = [
        {"type": "function", "function": {"name": "plan_trip", "parameters": Trip.model_json_schema()}},
        {"type": "function", "function": {"name": "visit", "parameters": visit}},
    ]
    plan = _tool_plan(tools, "required")
    assert plan.grammar
    schema = json.loads(plan.grammar)["schema"]
    validator = jsonschema_rs.validator_for(schema)
    good = {"name": "plan_trip", "arguments": {"start": {"city": "Oslo"}, "end": {"city": "Paris"}}}
    assert validator.is_valid(good)
    assert not validator.is_valid({"name": "plan_trip", "arguments": {"start": {"city": 3}, "end": {"city": "P"}}})
    assert validator.is_valid({"name": "visit", "arguments": {"p": 4}})  # the other tool's Place: no clash
    gen = torch.Generator().manual_seed(2)
    walks = [walk(grammars, schema, closing, gen, grammar=plan.grammar) for _ in range(4)]
    finished = [json.loads(t) for t in walks if t is not None]
    assert finished and all(validator.is_valid(v) for v in finished)
    with pytest.raises(APIError) as e:
        _tool_plan(
            [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/properties/x"}}}], "required"
        )
    assert e.value.status_code == 400
