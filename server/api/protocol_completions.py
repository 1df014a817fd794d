"""The legacy completions contract (POST /v1/completions, as OpenAI and vLLM serve it): the request body, and the
shapes of its responses and stream chunks."""

from __future__ import annotations

import time
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from loraswap.server.api.protocol import StreamOptions, _Sampling, check_stops

MAX_CHOICES = 128
"""The most choices one request may ask for (prompts times n), as OpenAI's n allows."""


class CompletionRequest(_Sampling):
    # Undeclared fields are kept for the field audit (`audit.refuse_unsupported`), then ignored.
    model_config = ConfigDict(extra="allow")
    model: str = Field(examples=["base"])
    prompt: str | list[str] | list[int] | list[list[int]] = Field(examples=["The symptoms of asthma are"])
    """Raw text (no chat template): a string, a list of strings, token ids, or a list of token id lists."""
    max_tokens: int | None = Field(default=16, ge=0)
    """0 with echo: score the prompt only."""
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Ignored: changes nothing served."""
    return_tokens_as_token_ids: bool = False
    """vLLM's extension: logprobs name each token "token_id:N" instead of its text."""
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias in [-100, 100], added to the logits (`audit.logit_bias` checks it)."""

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        items = v if isinstance(v, list) and v and not isinstance(v[0], int) else [v]
        if not items or any(len(p) == 0 for p in items):
            raise ValueError("prompt must not be empty (nor hold an empty prompt)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        return check_stops(v)

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and self.runs() > self.n:
            raise ValueError("best_of greater than n cannot be streamed: the best choices are known only at the end")
        return self

    def runs(self) -> int:
        """Completions generated per prompt: best_of (the n best are returned), else n."""
        return self.best_of or self.n

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return p  # type: ignore[return-value]

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def completion_chunk(
    cid: str, model: str, created: int, index: int, text: str, logprobs: Any, finish: str | None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def completion(cid: str, model: str, choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }
