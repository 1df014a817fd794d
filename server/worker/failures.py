"""How a job fails in a worker: the `ErrorKind` of each failure, and the one message of a failed forward.

No torch here: the worker's LitServe API (`api.py`) is also imported by the API process.
"""

from __future__ import annotations

from loraswap.adapters.manifest import AdapterNotFound
from loraswap.server.jobs import ErrorKind


class InvalidJob(ValueError):
    """A job the engine cannot run: an empty prompt, or one over the context (the API process checks both first)."""


def failure_kind(e: Exception) -> ErrorKind:
    """The kind of a job's failure before its forward: its adapter is no longer in the store, the job does not fit
    the engine, or its adapter could not be loaded."""
    if isinstance(e, AdapterNotFound):
        return "adapter_not_found"
    if isinstance(e, InvalidJob):
        return "invalid_job"
    return "generation_failed"


def forward_failed(e: BaseException) -> str:
    """The message of every job a failed forward ends (kind "generation_failed"; the traceback goes to the log):
    the exception's type and the first line of its message."""
    detail = str(e).strip().splitlines()
    return f"generation failed: {type(e).__name__}" + (f": {detail[0]}" if detail else "")
