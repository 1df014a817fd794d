"""The engine's batched KV cache: transformers' `DynamicCache` whose full-attention layers keep spare columns.

`DynamicLayer.update` appends a step's keys and values with `torch.cat`, which copies the whole cache of
the layer at every decoding step: at 16 rows of about 230 tokens that copy was about a sixth of a step's
CPU time (21 of 134 ms, one thread, `torch.profiler`). A `RoomyLayer` keeps its keys and values as views
of larger buffers and writes a step's token into the next free column; the buffers are reallocated only
when full (with `ROOM` spare columns). Rows joining the batch are written into spare rows and a leaving row
is overwritten by the last one (`concat_rows`, `keep_rows`): at 16 rows, rebuilding every layer's buffers on
each join and leave cost about 11 ms each on the embedded base, a fifth of a decoding step.

A decoding step may run over the first rows only (the engine keeps rows that go first in front): the rows
behind wait the step out, with a zero column where the others got their token.

Columns outside a view are never read. Padding columns inside it are zeros (masked out; never garbage, as a
masked NaN would still poison attention's weighted sum).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

ROOM = 32
"""Spare columns a buffer gets when it is (re)allocated: one full copy per ROOM decoding steps."""


class RoomyLayer(DynamicLayer):
    """A full-attention cache layer whose `keys` and `values` are views of buffers with room to grow: spare
    columns on the right for decoding steps, spare rows below for requests joining, and a movable first column.

    The view is `buffer[:rows, :, start:end]`. A decoding step writes column `end`; a joining request writes its
    rows below the others; a leaving request's row is overwritten by a row from the end (`keep_rows`), and
    columns that became padding for every row are dropped by moving `start`. Only a buffer that runs out of
    room is copied whole.
    """

    _kbuf: torch.Tensor
    _vbuf: torch.Tensor
    _rows = 0
    _start = 0
    _end = 0

    def _set(self, kbuf: torch.Tensor, vbuf: torch.Tensor, rows: int, start: int, end: int) -> None:
        self._kbuf, self._vbuf = kbuf, vbuf
        self._rows, self._start, self._end = rows, start, end
        self.keys, self.values = kbuf[:rows, :, start:end], vbuf[:rows, :, start:end]
        self._views = (self.keys, self.values)

    def _owned(self) -> bool:
        """Whether `keys`/`values` are still this layer's views (code may assign plain tensors to them)."""
        views = getattr(self, "_views", None)
        return views is not None and views[0] is self.keys and views[1] is self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Append a step's keys and values. Fewer rows than the layer holds: a step over its first rows only (the
        others wait this step out), which get their new columns; the other rows get zeros there (to be masked),
        and the attention sees the first rows alone."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if not self._owned():  # first use, or tensors assigned from outside: take them into buffers
            keys, values = _kv(self)
            length = keys.shape[-2] if keys.dim() == 4 else 0
            kbuf, vbuf = _buffers(key_states, key_states.shape[0], length + n + ROOM)
            if length:
                kbuf[:, :, :length].copy_(keys)
                vbuf[:, :, :length].copy_(values)
            self._set(kbuf, vbuf, key_states.shape[0], 0, length)
        elif self._end + n > self._kbuf.shape[-2]:
            width = self._end - self._start
            keys, values = _kv(self)
            kbuf, vbuf = _buffers(key_states, self._kbuf.shape[0], width + n + ROOM)
            kbuf[: self._rows, :, :width].copy_(keys)
            vbuf[: self._rows, :, :width].copy_(values)
            self._set(kbuf, vbuf, self._rows, 0, width)
        end, active = self._end, key_states.shape[0]
        self._kbuf[:active, :, end : end + n].copy_(key_states)
        self._vbuf[:active, :, end : end + n].copy_(value_states)
        if active < self._rows:
            self._kbuf[active : self._rows, :, end : end + n].zero_()
            self._vbuf[active : self._rows, :, end : end + n].zero_()
        self._set(self._kbuf, self._vbuf, self._rows, self._start, end + n)
        keys, values = _kv(self)
        return keys[:active], values[:active]


def _kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    if keys is None or values is None:
        raise ValueError("the cache layer holds no keys and values")
    return keys, values


def _buffers(like: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, h, _, d = like.shape
    with torch.inference_mode(False):  # plain tensors, writable in and out of inference mode
        return like.new_empty(rows, h, columns, d), like.new_empty(rows, h, columns, d)


def new_cache(config: Any) -> DynamicCache:
    """An empty cache for `config`'s model: its full-attention layers roomy, any other kind as transformers makes it."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def plain_cache(config: Any) -> bool:
    """Whether every layer of the cache of `config`'s model keeps every token's keys and values (no sliding window,
    no recurrent state): only then are cached prompt blocks the same as recomputed ones, and only then may a step
    run over the first rows alone."""
    try:
        cache = DynamicCache(config=config)
    except Exception as e:  # a model type transformers builds no cache for from its config
        kind = getattr(config, "model_type", type(config).__name__)
        log.info("no prefix caching or short-first steps on this %s base: its KV cache cannot be built (%s)", kind, e)
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def past_cache(
    config: Any, pasts: list[tuple[torch.Tensor, torch.Tensor] | None]
) -> tuple[Any, torch.Tensor, list[int]]:
    """A cache holding each row's past keys and values (each [layers, kv heads, tokens, head dim], or None for a row
    without), right-aligned, zeros elsewhere; with its mask and each row's number of past tokens."""
    sizes = [0 if p is None else p[0].shape[2] for p in pasts]
    width = max(sizes)
    some = next(p for p in pasts if p is not None)
    layers, heads, _, dim = some[0].shape
    keys = some[0].new_zeros(layers, len(pasts), heads, width, dim)
    values = keys.clone()
    for i, p in enumerate(pasts):
        if p is not None:
            keys[:, i, :, width - sizes[i] :] = p[0]
            values[:, i, :, width - sizes[i] :] = p[1]
    cache = new_cache(config)
    for layer in range(layers):
        cache.update(keys[layer], values[layer], layer)
    mask = torch.zeros((len(pasts), width), dtype=torch.long)
    for i, n in enumerate(sizes):
        mask[i, width - n :] = 1
    return cache, mask, sizes


def concat_rows(old: Any, new: Any, width: int, capacity: int = 0) -> None:
    """Append `new`'s rows to `old` (in place), both left-padded to `width` columns with zeros. A roomy layer
    writes them into its spare rows (made for `capacity` rows when it has to grow), so the running rows stay
    where they are."""
    with torch.inference_mode():  # the buffers were made in the forward, as inference tensors
        _concat_rows(old, new, width, capacity)


def _concat_rows(old: Any, new: Any, width: int, capacity: int) -> None:
    for a, b in zip(old.layers, new.layers, strict=True):
        if isinstance(a, RoomyLayer) and a._owned():
            kb, vb = _kv(b)
            rows, joining, fresh = a._rows, kb.shape[0], kb.shape[2]
            extra = width - (a._end - a._start)  # padding columns the running rows get in front
            if a._kbuf.shape[0] < rows + joining or a._start < extra:
                kbuf, vbuf = _buffers(kb, max(capacity, rows + joining), width + ROOM)
                for buf, view in zip((kbuf, vbuf), _kv(a), strict=True):
                    buf[:rows, :, :extra].zero_()
                    buf[:rows, :, extra:width].copy_(view)
                a._set(kbuf, vbuf, rows, 0, width)
            elif extra:
                a._kbuf[:rows, :, a._start - extra : a._start].zero_()
                a._vbuf[:rows, :, a._start - extra : a._start].zero_()
                a._set(a._kbuf, a._vbuf, rows, a._start - extra, a._end)
            start, end = a._start, a._end
            for buf, part in ((a._kbuf, kb), (a._vbuf, vb)):
                buf[rows : rows + joining, :, start : end - fresh].zero_()
                buf[rows : rows + joining, :, end - fresh : end].copy_(part)
            a._set(a._kbuf, a._vbuf, rows + joining, start, end)
        else:
            a.keys = torch.cat([left_pad(a.keys, width), left_pad(b.keys, width)], dim=0)
            a.values = torch.cat([left_pad(a.values, width), left_pad(b.values, width)], dim=0)


def keep_rows(cache: Any, index: torch.Tensor, first: int) -> None:
    """Keep rows `index` of `cache` (in place), in that order, from column `first` on. A roomy layer copies only
    the rows that move (with `Engine`'s order, a row from the end into each gap) and moves its first column."""
    order = [int(i) for i in index.tolist()]
    moved = [(i, j) for i, j in enumerate(order) if i != j]
    with torch.inference_mode():  # the buffers were made in the forward, as inference tensors
        _keep_rows(cache, index, order, moved, first)


def _keep_rows(cache: Any, index: torch.Tensor, order: list[int], moved: list[tuple[int, int]], first: int) -> None:
    for layer in cache.layers:
        if isinstance(layer, RoomyLayer) and layer._owned():
            start, end = layer._start, layer._end
            if moved:
                dev = layer._kbuf.device
                dst = torch.tensor([i for i, _ in moved], dtype=torch.long, device=dev)
                src = torch.tensor([j for _, j in moved], dtype=torch.long, device=dev)
                for buf in (layer._kbuf, layer._vbuf):
                    buf[dst, :, start:end] = buf[src, :, start:end]  # the right side is a copy: overlaps are safe
            layer._set(layer._kbuf, layer._vbuf, len(order), start + first, end)
        else:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, width, D] with zeros in front (masked out, never attended)."""
    pad = width - t.shape[2]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)
