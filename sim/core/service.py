"""Service attribution: the one definition of "service" both engines use.

A call that is in an engine step executes for that whole step, whatever its
share of the batch's tokens: a decode in a batch of 200 and a 2,000-token
prefill chunk both hold the GPU for the step and both leave the queue only
when the step ends. So each call in a step attains the step's wall-clock
duration. This matches the paper's time-based definition (queueing and tool
time are not service), needs no per-token cost model (which the real engine
does not have), and makes a program's attained service the time its calls
spent on the engine.
"""

from __future__ import annotations

from typing import Iterable


def attribute_service(step_seconds: float, call_ids: Iterable[str]) -> dict[str, float]:
    """Service each call in a step attained, keyed by call id."""
    # `not >= 0` also refuses NaN, which would sink a program into the last
    # queue for good and break the starvation heap's ordering.
    if not 0 <= step_seconds < float("inf"):
        raise ValueError(f"step duration must be a finite number >= 0, got {step_seconds}")
    return {cid: step_seconds for cid in call_ids}
