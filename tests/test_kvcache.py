"""The roomy KV cache: in-place appends, joins and leaves hold exactly what transformers' plain cache holds."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig

from loraswap.server.worker import kvcache
from loraswap.server.worker.kvcache import ROOM, RoomyLayer, concat_rows, keep_rows, new_cache

CONFIG = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


def kv(rows: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, tokens, 8, generator=gen), torch.randn(rows, 2, tokens, 8, generator=gen)


def fill(cache: DynamicCache, rows: int, tokens: int, seed: int) -> None:
    for layer in range(2):
        cache.update(*kv(rows, tokens, seed + layer), layer)


def same(a: DynamicCache, b: DynamicCache) -> None:
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.keys.shape == lb.keys.shape
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_appends_joins_and_leaves_match_the_plain_cache() -> None:
    roomy, plain = new_cache(CONFIG), DynamicCache(config=CONFIG)
    assert all(isinstance(layer, RoomyLayer) for layer in roomy.layers)
    fill(roomy, 3, 5, seed=0)
    fill(plain, 3, 5, seed=0)
    buffers = [layer._kbuf for layer in roomy.layers]  # type: ignore[attr-defined]
    for step in range(ROOM + 5):  # past the spare columns: the buffers are reallocated once
        fill(roomy, 3, 1, seed=10 + 2 * step)
        fill(plain, 3, 1, seed=10 + 2 * step)
        if step == 0:  # a decoding step wrote into the same buffers
            assert all(layer._kbuf is buf for layer, buf in zip(roomy.layers, buffers, strict=True))  # type: ignore[attr-defined]
        same(roomy, plain)
    assert all(layer._kbuf is not buf for layer, buf in zip(roomy.layers, buffers, strict=True))  # type: ignore[attr-defined]

    # Two rows join (shorter: left-padded with zeros), one leaves and the leading column goes.
    joining_roomy, joining_plain = new_cache(CONFIG), DynamicCache(config=CONFIG)
    fill(joining_roomy, 2, 4, seed=99)
    fill(joining_plain, 2, 4, seed=99)
    width = roomy.layers[0].keys.shape[2]
    concat_rows(roomy, joining_roomy, width, capacity=8)  # room for 8 rows from now on
    for a, b in zip(plain.layers, joining_plain.layers, strict=True):
        a.keys = torch.cat([a.keys, kvcache.left_pad(b.keys, width)])
        a.values = torch.cat([a.values, kvcache.left_pad(b.values, width)])
    same(roomy, plain)
    assert torch.count_nonzero(roomy.layers[0].keys[3:, :, : width - 4]) == 0

    # Another row joins, wider than the batch (the others get padding in front), into the spare rows.
    joining_roomy, joining_plain = new_cache(CONFIG), DynamicCache(config=CONFIG)
    fill(joining_roomy, 1, width + 2, seed=77)
    fill(joining_plain, 1, width + 2, seed=77)
    concat_rows(roomy, joining_roomy, width + 2, capacity=8)
    for a, b in zip(plain.layers, joining_plain.layers, strict=True):
        a.keys = torch.cat([kvcache.left_pad(a.keys, width + 2), b.keys])
        a.values = torch.cat([kvcache.left_pad(a.values, width + 2), b.values])
    same(roomy, plain)
    buffers = [layer._kbuf for layer in roomy.layers]  # type: ignore[attr-defined]

    # Rows 1 and 3 leave: the last row fills the first gap, the leading column goes.
    index = torch.tensor([0, 5, 2, 4])
    keep_rows(roomy, index, 1)
    for layer in plain.layers:
        layer.keys, layer.values = layer.keys[index][:, :, 1:], layer.values[index][:, :, 1:]
    same(roomy, plain)

    # A narrower row joins into a spare row.
    joining_roomy, joining_plain = new_cache(CONFIG), DynamicCache(config=CONFIG)
    fill(joining_roomy, 1, 3, seed=55)
    fill(joining_plain, 1, 3, seed=55)
    width = plain.layers[0].keys.shape[2]
    concat_rows(roomy, joining_roomy, width, capacity=8)
    for a, b in zip(plain.layers, joining_plain.layers, strict=True):
        a.keys = torch.cat([a.keys, kvcache.left_pad(b.keys, width)])
        a.values = torch.cat([a.values, kvcache.left_pad(b.values, width)])
    same(roomy, plain)
    for step in range(3):  # and decoding goes on in place
        fill(roomy, 5, 1, seed=500 + 2 * step)
        fill(plain, 5, 1, seed=500 + 2 * step)
    same(roomy, plain)
    # The leave, the narrower join and the decoding steps wrote into the same buffers.
    assert all(layer._kbuf is buf for layer, buf in zip(roomy.layers, buffers, strict=True))  # type: ignore[attr-defined]


def test_tensors_assigned_from_outside_are_taken_over() -> None:
    roomy, plain = new_cache(CONFIG), DynamicCache(config=CONFIG)
    fill(roomy, 2, 3, seed=1)
    fill(plain, 2, 3, seed=1)
    for a, b in zip(roomy.layers, plain.layers, strict=True):
        a.keys, a.values = b.keys[:, :, 1:].clone(), b.values[:, :, 1:].clone()
        b.keys, b.values = b.keys[:, :, 1:], b.values[:, :, 1:]
    fill(roomy, 2, 2, seed=7)
    fill(plain, 2, 2, seed=7)
    same(roomy, plain)


def test_a_step_over_the_first_rows_leaves_a_zero_column_behind_them() -> None:
    roomy = new_cache(CONFIG)
    fill(roomy, 3, 5, seed=0)
    before = [layer.keys.clone() for layer in roomy.layers]
    for layer in range(2):
        keys, values = roomy.update(*kv(2, 1, seed=50 + layer), layer)  # rows 0 and 1 only
        assert keys.shape == values.shape == (2, 2, 6, 8)  # the attention sees the first rows alone
    for layer, old in zip(roomy.layers, before, strict=True):
        assert layer.keys.shape == (3, 2, 6, 8)
        assert torch.equal(layer.keys[:, :, :5], old)
        assert torch.equal(layer.keys[:2, :, 5], kv(2, 1, seed=50 + roomy.layers.index(layer))[0][:, :, 0])
        assert torch.count_nonzero(layer.keys[2, :, 5]) == 0 and torch.count_nonzero(layer.values[2, :, 5]) == 0
    fill(roomy, 3, 1, seed=70)  # then a step over every row
    assert all(layer.keys.shape == (3, 2, 7, 8) for layer in roomy.layers)
