"""Adapter mixtures per row: a row that sums several LoRA adapters' deltas, each at its own weight.

A mixture row of adapters k = 1..K with weights w_k adds to each adapted layer's output

    sum_k  w_k * scale_k * (x A_k^T) B_k^T

which is one rank-(K*R) LoRA: the rows' slots' A matrices stacked along the rank ([rows, K*R, in]), their B^T
likewise ([rows, K*R, out]) and the scales w_k * scale_k repeated over each adapter's R rank columns (PEFT's
`add_weighted_adapter(..., combination_type="cat")` builds the same matrices). Rows of a single adapter or of the
base are mixtures of one (weight 1) or of none (slot 0, the zero adapter), so one batch holds all of them: a forward
with any mixture row gathers every row's K slots in every layer (the running batch's row buffers, which hold one
slot per row, are not used then).

In the engine a mixture row's adapter key is a string (`mix_key`) naming its loaded adapters' keys and weights, so
the residency's reference counts, the prefix cache (a mixture's keys and values are its own) and `adapter_names`
carry it like any adapter key.
"""

from __future__ import annotations

from typing import Any

import torch

Mix = tuple[tuple[str, float], ...]
"""A row's adapters (loaded keys) and their weights."""

PREFIX = "mix:"


def mix_key(parts: Mix) -> str:
    """The engine's key of a mixture row (the same mixture, in any order, gives the same key)."""
    return PREFIX + ";".join(f"{key}*{weight!r}" for key, weight in sorted(parts))


def parse_mix(key: str) -> Mix | None:
    """The mixture a key names, or None for a plain adapter key."""
    if not key.startswith(PREFIX):
        return None
    parts = []
    for part in key[len(PREFIX) :].split(";"):
        name, _, weight = part.rpartition("*")
        parts.append((name, float(weight)))
    return tuple(parts)


def mix_rows(
    rows: list[str | Mix | None], slot_of: dict[str, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's slots [rows, K] and weights [rows, K] (K: the most adapters a row mixes; short rows padded with
    slot 0 at weight 0)."""
    mixes: list[Mix] = [() if r is None else ((r, 1.0),) if isinstance(r, str) else r for r in rows]
    k = max(1, max(len(m) for m in mixes))
    slots = torch.zeros(len(rows), k, dtype=torch.long)
    weights = torch.zeros(len(rows), k, dtype=torch.float32)
    for i, m in enumerate(mixes):
        for j, (key, weight) in enumerate(m):
            slots[i, j] = slot_of[key]
            weights[i, j] = weight
    return slots.to(device), weights.to(device)


def mixture_forward(
    layer: Any, x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """`out` (the base layer's output for `x`, [rows, tokens, out]) plus each row's weighted sum of its slots'
    LoRA deltas; `layer`: a `slots.SlotLinear`."""
    n, k = slots.shape
    rank = layer.A.shape[1]
    flat = slots.reshape(-1)
    a = layer.A.index_select(0, flat).reshape(n, k * rank, layer.in_features)  # [rows, K*R, in]
    bt = layer.Bt.index_select(0, flat).reshape(n, k * rank, layer.out_features)  # [rows, K*R, out]
    scale = layer.scale.index_select(0, flat).view(n, k) * weights.to(layer.scale.dtype)  # [rows, K]
    scale = scale.repeat_interleave(rank, dim=1).unsqueeze(1)  # [rows, 1, K*R]
    xd = x.to(layer.A.dtype)
    shape = xd.shape
    u = torch.bmm(xd.reshape(n, -1, shape[-1]), a.transpose(1, 2)).mul_(scale)  # [rows, tokens, K*R]
    delta = torch.bmm(u, bt).reshape(*shape[:-1], -1)
    return out + delta.to(out.dtype)
