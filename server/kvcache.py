"""The engine's batched KV cache: transformers' `DynamicCache` whose full-attention layers keep spare columns.

`DynamicLayer.update` appends a step's keys and values with `torch.cat`, which copies the whole cache of
the layer at every decoding step: at 16 rows of about 230 tokens that copy was about a sixth of a step's
CPU time (21 of 134 ms, one thread, `torch.profiler`). A `RoomyLayer` keeps its keys and values as views
of larger buffers and writes a step's token into the next free column; the buffers are reallocated only
when full (with `ROOM` spare columns), or rebuilt when rows join or leave the batch (`concat_rows`,
`keep_rows`), which copied the cache before as well.

Columns outside a view are never read. Padding columns inside it are zeros (masked out; never garbage, as a
masked NaN would still poison attention's weighted sum).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 32
"""Spare columns a buffer gets when it is (re)allocated: one full copy per ROOM decoding steps."""


class RoomyLayer(DynamicLayer):
    """A full-attention cache layer whose `keys` and `values` are views of buffers with room to grow."""

    def _set(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
        self._kbuf, self._vbuf = kbuf, vbuf
        self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]
        self._views = (self.keys, self.values)

    def _owned(self) -> bool:
        """Whether `keys`/`values` are still this layer's views (code may assign plain tensors to them)."""
        views = getattr(self, "_views", None)
        return views is not None and views[0] is self.keys and views[1] is self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        keys, values = _kv(self)
        length = keys.shape[-2] if keys.dim() == 4 else 0
        if not self._owned() or length + n > self._kbuf.shape[-2]:
            self._set(
                *_grown(keys if length else None, values if length else None, key_states, length + n + ROOM), length
            )
        self._kbuf[:, :, length : length + n].copy_(key_states)
        self._vbuf[:, :, length : length + n].copy_(value_states)
        self.keys, self.values = self._kbuf[:, :, : length + n], self._vbuf[:, :, : length + n]
        self._views = (self.keys, self.values)
        return self.keys, self.values


def _kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    if keys is None or values is None:
        raise ValueError("the cache layer holds no keys and values")
    return keys, values


def _grown(
    keys: torch.Tensor | None, values: torch.Tensor | None, like: torch.Tensor, columns: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers of `columns` columns holding `keys`/`values` (if any) in their first columns."""
    b, h, _, d = like.shape
    kbuf = like.new_empty(b, h, columns, d)
    vbuf = like.new_empty(b, h, columns, d)
    if keys is not None and values is not None:
        kbuf[:, :, : keys.shape[-2]].copy_(keys)
        vbuf[:, :, : values.shape[-2]].copy_(values)
    return kbuf, vbuf


def new_cache(config: Any) -> DynamicCache:
    """An empty cache for `config`'s model: its full-attention layers roomy, any other kind as transformers makes it."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def concat_rows(old: Any, new: Any, width: int) -> None:
    """Append `new`'s rows to `old` (in place), both left-padded to `width` columns with zeros."""
    for a, b in zip(old.layers, new.layers, strict=True):
        if isinstance(a, RoomyLayer):
            (ka, va), (kb, vb) = _kv(a), _kv(b)
            rows, h, _, d = ka.shape
            kbuf = ka.new_empty(rows + kb.shape[0], h, width + ROOM, d)
            vbuf = va.new_empty(rows + kb.shape[0], h, width + ROOM, d)
            for buf, parts in ((kbuf, (ka, kb)), (vbuf, (va, vb))):
                start = 0
                for part in parts:
                    n, pad = part.shape[0], width - part.shape[2]
                    buf[start : start + n, :, :pad].zero_()
                    buf[start : start + n, :, pad:width].copy_(part)
                    start += n
            a._set(kbuf, vbuf, width)
        else:
            a.keys = torch.cat([left_pad(a.keys, width), left_pad(b.keys, width)], dim=0)
            a.values = torch.cat([left_pad(a.values, width), left_pad(b.values, width)], dim=0)


def keep_rows(cache: Any, index: torch.Tensor, first: int) -> None:
    """Keep only rows `index` of `cache` (in place), from column `first` on."""
    for layer in cache.layers:
        if isinstance(layer, RoomyLayer) and layer._owned():
            length = _kv(layer)[0].shape[2]
            kbuf = layer._kbuf[:, :, first:].index_select(0, index)
            vbuf = layer._vbuf[:, :, first:].index_select(0, index)
            layer._set(kbuf, vbuf, length - first)
        else:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, width, D] with zeros in front (masked out, never attended)."""
    pad = width - t.shape[2]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)
