"""The HTTP contract: request bodies, and the shapes of responses and streams.

Requests are validated here, in the API process, before anything is queued for a worker: a bad
request is answered with a 4xx of its own and never reaches (or fails) a batch.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from loraswap.server.api.errors import APIError, from_event, from_validation
from loraswap.server.jobs import FinishReason, JobEvent

M = TypeVar("M", bound=BaseModel)


def check_stops(v: str | list[str] | None) -> str | list[str] | None:
    """OpenAI's `stop`: a string or up to 4 non-empty strings."""
    stops = [v] if isinstance(v, str) else v or []
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop takes up to 4 non-empty strings")
    return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls: written into its text as the model writes them, in tags."""

    def text(self) -> str:
        if isinstance(self.content, list):
            text = "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        else:
            text = self.content or ""
        for call in self.tool_calls or []:
            fn: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
            args = fn.get("arguments", "{}")
            with contextlib.suppress(ValueError):  # OpenAI sends arguments as a JSON string; others stay as sent
                args = json.loads(args) if isinstance(args, str) else args
            text += "<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args}) + "</tool_call>"
        return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's extension: every chunk also carries its choice's usage so far (/v1/chat/completions, /v1/completions)."""


def usage_so_far(ev: JobEvent) -> dict[str, int]:
    """A choice's usage at `ev` (continuous_usage_stats)."""
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


class _Sampling(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI's API does.
    model_config = ConfigDict(extra="ignore")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    ignore_eos: bool = False
    """Keep generating past the end of the answer until max_tokens (vLLM's extension; for benchmarks)."""


# ---- structured output, tools and adapter mixtures ------------------------------------------------------------
# OpenAI's `response_format`, `tools` and `tool_choice`, checked in `structured.py` (which says what is refused and
# why), and loraswap's `adapters` extension: adapters summed per request with their scales, in the spirit of
# llama.cpp's per-request `lora` list (`mixtures.py`).


class AdapterScale(BaseModel):
    """One adapter of a request's mixture, and the weight of its LoRA delta."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


class _OutputShape(BaseModel):
    response_format: dict[str, Any] | None = None
    """{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {name, schema, strict}}."""
    tools: list[dict[str, Any]] | None = None
    """Functions the answer may call: [{"type": "function", "function": {name, description, parameters}}]."""
    tool_choice: str | dict[str, Any] | None = None
    """"none", "required", or {"type": "function", "function": {"name": ...}}."""
    adapters: list[AdapterScale] | None = Field(default=None, min_length=1)
    """loraswap's extension: the adapters whose deltas this request sums, with their scales (`model`: the base)."""


class ChatRequest(_Sampling, _OutputShape):
    model: str = Field(examples=["base"])
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stream_options: StreamOptions | None = None
    # ---- the OpenAI surface: choices, log-probabilities, the field audit (routes/chat.py) ----
    model_config = ConfigDict(extra="allow")  # undeclared fields are kept for `audit.refuse_unsupported`, then ignored
    n: int = Field(default=1, ge=1, le=128)
    """Choices, each sampled on its own (seed + index when a seed is given); they share the prompt's prefill."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    return_tokens_as_token_ids: bool = False
    """vLLM's extension: logprobs name each token "token_id:N" instead of its text."""
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias in [-100, 100], added to the logits (`audit.logit_bias` checks it)."""
    user: str | None = None
    """Ignored: changes nothing served (as metadata, store, service_tier: undeclared, ignored)."""

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    # ---- end of the OpenAI surface block ----

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        return check_stops(v)

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AnswerRequest(_Sampling):
    adapter: str | dict[str, float] = Field(examples=["base", "auto", {"symptoms": 0.7, "treatment": 0.3}])
    """An adapter's name, "base", "auto" (the qtype router), or a mixture: adapter names and their weights."""
    route: Literal["hard", "soft"] = "hard"
    """With "auto": "hard" serves the router's qtype's adapter; "soft" mixes the top qtypes' adapters, weighted by
    the router's probabilities."""
    question: str = Field(min_length=1, examples=["What are the symptoms of asthma?"])
    max_tokens: int | None = Field(default=256, ge=1)


async def read_body(request: Request, model: type[M], max_bytes: int) -> M:
    """The request's JSON body as `model`: 413 over `max_bytes`, 400 for invalid JSON or a bad field."""
    raw = await request.body()
    if len(raw) > max_bytes:
        raise APIError(
            413, f"request body is {len(raw)} bytes, too large; the limit is {max_bytes}", code="payload_too_large"
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise APIError(400, f"body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e.errors()) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def finish_reason(reason: FinishReason) -> Literal["stop", "length"]:
    """OpenAI's finish_reason for a job's: "length" when it reached max_tokens, else "stop"."""
    return "length" if reason == "length" else "stop"


def usage(ev: JobEvent) -> dict[str, Any]:
    """OpenAI's usage object from a job's last event; cached_tokens: prompt tokens served by the prefix cache."""
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": ev.cached_tokens},
    }


def chat_chunk(cid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def chat_completion(cid: str, model: str, text: str, finish: str, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": use,
    }


Build = Callable[[str, str, dict[str, Any]], dict[str, Any]]
"""A complete (non-streamed) response from the answer's text, its finish_reason and usage."""


async def collect(events: AsyncIterator[JobEvent], build: Build) -> Response:
    """A job's events gathered into one JSON response (`build` shapes it), or the error it ended with."""
    parts: list[str] = []
    try:
        async for ev in events:
            if ev.error:
                return from_event(ev).response()
            parts.append(ev.text)
            if ev.finish_reason:
                return JSONResponse(build("".join(parts), finish_reason(ev.finish_reason), usage(ev)))
    except APIError as e:
        return e.response()
    return APIError(500, "generation ended without a result").response()
