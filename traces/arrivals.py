"""Program arrival processes.

The paper drives every experiment with a Poisson process of programs, so
``poisson`` (exponential inter-arrival times, coefficient of variation 1) is
the default. ``gamma`` keeps the same mean rate but sets the coefficient of
variation ``cv`` of the inter-arrival times: ``cv > 1`` gives bursts (many
programs close together, then lulls), ``cv < 1`` gives more regular arrivals,
and ``cv = 1`` is exactly Poisson. The gamma shape is ``k = 1 / cv**2`` and
the scale ``1 / (rate * k)``, so the mean gap stays ``1 / rate``. ``cv`` must
lie from ``MIN_CV`` to ``MAX_CV`` (0.01 to 10; why, beside them).

Arrival times are the cumulative sums of the gaps, so the first program
arrives after one gap, as in a Poisson process started at time 0. The gaps
are drawn as unit-rate variates and divided by ``rate``: the same seed at a
different rate gives the same arrival pattern, only stretched, which makes
rate sweeps compare like with like.
"""

from __future__ import annotations

import numpy as np

from traces.format import MAX_SECONDS, is_finite_number

ARRIVALS = ("poisson", "gamma")
# The lowest rate: one program per MAX_SECONDS on average. Below it even the
# first arrival is expected past the trace format's limit on times (and at
# 1e-320 the gaps overflow to infinity).
MIN_RATE = 1 / MAX_SECONDS
# The gamma cv range. At cv = 0.01 the gaps are within about 1% of the mean:
# the arrivals are already practically evenly spaced, and far below it the
# shape 1/cv**2 overflows (cv = 1e-160 gives NaN arrivals, 1e-300 a division
# by zero). At cv = 10 the shape is 0.01 and most gaps are already below the
# float resolution of the arrival times (about 70% of 10,000 programs arrive
# at exactly the time of the one before); beyond it nearly all do, and at
# cv = 1e10 every arrival is 0.0. Measured bursty LLM traffic lies well inside.
MIN_CV = 0.01
MAX_CV = 10.0


def check_arrival(rate: float, arrival: str, cv: float) -> None:
    """Raise ValueError for arguments no arrival process accepts."""
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r}; valid choices: {', '.join(ARRIVALS)}")
    if not (is_finite_number(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0 (programs per second), got {rate!r}")
    if rate < MIN_RATE:
        raise ValueError(f"rate must be at least {MIN_RATE:g} programs per second (a mean gap of at most "
                         f"{MAX_SECONDS:g} s, the trace format's limit on times), got {rate!r}")
    # The range also refuses nan and infinity (every comparison with nan is false).
    if not (isinstance(cv, (int, float)) and not isinstance(cv, bool) and MIN_CV <= cv <= MAX_CV):
        raise ValueError(f"cv must be a finite number > 0 from {MIN_CV:g} to {MAX_CV:g} (outside it gamma "
                         f"arrivals are degenerate), got {cv!r}")
    if arrival == "poisson" and cv != 1.0:
        raise ValueError(f"cv applies to arrival='gamma' only (a Poisson process has cv = 1), got cv={cv!r}")


def arrival_times(n: int, rate: float, rng: np.random.Generator, arrival: str = "poisson", cv: float = 1.0) -> list[float]:
    """``n`` increasing arrival times in seconds for a process of mean rate ``rate``/s."""
    check_arrival(rate, arrival, cv)
    if arrival == "poisson":
        unit = rng.standard_exponential(n)
    else:
        k = 1.0 / (cv * cv)
        unit = rng.standard_gamma(k, n) / k
    times = [float(t) for t in np.cumsum(unit / rate)]
    if times and times[-1] > MAX_SECONDS:
        raise ValueError(f"rate {rate!r} is too low for {n} programs: the last would arrive at {times[-1]:.3g} s, "
                         f"past the trace format's limit of {MAX_SECONDS:g} s")
    return times
