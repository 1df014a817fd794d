"""The held-out NLL change and its paired-bootstrap interval (train/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from loraswap.train.stats import nll_change, nll_change_ci, nll_of


def test_nll_is_per_answer_token_over_all_questions() -> None:
    # 3 + 1 nats over 2 + 2 tokens, not the mean of the questions' own NLLs (1.5 and 0.5 -> 1.0 either way here)
    assert nll_of([(3.0, 2), (1.0, 2)]) == pytest.approx(1.0)
    assert nll_of([(3.0, 3), (1.0, 1)]) == pytest.approx(1.0)
    assert nll_of([(6.0, 3), (0.0, 1)]) == pytest.approx(1.5)  # a long answer weighs more than a short one
    with pytest.raises(ValueError, match="no answer tokens"):
        nll_of([(0.0, 0)])


def test_change_is_relative_to_the_base() -> None:
    base = [(4.0, 2), (2.0, 2)]
    assert nll_change([(3.0, 2), (1.5, 2)], base) == pytest.approx(-0.25)
    assert nll_change(base, base) == 0.0
    with pytest.raises(ValueError, match="same questions"):
        nll_change(base[:1], base)
    with pytest.raises(ValueError, match="no questions"):
        nll_change([], [])


def _questions(
    n: int, gain: float, noise: float, seed: int = 1
) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 200, size=n)
    base_nll = rng.uniform(1.5, 3.5, size=n)
    adapter_nll = base_nll * (1 + gain + rng.normal(0, noise, size=n))
    base = [(float(b * t), int(t)) for b, t in zip(base_nll, tokens, strict=True)]
    adapter = [(float(a * t), int(t)) for a, t in zip(adapter_nll, tokens, strict=True)]
    return adapter, base


def test_interval_brackets_the_estimate_and_narrows_with_more_questions() -> None:
    adapter, base = _questions(64, gain=-0.3, noise=0.15)
    low, high = nll_change_ci(adapter, base)
    point = nll_change(adapter, base)
    assert low < point < high
    assert high < 0  # a consistent 30% gain is clearly below zero
    wide = nll_change_ci(adapter[:8], base[:8])
    assert wide[1] - wide[0] > high - low


def test_interval_is_paired_and_deterministic() -> None:
    adapter, base = _questions(32, gain=-0.1, noise=0.0)
    # every question improves by exactly 10%: every resample does too, so the interval collapses on -10%
    low, high = nll_change_ci(adapter, base)
    assert low == pytest.approx(-0.1) and high == pytest.approx(-0.1)
    noisy_a, noisy_b = _questions(32, gain=0.0, noise=0.2)
    assert nll_change_ci(noisy_a, noisy_b) == nll_change_ci(noisy_a, noisy_b)
    low, high = nll_change_ci(noisy_a, noisy_b)
    assert low < 0 < high  # no real change: the interval holds zero
    assert nll_change_ci(noisy_a, noisy_b, seed=1) != (low, high)
    with pytest.raises(ValueError, match="level"):
        nll_change_ci(noisy_a, noisy_b, level=1.0)
