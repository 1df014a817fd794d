"""Automatic prefix caching: the keys and values of prompt blocks that earlier requests computed.

Every prompt of loraswap's format starts with the same rendered system turn (24 of the 34-39 tokens
of a typical question on the embedded base), so most of each prefill would recompute what the
previous request computed. As vLLM's automatic prefix caching does, prompts are cut into blocks of `block`
tokens; the cache keeps each block's keys and values under the adapter and every token up to the
block's end, so a block is reused only behind exactly the same tokens and only by the same weights
(a LoRA on v_proj, k_proj or anything before them changes the keys and values). A new request reuses
its longest run of cached leading blocks and prefills only the rest; the block that holds the
prompt's last token is never reused, so every prefill computes at least one token's logits.

Blocks are bounded by bytes and evicted least recently used first; the blocks of an unloaded
adapter are dropped with it. Pure bookkeeping over tensors the engine hands in: the engine decides
which rows may use the cache (not prompt or prefix tuning rows, whose caches hold virtual tokens).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

KV = tuple[torch.Tensor, torch.Tensor]
"""Keys and values of a run of tokens for every layer: two tensors of [layers, kv heads, tokens, head dim]."""


class PrefixCache:
    def __init__(self, block: int, max_bytes: int) -> None:
        """Blocks of `block` tokens, at most `max_bytes` of keys and values in all (the engine's default:
        `settings.PREFIX_CACHE_BYTES`)."""
        if block < 1 or max_bytes < 1:
            raise ValueError(f"block ({block}) and max_bytes ({max_bytes}) must be positive")
        self.block = block
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[tuple[str, tuple[int, ...]], KV] = OrderedDict()  # least recently used first
        self.hit_tokens = 0
        """Prompt tokens served from the cache, since start."""
        self.prompt_tokens = 0
        """Prompt tokens of the requests that asked the cache, since start."""

    def __len__(self) -> int:
        return len(self._blocks)

    def reusable_blocks(self, prompt: Sequence[int]) -> int:
        """Blocks of `prompt` that end before its last token."""
        return (len(prompt) - 1) // self.block

    def lookup(self, key: str, prompt: Sequence[int]) -> tuple[int, KV | None]:
        """How many leading tokens of `prompt` are cached for adapter `key`, and their keys and values."""
        found: list[KV] = []
        names = []
        for b in range(self.reusable_blocks(prompt)):
            name = (key, tuple(prompt[: (b + 1) * self.block]))
            entry = self._blocks.get(name)
            if entry is None:
                break
            found.append(entry)
            names.append(name)
        self._touch(names)
        self.prompt_tokens += len(prompt)
        if not found:
            return 0, None
        tokens = len(found) * self.block
        self.hit_tokens += tokens
        if len(found) == 1:
            return tokens, found[0]
        return tokens, (torch.cat([k for k, _ in found], dim=2), torch.cat([v for _, v in found], dim=2))

    def store(self, key: str, prompt: Sequence[int], start: int, kv: Callable[[int, int], KV]) -> None:
        """Keep the blocks of `prompt` from token `start` (a block boundary) on that end before its last token.
        `kv(t0, t1)` returns the keys and values of prompt tokens t0..t1-1 as the prefill computed them."""
        first, end = start // self.block, self.reusable_blocks(prompt)
        if first >= end:
            return
        keys, values = kv(first * self.block, end * self.block)
        names = [(key, tuple(prompt[: (b + 1) * self.block])) for b in range(end)]
        for b in range(first, end):
            if names[b] in self._blocks:
                continue
            lo, hi = (b - first) * self.block, (b - first + 1) * self.block
            entry = (keys[:, :, lo:hi].clone(), values[:, :, lo:hi].clone())
            self._blocks[names[b]] = entry
            self.bytes += entry[0].nbytes + entry[1].nbytes
        self._touch([n for n in names if n in self._blocks])
        while self.bytes > self.max_bytes and self._blocks:
            _, (k, v) = self._blocks.popitem(last=False)
            self.bytes -= k.nbytes + v.nbytes

    def _touch(self, names: list[tuple[str, tuple[int, ...]]]) -> None:
        """Mark a run of blocks used, its first block most recently: eviction takes a run's later blocks
        first, which no other run needs to reach its own."""
        for name in reversed(names):
            self._blocks.move_to_end(name)

    def drop(self, key: str) -> None:
        """Forget every block of adapter `key` (it was unloaded)."""
        for name in [n for n in self._blocks if n[0] == key]:
            k, v = self._blocks.pop(name)
            self.bytes -= k.nbytes + v.nbytes
