"""What crosses LitServe's queues between the API process and a worker: a `Job` going in, `JobEvent`s coming back.

No torch and no HTTP here: both sides import this module, and it is the whole of their contract. The API process
validates a request, builds a `Job` and puts it on the request queue; the worker's engine answers with one
`JobEvent` per step that produced something for it. A failure is described by its `ErrorKind`; the API process
alone turns a kind into an HTTP status (`server/api/errors.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from loraswap.adapters.manifest import BASE

__all__ = ["BASE", "ErrorKind", "FinishReason", "Job", "JobEvent", "TokenLogprob", "failed"]

FinishReason = Literal["stop", "length", "cancelled", "error"]

ErrorKind = Literal["adapter_not_found", "invalid_job", "generation_failed", "worker_lost"]
"""Why a job failed: its adapter left the store after the job was accepted; the job does not fit the engine (an
empty prompt, a prompt over the context: the API process checks both first); the forward pass failed; or the
worker process running it died."""


@dataclass(frozen=True)
class Job:
    """One generation request, validated by the API process."""

    uid: str
    """Unique per request: the engine's handle for it, and the key a cancel names."""
    prompt_ids: list[int]
    adapter: str | None
    """Store name of the adapter, or None for the base model."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # ---- OpenAI's logprobs, echo, penalties and logit_bias: server/worker/logprobs.py, penalties.py ----
    logprobs: int | None = None
    """Return each generated token's log-probability and its `logprobs` most likely alternatives (None: none)."""
    prompt_logprobs: int | None = None
    """Score the prompt too (echo): each prompt token's log-probability given the tokens before it (the first has
    none), with this many alternatives; None: the prompt is not scored."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits (`server/worker/penalties.py`, with the penalties)."""

    # ---- structured output and adapter mixtures (response_format, tools, adapters) ----
    grammar: str | None = None
    """A constraint on the output, as JSON: {"schema": <JSON Schema>, "strict": bool}, or {"structural_tag": ...}
    (xgrammar's: free text in which tagged tool calls follow a schema); the worker compiles it and masks each step's
    logits to the tokens it allows (`server/worker/grammar.py`). None: free text."""
    mixture: tuple[tuple[str, float], ...] = ()
    """Adapters (store names) whose LoRA deltas this row sums, each times its weight; set instead of `adapter`
    (`server/worker/mixing.py`)."""


TokenLogprob = dict[str, Any]
"""One token's log-probability, as plain data: {"id": token id, "logprob": float, "top": [[id, logprob], ...] (the
most likely tokens at that position, best first)}, and "end": true for a stop token that ended the job (its text is
not in the answer)."""


@dataclass(frozen=True)
class JobEvent:
    """What happened to one job in one engine step: new text, and the finish reason once it is done."""

    uid: str
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    """With finish_reason "error": what went wrong, for the client."""
    error_kind: ErrorKind | None = None
    """With `error`: its kind, which the API process maps to an HTTP status."""
    batch: int = 0
    """Rows in the decoding step that produced this event."""
    waiting: int = 0
    """Jobs queued behind the running batch at that step."""
    loaded: int = 0
    """Adapters loaded in this engine."""
    load_ms: float | None = None
    """Set on a job's first event when its adapter had to be loaded for it."""
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (reported as OpenAI's cached_tokens)."""
    loaded_names: tuple[str, ...] | None = None
    """On a job's last event: the adapters this engine has loaded."""
    worker: int = 0
    """Process id of the engine's worker."""
    prompt_cache_bytes: int = 0
    """Keys and values the engine's prefix cache holds (its cached prompt blocks), in bytes."""
    # ---- log-probabilities (Job.logprobs, Job.prompt_logprobs) ----
    logprobs: list[TokenLogprob] | None = None
    """The tokens generated since the job's last event, with their log-probabilities (when the job asked)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """On the job's first event, when it asked: every prompt token's, None for the first."""

    def to_wire(self) -> dict[str, Any]:
        """The event as plain data (LitServe may serialise what a worker streams back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> JobEvent:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        if isinstance(values.get("loaded_names"), list):
            values["loaded_names"] = tuple(values["loaded_names"])
        return cls(**values)


def failed(uid: str, message: str, kind: ErrorKind, prompt_tokens: int = 0, completion_tokens: int = 0) -> JobEvent:
    """The last event of a job that failed."""
    return JobEvent(uid, "", "error", prompt_tokens, completion_tokens, error=message, error_kind=kind)
