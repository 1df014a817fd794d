"""The HTTP contract: request bodies, responses and errors in the OpenAI shape.

Requests are validated here, in the API process, before anything is queued for a worker: a bad
request is answered with a 4xx of its own and never reaches (or fails) a batch.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import uuid
from typing import Any, Literal

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ErrorType = Literal[
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error", "server_error"
]


@functools.cache
def _server_paths() -> re.Pattern[str]:
    """Absolute paths under any top-level folder of this machine ("/home/...", "/tmp/...", "/usr/...")."""
    try:
        tops = sorted((d for d in os.listdir("/") if re.fullmatch(r"[\w.-]+", d)), key=len, reverse=True)
    except OSError:
        tops = ["home", "tmp", "usr", "var", "root", "opt", "etc", "srv", "mnt"]
    return re.compile(r"(?<![\w/.:-])/(?:" + "|".join(map(re.escape, tops)) + r")(?=/|\b)(?:/[^\s'\",;()\[\]{}<>]*)*")


def scrub_paths(message: str) -> str:
    """`message` without file-system paths of the server: each is cut to its last part (the file name), which
    says what is wrong without telling a client how the server's disks are laid out."""
    return _server_paths().sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "<path>", message)


def error_type(status: int) -> ErrorType:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )  # type: ignore[return-value]


class APIError(HTTPException):
    """An error with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}. Messages never
    carry the server's file-system paths."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: ErrorType | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        message = scrub_paths(message)
        super().__init__(status_code=status, detail=message)
        self.body = {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code)


def from_validation(e: ValidationError) -> APIError:
    """400 naming the first field at fault."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI's API does.
    model_config = ConfigDict(extra="ignore")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    ignore_eos: bool = False
    """Keep generating past the end of the answer until max_tokens (vLLM's extension; for benchmarks)."""


class ChatRequest(_Sampling):
    model: str = Field(examples=["base"])
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = 1
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AnswerRequest(_Sampling):
    adapter: str = Field(examples=["base", "auto"])
    question: str = Field(min_length=1, examples=["What are the symptoms of asthma?"])
    max_tokens: int | None = Field(default=256, ge=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def usage(ev: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage object from a request's last event; cached_tokens: prompt tokens served by the prefix cache."""
    prompt, completion = int(ev["prompt_tokens"]), int(ev["completion_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(ev.get("cached_tokens") or 0)},
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
