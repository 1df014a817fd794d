"""How much an adapter changes the held-out answer NLL, and how sure that figure is.

The NLL of a set of questions is per answer token: the sum of every answer token's NLL over the number of
answer tokens. An adapter's change is relative to the base on the same questions. Its 95% interval comes
from a paired bootstrap over questions: each resample draws questions with replacement and scores the base
and the adapter on the same draw, so the interval reflects which questions were asked, not two independent
samples' noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# One question's answer: (sum of its answer tokens' NLL, number of answer tokens).
Item = tuple[float, int]

RESAMPLES = 2000
SEED = 0


def nll_of(items: Sequence[Item]) -> float:
    """NLL per answer token over the questions."""
    tokens = sum(n for _, n in items)
    if tokens == 0:
        raise ValueError("no answer tokens to score")
    return sum(s for s, _ in items) / tokens


def nll_change(adapter: Sequence[Item], base: Sequence[Item]) -> float:
    """(adapter NLL - base NLL) / base NLL on the same questions: -0.25 is 25% lower."""
    _paired(adapter, base)
    b = nll_of(base)
    return (nll_of(adapter) - b) / b


def nll_change_ci(
    adapter: Sequence[Item], base: Sequence[Item], level: float = 0.95, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """The percentile interval of nll_change under a paired bootstrap over questions (deterministic: seeded)."""
    _paired(adapter, base)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    a = np.asarray(adapter, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    # Both sides tokenise the same answers the same way, so their token counts are equal; each keeps its own.
    a_nll = a[picks, 0].sum(1) / a[picks, 1].sum(1)
    b_nll = b[picks, 0].sum(1) / b[picks, 1].sum(1)
    changes = (a_nll - b_nll) / b_nll
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(changes, [tail, 100 - tail])
    return float(low), float(high)


def _paired(adapter: Sequence[Item], base: Sequence[Item]) -> None:
    if len(adapter) != len(base):
        raise ValueError(f"paired figures need the same questions: {len(adapter)} adapter vs {len(base)} base")
    if not adapter:
        raise ValueError("no questions to compare")
