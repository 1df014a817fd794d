"""Handing freed heap memory back to the system when a worker goes idle."""

from __future__ import annotations

import ctypes
import functools
from typing import Any


def return_freed_memory() -> None:
    """Hand the pages of freed heap memory back to the system (glibc's `malloc_trim`; nothing elsewhere). A batch's
    activations, adapter load buffers and evicted prompt blocks are freed into the allocator's free lists, which
    keep their pages resident: without this, a worker's resident memory follows the most it ever held, not what
    it holds. A few ms; the engine calls it when its last request leaves, never between steps of a batch."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
