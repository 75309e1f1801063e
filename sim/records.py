"""Per-call and per-program result rows, shared by the simulator and the replayer.

Both write these rows with `sim.metrics`, so a simulated run and a real-engine
replay are compared with one tool. Times are seconds since the trace's zero.
"""

from __future__ import annotations

from dataclasses import dataclass


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
