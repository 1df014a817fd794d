"""The running batch: its rows, their batched KV cache and attention mask, kept in step as rows join and leave.

The KV cache is one batched `DynamicCache`, left-padded: rows joining are padded to the common length and
concatenated, rows leaving are dropped, and columns that are padding in every row are trimmed; its layers keep
spare columns, so a decoding step writes in place (`kvcache.py`). Row i of `rows` is row i of the cache and of the
mask, always: every change of rows here changes all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loraswap.server.jobs import Job
from loraswap.server.worker.kvcache import concat_rows, keep_rows


@dataclass
class Row:
    """One running job and what the engine keeps for it between steps."""

    req: Job
    key: str
    """The loaded adapter's key (`residency.py`), or BASE."""
    generator: torch.Generator | None
    """A sampling job's own random generator (None: greedy)."""
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    """Characters of decoded text already sent."""
    real_len: int = 0
    """Tokens of this row held in the cache (virtual tokens and past keys included)."""
    next_token: int = -1
    load_ms: float | None = None
    """Set until the row's first event when its adapter was loaded for it."""
    cached: int = 0
    """Leading prompt tokens taken from the prefix cache."""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    """Log-probabilities of generated tokens not yet sent (`logprobs.py`)."""
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    """The prompt's log-probabilities until the row's first event carries them (`logprobs.py`)."""
    matcher: Any = None
    """A constrained job's grammar matcher (`grammar.py`); None for free text."""


class Batch:
    """The running rows (decoder-only bases), in the order of their rows in `cache` and `mask`."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        """`capacity`: the most rows the batch holds (the cache's buffers are made for as many)."""
        self.device = device
        self.capacity = capacity
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        """[rows, cache columns], 1 where the cache holds a real token."""

    def join(self, rows: list[Row], cache: Any, mask: torch.Tensor) -> None:
        """Add `rows`, with the cache and mask of their prefill, below the running rows."""
        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, mask
        else:
            assert self.mask is not None
            width = max(self.mask.shape[1], mask.shape[1])
            concat_rows(self.cache, cache, width, capacity=self.capacity)
            self.mask = torch.cat([left_pad_mask(self.mask, width), left_pad_mask(mask, width)], dim=0)
        self.rows += rows

    def reorder(self, order: list[int]) -> None:
        """Put the rows in `order` (new position -> old position)."""
        assert self.mask is not None
        index = torch.tensor(order, dtype=torch.long)
        self.rows = [self.rows[i] for i in order]
        self.mask = self.mask[index]
        keep_rows(self.cache, index.to(self.device), 0)

    def retire(self, finished: list[Row]) -> None:
        """Drop the `finished` rows, and the columns that are then padding in every remaining row."""
        index = self.drop(finished)
        if index is None:
            return
        assert self.mask is not None
        self.mask = self.mask[index]
        first = int(self.mask.any(dim=0).long().argmax())
        self.mask = self.mask[:, first:]
        keep_rows(self.cache, index.to(self.device), first)

    def drop(self, finished: list[Row]) -> torch.Tensor | None:
        """Drop the `finished` rows from `rows`; returns the old index of each remaining row in its new place, or
        None (and no batch state) when none remain. Each gap a finished row leaves is filled by a remaining row from
        the end, so the cache copies only the rows that move."""
        gone = {id(r) for r in finished}
        left = len(self.rows) - len(gone)
        order = list(range(left))
        gaps = [i for i in range(left) if id(self.rows[i]) in gone]
        tail = [j for j in range(left, len(self.rows)) if id(self.rows[j]) not in gone]
        for i, j in zip(gaps, tail, strict=True):
            order[i] = j
        self.rows = [self.rows[i] for i in order]
        if not self.rows:
            self.clear()
            return None
        return torch.tensor(order, dtype=torch.long)

    def clear(self) -> None:
        """No rows, no cache."""
        self.rows, self.cache, self.mask = [], None, None


def front_first(front: list[bool]) -> list[int]:
    """An order of rows (new position -> old position) with the rows marked True in front, moving as few rows as
    possible: each marked row behind the front region trades places with an unmarked row inside it."""
    k = sum(front)
    order = list(range(len(front)))
    inside = [i for i in range(k) if not front[i]]
    behind = [j for j in range(k, len(front)) if front[j]]
    for i, j in zip(inside, behind, strict=True):
        order[i], order[j] = j, i
    return order


def left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, columns] -> [rows, width] with zeros in front."""
    pad = width - m.shape[1]
    return m if pad == 0 else torch.cat([m.new_zeros(m.shape[0], pad), m], dim=1)
