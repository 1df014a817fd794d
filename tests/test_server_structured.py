"""Structured output, tools and adapter mixtures through the real server, with clients nobody here wrote: the
official openai client's `chat.completions.parse` with a pydantic model, LangChain's `with_structured_output`, tool
calls, the refusals, and mixtures on /v1/answer and the OpenAI route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema_rs
import pytest
from conftest import WEATHER, qa_rows, random_lora_adapter
from pydantic import BaseModel, Field

from loraswap.bench.launch import launch, stop
from loraswap.train.data import QA
from loraswap.train.router import train_router

ASK = [{"role": "user", "content": "How bad is a mild fever?"}]


class Finding(BaseModel):
    severity: Literal["mild", "severe"]
    days: int = Field(ge=0, le=9)
    urgent: bool


CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def url(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("structured-store")
    random_lora_adapter(lively_base, store, "symptoms", seed=1, qtype="symptoms")
    random_lora_adapter(lively_base, store, "treatment", seed=2, qtype="treatment")
    train_router([QA(*r) for r in qa_rows()], min_rows=1).save(store / "router.json")
    proc, base_url = launch(str(lively_base), store, quant="none", max_batch_size=8, timeout=120)
    yield base_url
    stop(proc)


def test_openai_parse_with_a_pydantic_model(url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for model in ("treatment", "base"):
        done = client.chat.completions.parse(model=model, messages=ASK, response_format=Finding, max_tokens=60)
        assert done.choices[0].finish_reason == "stop"
        assert isinstance(done.choices[0].message.parsed, Finding)


def test_langchain_with_structured_output_gets_a_valid_object(url: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="symptoms", base_url=f"{url}/v1", api_key="unused", max_tokens=200, temperature=0)
    for method in ("json_schema", "function_calling"):  # response_format, then a named tool
        result = llm.with_structured_output(Finding, method=method).invoke("How bad is a mild fever?")
        assert isinstance(result, Finding), method


def test_constrained_and_free_requests_at_once_with_mixtures(url: str) -> None:
    schema = Finding.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "finding", "schema": schema, "strict": True}}
    bodies: list[dict[str, Any]] = [
        {"model": "symptoms", "messages": ASK, "max_tokens": 60, "response_format": fmt},
        {"model": "treatment", "messages": ASK, "max_tokens": 10},
        {
            "model": "base",
            "messages": ASK,
            "max_tokens": 60,
            "response_format": fmt,
            "adapters": [{"name": "symptoms", "scale": 0.7}, {"name": "treatment", "scale": 0.3}],
        },
        {"model": "base", "messages": ASK, "max_tokens": 10, "adapters": [{"name": "treatment", "scale": 0.5}]},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/chat/completions", json=b, timeout=120), bodies))
    validator = jsonschema_rs.validator_for(schema)
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if "response_format" in body:
            assert choice["finish_reason"] == "stop"
            assert validator.is_valid(json.loads(choice["message"]["content"]))
        else:
            assert choice["message"]["content"]


def test_tools_come_back_as_tool_calls(url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    params = WEATHER["function"]["parameters"]  # type: ignore[index]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        done = client.chat.completions.create(
            model="symptoms",
            messages=ASK,
            tools=[WEATHER, CLOCK],
            tool_choice=choice,
            max_tokens=200,  # type: ignore[arg-type, list-item]
        )
        c = done.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        call = c.message.tool_calls[0]  # type: ignore[index]
        assert call.type == "function" and call.id.startswith("call")
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"  # type: ignore[union-attr]
        if call.function.name == "get_weather":  # type: ignore[union-attr]
            assert jsonschema_rs.is_valid(params, json.loads(call.function.arguments))  # type: ignore[union-attr]
    # Streamed: the call comes whole in one chunk, then finish_reason "tool_calls".
    stream = client.chat.completions.create(
        model="treatment",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=200,
        stream=True,  # type: ignore[list-item]
    )
    chunks = list(stream)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the tools are ignored, the answer is text.
    plain = client.chat.completions.create(
        model="symptoms",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=5,  # type: ignore[list-item]
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")


def test_an_agent_turn_with_calls_and_a_tool_result_is_accepted(url: str) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "base", "messages": messages, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_tool_choice_auto_lets_the_model_write_text_or_calls(url: str) -> None:
    """The default with tools: free text, calls in tags held to their schemas. The tiny random model answers in text
    (whether it calls is its choice); the tagged path itself is checked on grammar walks (test_structured.py)."""
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "symptoms", "messages": ASK, "tools": [WEATHER], "max_tokens": 8, "ignore_eos": False},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    else:
        assert choice["message"]["content"] and "tool_calls" not in choice["message"]
        # Streamed, the same (greedy) answer's text comes as it is generated, in several chunks.
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="symptoms",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            max_tokens=8,
            stream=True,
        )
        pieces = [ch.choices[0].delta.content for ch in stream if ch.choices and ch.choices[0].delta.content]
        assert "".join(pieces) == choice["message"]["content"] and len(pieces) > 1


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "t", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
            "unsupported_schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema",
            None,
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", None),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
                "tool_choice": "required",
            },
            "tools[0].parameters",
            "unsupported_schema",
        ),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", None),
        ({"model": "symptoms", "adapters": [{"name": "treatment"}]}, "model", None),
        ({"adapters": [{"name": "treatment"}, {"name": "treatment"}]}, "adapters", None),
        ({"adapters": [{"name": "treatment", "scale": 9}]}, "adapters.0.scale", None),
    ],
)
def test_what_cannot_be_honoured_is_refused(url: str, body: dict[str, Any], param: str, code: str | None) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "base", "messages": ASK, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if code:
        assert error["code"] == code


def test_mixtures_on_the_answer_route(url: str) -> None:
    q = "What are the symptoms of carditis ?"
    r = httpx.post(f"{url}/v1/answer", json={"adapter": {"symptoms": 0.7, "treatment": 0.3}, "question": q,
                                                "max_tokens": 6, "ignore_eos": True}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == {"symptoms": 0.7, "treatment": 0.3} and r.json()["usage"]["completion_tokens"] == 6
    soft = httpx.post(f"{url}/v1/answer", json={"adapter": "auto", "route": "soft", "question": q, "max_tokens": 4},
                      timeout=60).json()  # fmt: skip
    mix = soft["routed"]["mixture"]
    assert soft["routed"]["route"] == "soft" and mix[0]["qtype"] == soft["routed"]["qtype"]
    assert abs(sum(m["weight"] for m in mix) - 1) < 1e-3
    soft_named = httpx.post(f"{url}/v1/answer", json={"adapter": "symptoms", "route": "soft", "question": q})
    assert soft_named.status_code == 400 and soft_named.json()["error"]["param"] == "route"
    missing = httpx.post(f"{url}/v1/answer", json={"adapter": {"symptoms": 0.5, "nope": 0.5}, "question": q})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "adapter"
