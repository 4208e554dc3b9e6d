"""Percentiles with distribution-free confidence intervals (order statistics), for latency samples.

A probe of a few dozen requests gives a p95 whose uncertainty is large; the interval says how large.
The interval for the q-quantile uses ranks l < u with P(l <= B < u) >= level for B ~ Binomial(n, q),
so it holds for any latency distribution (no normality, no bootstrap randomness: tests are deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Quantile:
    """One percentile of a sample and its confidence interval (None where too few samples bound it)."""

    q: float
    value: float | None
    low: float | None
    high: float | None
    n: int


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default), None for an empty sample."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _binom_cdf(k: int, n: int, q: float) -> float:
    return sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k + 1))


def quantile_ci(values: Sequence[float], q: float, level: float = 0.95) -> Quantile:
    """The q-quantile with an order-statistic interval; an open end is None (e.g. p99 of 20 samples)."""
    n = len(values)
    value = percentile(values, q)
    if n == 0:
        return Quantile(q, None, None, None, 0)
    ordered = sorted(values)
    alpha = (1 - level) / 2
    cdf = [_binom_cdf(k, n, q) for k in range(n + 1)]
    # lower rank: largest l with P(B < l) <= alpha; upper rank: smallest u with P(B < u) >= 1 - alpha (1-based ranks)
    low_rank = max((r for r in range(1, n + 1) if cdf[r - 1] <= alpha), default=None)
    high_rank = min((r for r in range(1, n + 1) if cdf[r - 1] >= 1 - alpha), default=None)
    low = ordered[low_rank - 1] if low_rank is not None else None
    high = ordered[high_rank - 1] if high_rank is not None else None
    return Quantile(q, value, low, high, n)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
