"""Which adapters are loaded: an LRU set bounded by count and bytes, with in-flight reference counts.

Pure bookkeeping, no torch: the engine asks `plan_load` what to evict before it loads an adapter,
and evicts only what the plan names. An adapter with running requests is never chosen for eviction;
when every loaded adapter is busy, `plan_load` says so instead of evicting one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class CacheFull(RuntimeError):
    """No room: every loaded adapter is in use by a running request."""


@dataclass
class AdapterLRU:
    max_count: int
    max_bytes: int
    _sizes: OrderedDict[str, int] = field(default_factory=OrderedDict)  # least recently used first
    _refs: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1:
            raise ValueError(f"max_count ({self.max_count}) and max_bytes ({self.max_bytes}) must be positive")

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def names(self) -> list[str]:
        return list(self._sizes)

    def touch(self, name: str) -> None:
        self._sizes.move_to_end(name)

    def plan_load(self, name: str, size: int) -> list[str]:
        """The adapters to evict (least recently used first) so that `name` of `size` bytes fits."""
        if size > self.max_bytes:
            raise CacheFull(f"adapter {name!r} is {size} bytes; the cache holds at most {self.max_bytes}")
        count, total, evict = len(self._sizes), self.bytes, []
        for other, other_size in self._sizes.items():
            if count < self.max_count and total + size <= self.max_bytes:
                break
            if self._refs.get(other, 0) == 0:
                evict.append(other)
                count -= 1
                total -= other_size
        if count >= self.max_count or total + size > self.max_bytes:
            raise CacheFull(f"cannot load adapter {name!r}: all {len(self._sizes)} loaded adapters are in use")
        return evict

    def added(self, name: str, size: int) -> None:
        self._sizes[name] = size
        self._sizes.move_to_end(name)

    def removed(self, name: str) -> None:
        if self._refs.get(name, 0):
            raise RuntimeError(f"adapter {name!r} has {self._refs[name]} running request(s); it cannot be removed")
        self._sizes.pop(name, None)

    def acquire(self, name: str) -> None:
        if name not in self._sizes:
            raise KeyError(name)
        self._refs[name] = self._refs.get(name, 0) + 1
        self.touch(name)

    def release(self, name: str) -> None:
        left = self._refs.get(name, 0) - 1
        if left < 0:
            raise RuntimeError(f"adapter {name!r} released more often than acquired")
        if left:
            self._refs[name] = left
        else:
            self._refs.pop(name, None)

    def in_use(self, name: str) -> int:
        return self._refs.get(name, 0)
