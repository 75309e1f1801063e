"""Per-call and per-program result rows, shared by the simulator and the replayer.

Both write these rows with `sim.metrics`, so a simulated run and a real-engine
replay are compared with one tool. Times are seconds since the trace's zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A number as the writers write one (str of an int, repr of a float). Python's int() and float()
# take more: "1_0" (as 10), " 5 ", Arabic-Indic digits; a hand-edited cell like that was read
# as a number nobody wrote.
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)",
                         re.IGNORECASE)
MAX_INT_DIGITS = 4000  # Python's int() refuses past 4,300 digits


def number_of(text: str, kind: type | None = None) -> int | float | None:
    """The number a CSV cell holds: an int for ``kind`` int, a float for float, either
    (int first) for None; None when the text is not one as the writers write it."""
    if kind in (None, int) and _INT_TEXT.fullmatch(text) and len(text) <= MAX_INT_DIGITS:
        return int(text)
    if kind in (None, float) and _FLOAT_TEXT.fullmatch(text) and len(text) <= MAX_INT_DIGITS:
        return float(text)
    return None


@dataclass
class CallRecord:
    policy: str
    program_id: str
    call_id: str
    engine: int
    prompt_tokens: int
    output_tokens: int
    arrival: float  # released to the engine: parents done + delay
    first_scheduled: float
    first_token: float
    finish: float
    waiting: float  # time live on an engine but not in a step
    service: float  # time in engine steps (sim.core.attribute_service)
    preemptions: int
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache at first admission


@dataclass
class ProgramRecord:
    policy: str
    program_id: str
    workload: str
    arrival: float
    finish: float
    calls: int
    output_tokens: int
    latency: float  # finish - arrival
    normalized_latency: float  # latency / output_tokens (s/token)
    waiting: float  # sum of its calls' waiting
    service: float  # sum of its calls' service
    waiting_share: float  # waiting / (waiting + service)
