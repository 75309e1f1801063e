"""The scheduler's view of calls and programs.

Only what scheduling decisions need lives here: identity, attained service,
waiting time, queue position. Token and KV bookkeeping belong to the engine
(the simulator's replica model, or vLLM's own `Request`), which keeps a
reference to the `CallState` it scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class CallState:
    id: str  # unique across the cluster, e.g. "p7/c3"
    program_id: str
    thread_id: str  # the call's id inside its program
    arrival: float  # when the call reached the scheduler
    prompt_tokens: int
    seq: int = 0  # arrival order, assigned by the core; ties break on it
    priority: float = 0.0  # the program-level priority the call entered with
    queue: int = 0  # 0 is the highest-priority queue
    queue_seq: int = 0  # order of entry into the current queue (FCFS inside it)
    quantum_left: float = float("inf")  # service left before demotion
    service: float = 0.0  # attained service of this call, seconds
    # Anti-starvation bookkeeping: W and T "since reset" (arrival or promotion).
    reset_time: float = 0.0
    service_since_reset: float = 0.0
    running: bool = False  # in the engine's running set (not waiting)
    waiting_since: float = 0.0  # when it last became waiting
    key: tuple = ()  # ordering key, lower runs first; kept by the policy
    finished: bool = False
    preemptions: int = 0  # times moved from running back to waiting

    def waited(self, now: float) -> float:
        """W_call: time since reset not spent being served."""
        return now - self.reset_time - self.service_since_reset


@dataclass(eq=False, slots=True)
class ProgramState:
    """One process-table entry."""

    id: str
    seq: int  # order of first arrival
    first_arrival: float
    service: float = 0.0  # the policy's program-level priority (PLAS sum / ATLAS critical path)
    total_service: float = 0.0  # T_program: service of completed calls
    total_waiting: float = 0.0  # W_program: waiting of completed calls
    engine: int | None = None  # locality affinity
    last_engine: int | None = None  # where the locality balancer sent the program's latest call
    live: dict[str, CallState] = field(default_factory=dict)  # thread id -> call
    last_arrival: float = 0.0
    last_completion: float = 0.0
    remaining_work: float = 0.0  # oracle-only (SRPT): set by the simulator

    def raise_service(self, service: float | None, total: float | None) -> None:
        """Raise the entry to a front end's view across engines (the gateway's); never lowers it.

        ``service`` is the priority value, ``total`` T_program. Without
        ``total``, T_program takes ``service``, a lower bound of it (equal
        under PLAS, the critical path under ATLAS): left at 0, a call of a
        program seeded from another engine would count as starving at once.
        """
        if service is not None:
            self.service = max(self.service, service)
        floor = total if total is not None else service
        if floor is not None:
            self.total_service = max(self.total_service, floor)
