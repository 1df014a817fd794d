"""Adapter mixtures per request, checked in the API process: which adapters a row sums, at which weights.

Three ways to ask: `"adapter": {"symptoms": 0.7, "treatment": 0.3}` on /v1/answer; `"adapters": [{"name",
"scale"}]` on the OpenAI routes (loraswap's extension, like llama.cpp's per-request `lora` list); and
`"adapter": "auto", "route": "soft"`, which mixes the adapters of the router's most likely qtypes weighted by their
probabilities. A worker sums the adapters' LoRA deltas per row (`server/worker/mixing.py`), so mixture rows share
batches with plain ones. Only LoRA adapters mix (prompt and prefix adapters change a row's inputs, not its
weights), at most `max_mix` of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from loraswap.server.api.catalog import Catalog
from loraswap.server.api.errors import APIError

Mixture = tuple[tuple[str, float], ...]

SOFT_FLOOR = 0.05
"""Route "soft": qtypes the router gives less than this probability are left out (their deltas would change next to
nothing, at the cost of computing them); the rest are renormalised to sum to 1."""


async def mixture(catalog: Catalog, pairs: list[tuple[str, float]], param: str) -> Mixture:
    """The checked mixture of `pairs` (adapter name, weight): 400 for too many adapters, a repeated one, the base,
    a weight that is not a finite number in [-4, 4], an adapter that is not LoRA; 404 for an unknown adapter."""
    settings = catalog.settings
    if settings.lora_impl != "batched":
        raise APIError(
            400, "adapter mixtures are computed in the LoRA slots; this server runs lora_impl 'peft'", param=param
        )
    if not pairs:
        raise APIError(400, "a mixture names at least one adapter", param=param, code="invalid_mixture")
    if len(pairs) > settings.max_mix:
        raise APIError(
            400,
            f"the mixture has {len(pairs)} adapters; this server mixes at most {settings.max_mix} (LORASWAP_MAX_MIX)",
            param=param,
            code="too_many_adapters",
        )
    names = [n for n, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise APIError(400, f"the mixture names {', '.join(repeated)} more than once", param=param)
    entries = None
    out: list[tuple[str, float]] = []
    for name, weight in pairs:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and -4 <= weight <= 4):
            raise APIError(400, f"the weight of {name!r} is {weight!r}; weights are numbers in [-4, 4]", param=param)
        adapter = await catalog.resolve(name, param)
        if adapter is None:
            raise APIError(400, f"{name!r} is the base, which has no delta to mix; name adapters", param=param)
        entries = entries or catalog.entries()
        method = entries[adapter].manifest.method if adapter in entries else "lora"
        if method != "lora":
            raise APIError(
                400,
                f"adapter {name!r} is a {method} adapter; only LoRA adapters mix (their deltas add up)",
                param=param,
                code="unsupported_mixture",
            )
        out.append((adapter, float(weight)))
    return tuple(out)


async def soft_route(catalog: Catalog, question: str) -> tuple[str | None, Mixture, dict[str, Any]]:
    """`"adapter": "auto", "route": "soft"`: the adapters of the router's most likely qtypes (at most `max_mix`,
    each with probability at least SOFT_FLOOR), weighted by their probabilities renormalised to sum to 1. Returns
    (one adapter, no mixture) when a single qtype is left, (None, ()) when no qtype has an adapter (the base), and
    what the router said."""
    ranked = catalog.ranked(question)
    chosen = soft_weights(ranked, catalog.qtype_adapter, catalog.settings.max_mix)
    routed: dict[str, Any] = {
        "qtype": ranked[0][0],
        "probability": round(ranked[0][1], 4),
        "route": "soft",
        "mixture": [{"qtype": q, "adapter": a, "weight": round(w, 4)} for q, a, w in chosen],
    }
    if not chosen:
        return None, (), routed
    # A registry adapter is pulled (and checked) here, as a named one would be.
    resolved = [(await catalog.resolve(a, "adapter"), w) for _, a, w in chosen]
    if len(resolved) == 1:
        return resolved[0][0], (), routed
    return None, tuple((a, w) for a, w in resolved if a is not None), routed


def soft_weights(
    ranked: list[tuple[str, float]], adapter_of: Callable[[str], str | None], max_mix: int
) -> list[tuple[str, str, float]]:
    """The soft route's (qtype, adapter, weight) from the router's ranked qtypes: the most likely qtypes that have
    an adapter, at most `max_mix`, none under SOFT_FLOOR but the first, weights renormalised to sum to 1."""
    chosen: list[tuple[str, str, float]] = []
    for qtype, prob in ranked:
        if len(chosen) == max_mix or (chosen and prob < SOFT_FLOOR):
            break
        adapter = adapter_of(qtype)
        if adapter is not None:
            chosen.append((qtype, adapter, prob))
    total = sum(p for _, _, p in chosen)
    return [(q, a, p / total) for q, a, p in chosen]
