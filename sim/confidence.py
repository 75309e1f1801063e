"""Confidence intervals over independent replications (seeds).

A simulated comparison is one draw of a random workload; the seeds of a
replicated run or sweep are independent draws, so the spread of a metric
over them says how far one draw's answer can be trusted. Used by
`sim.replications` (``run --seeds``) and `sim.derived` (sweeps over
``seed``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """The mean of ``values`` and its two-sided Student-t confidence interval."""

    values: tuple[float, ...]
    mean: float
    low: float
    high: float

    def excludes(self, x: float) -> bool:
        return x < self.low or x > self.high

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "values": list(self.values)}


def interval_text(mean: float, low: float, high: float, spec: str, suffix: str = "") -> str:
    """``0.934 [0.897, 0.972]``: how every table prints a mean with its interval."""
    return f"{mean:{spec}}{suffix} [{low:{spec}}, {high:{spec}}]"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean +- t(n-1) x s / sqrt(n), s the sample standard deviation.

    The t interval assumes roughly normal per-seed values. A per-seed mean
    over hundreds of programs is close to that by the central limit
    theorem; for tails (p95, p99), ratios and throughput interpolated at a
    target, near saturation above all, it is an approximation, and a
    handful of seeds gives a rough interval.
    """
    from scipy.stats import t

    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    # statistics computes exactly (in fractions) before rounding once, so
    # equal values give exactly zero width and their own value as the mean.
    m = statistics.mean(values)
    s = statistics.stdev(values, m)
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * s / math.sqrt(n)
    return Interval(tuple(float(v) for v in values), m, m - half, m + half)
