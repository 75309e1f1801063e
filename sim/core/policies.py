"""Scheduling policies, one small class each, behind one interface.

As in vLLM's ``v1/core/sched/request_queue.py``, a policy only decides
order: it gives each call an ordering ``key`` (lower runs first), moves calls
between queues as they attain service, and says when a waiting call is
starving. Admission, KV and preemption mechanics stay in the scheduler
(`sim.core.scheduler`) so every policy shares them.

``rank`` is the coarse class a key belongs to: the queue index for queued
policies, the remaining work (decode-step equivalents) for SRPT. A waiting
call preempts a running one only if it `outranks` it by at least
``preempt_margin`` (default 1: a strictly better queue), and only a running
call under ``preempt_limit`` preemptions may be displaced (see
`sim.core.params`). Displacing a call of the same class would trade one
equally-entitled call for another and thrash the KV cache.
"""

from __future__ import annotations

from typing import ClassVar

from sim.core.params import PolicyParams
from sim.core.state import CallState, ProgramState

INF = float("inf")
# Service sums carry float error (ten 0.1 s steps make 0.9999999999999999 s), so
# a quantum or a queue bound this close counts as reached.
QUANTUM_EPS = 1e-12


class Policy:
    name: ClassVar[str] = ""
    preemptive: ClassVar[bool] = True
    # SRPT needs the trace's future; the real engine cannot run it.
    oracle: ClassVar[bool] = False

    def __init__(self, params: PolicyParams):
        self.params = params
        self._queue_seq = 0

    # -- hooks -----------------------------------------------------------------
    def on_arrival(self, call: CallState, program: ProgramState) -> None:
        """Set the call's entry priority, queue and key."""
        raise NotImplementedError

    def on_service(self, call: CallState, seconds: float) -> None:
        """The call attained ``seconds`` of service in a step: spend its quantum.

        Policies without queues leave the quantum infinite, so this is a no-op for them.
        """
        self._charge_quantum(call, seconds)

    def on_finish(self, call: CallState, program: ProgramState) -> None:
        """Update the program's priority when one of its calls completes."""

    def starve_deadline(self, call: CallState, program: ProgramState) -> float:
        """Earliest time a waiting call counts as starving (inf: never)."""
        return INF

    def promote(self, call: CallState, now: float) -> None:
        """Move a starving call to the top queue; reset only the call's W and T."""
        call.reset_time = now
        call.service_since_reset = 0.0
        self._enter_queue(call, 0, self.queue_quantum(0))

    def rank(self, call: CallState):
        return call.key[0]

    def outranks(self, waiting: CallState, running: CallState) -> bool:
        """May ``waiting`` displace ``running``? Needs ``preempt_margin`` classes of difference."""
        return self.rank(running) - self.rank(waiting) >= self.params.preempt_margin

    # -- shared queue mechanics ------------------------------------------------
    def queue_quantum(self, queue: int) -> float:
        return INF

    def _enter_queue(self, call: CallState, queue: int, quantum: float) -> None:
        self._queue_seq += 1
        call.queue = queue
        call.queue_seq = self._queue_seq
        call.quantum_left = quantum
        call.key = (queue, self._queue_seq)

    def _charge_quantum(self, call: CallState, seconds: float) -> None:
        """Spend service from the quantum; overflow carries into lower queues."""
        call.quantum_left -= seconds
        last = self.params.num_queues - 1
        while call.quantum_left <= QUANTUM_EPS and call.queue < last:
            overflow = -call.quantum_left
            nxt = call.queue + 1
            self._enter_queue(call, nxt, self.queue_quantum(nxt) - overflow)


class FCFS(Policy):
    """vLLM's default: arrival order; preempted only when memory runs out."""

    name = "fcfs"
    preemptive = False

    def on_arrival(self, call, program):
        call.key = (0, call.seq)

    def promote(self, call, now):  # FCFS never starves anyone by reordering
        pass


class MLFQ(Policy):
    """FastServe's skip-join MLFQ.

    Quanta double from ``mlfq_base_quantum``. A call skips the queues whose
    quantum is shorter than its estimated prefill (prompt tokens x
    ``mlfq_prefill_s_per_token``), is demoted when it uses up its quantum,
    and is promoted to Q1 after ``mlfq_starve_after`` seconds without service.
    """

    name = "mlfq"

    def queue_quantum(self, queue):
        if queue == self.params.num_queues - 1:
            return INF
        return self.params.mlfq_base_quantum * 2**queue

    def entry_queue(self, prompt_tokens: int) -> int:
        prefill = prompt_tokens * self.params.mlfq_prefill_s_per_token
        for q in range(self.params.num_queues):
            if self.queue_quantum(q) >= prefill:
                return q
        return self.params.num_queues - 1

    def on_arrival(self, call, program):
        q = self.entry_queue(call.prompt_tokens)
        self._enter_queue(call, q, self.queue_quantum(q))

    def starve_deadline(self, call, program):
        if call.queue == 0:
            return INF
        return call.waiting_since + self.params.mlfq_starve_after


class _ProgramLevel(Policy):
    """Shared machinery of PLAS and ATLAS: program priority -> discretised queue.

    A new call enters the queue that bins its program's priority (not Q1, as
    MLFQ would) with a fresh quantum: the queue's width when ``quantum`` is
    None. A call entering just below a bound therefore still gets a full
    quantum before demotion. Measured on BFCL at 12 programs/s, the alternative
    (demote as soon as program plus call service crosses the bound) demotes
    calls after a step or two; each demotion puts the call at the tail of a
    lower queue, first in line to be preempted, and with recompute
    preemption the engine spirals into re-prefilling evicted prompts.
    """

    def __init__(self, params):
        super().__init__(params)
        self.bounds = params.queue_upper_bounds()

    def queue_of(self, priority: float) -> int:
        # Within QUANTUM_EPS of a bound counts as past it, as in `_charge_quantum`:
        # ten 0.1 s steps sum to 0.9999999999999999, which demotes the call at
        # the 1 s bound, so the program's next call must enter below it too.
        for q, hi in enumerate(self.bounds):
            if priority < hi - QUANTUM_EPS:
                return q
        return len(self.bounds) - 1

    def queue_quantum(self, queue):
        if queue == self.params.num_queues - 1:
            return INF
        if self.params.quantum is not None:
            return self.params.quantum
        lo = self.bounds[queue - 1] if queue > 0 else 0.0
        return self.bounds[queue] - lo

    def program_priority(self, program: ProgramState) -> float:
        return program.service

    def on_arrival(self, call, program):
        call.priority = self.program_priority(program)
        q = self.queue_of(call.priority)
        self._enter_queue(call, q, self.queue_quantum(q))

    def starve_deadline(self, call, program):
        """Solve (W_p + W_c(t)) / (T_p + T_c) >= beta for t, W_c growing at rate 1."""
        if call.queue == 0:
            return INF
        t_total = program.total_service + call.service_since_reset
        # W_c(t) = t - reset_time - T_c  =>  t >= reset + T_c + beta*T_total - W_p
        deadline = call.reset_time + call.service_since_reset + self.params.beta * t_total - program.total_waiting
        return max(deadline, call.waiting_since)


class PLAS(_ProgramLevel):
    """Program-Level Attained Service: priority = service of completed calls."""

    name = "plas"

    def on_finish(self, call, program):
        program.service += call.service


class ATLAS(_ProgramLevel):
    """Adaptive Thread-Level Attained Service: the program's critical path.

    A call's priority is the program's scalar when it arrived; completing it
    raises the scalar to ``priority + service``. Parallel calls of a program
    share that scalar, so they land in the same queue and run as a gang.
    """

    name = "atlas"

    def on_finish(self, call, program):
        program.service = max(program.service, call.priority + call.service)


class SRPT(Policy):
    """Oracle: shortest remaining program work first (simulator only).

    The simulator sets ``ProgramState.remaining_work`` from the trace: the
    work of the program's calls not yet finished, lowered when a call
    finishes (see SchedulerCore.set_remaining). Ranking at call granularity
    rather than per token lets the simulator account decodes lazily; on
    ShareGPT at 1.5/s it moved SRPT's mean normalised latency from 0.128 to
    0.131 s/token and on BFCL at 12-14/s by under 0.2%.
    Programs are never demoted or promoted: SRPT does not starve anyone that
    finishes. It is the reference the others are measured against, not a
    true bound: shortest-remaining-first minimises mean response time on
    one server, but in a batching engine, and per output token, an order
    can beat it (PLAS by 3-4% on `bfcl-90-v0`; docs/findings.md).
    """

    name = "srpt"
    oracle = True

    def on_arrival(self, call, program):
        call.key = (program.remaining_work, program.seq, call.seq)

    def promote(self, call, now):
        pass


class ProgramFCFS(Policy):
    """Program-level FCFS: the calls of the earliest-arrived program run first.

    This is Continuum's ordering (DESIGN.md section 2, later work), without
    its KV time-to-live. It is here because past capacity it is the one
    non-oracle order that keeps the prefix cache working: serving the oldest
    programs first bounds how many programs are in flight, so their histories
    stay cached across tool calls. Call-level FCFS and PLAS start every new
    program at once; their histories then evict each other, every call
    re-prefills, and throughput collapses (docs/findings.md, "Past capacity in
    the long run"). Like FCFS it never preempts for order, only when memory runs
    out, and then it evicts the newest program's call.

    The key is (program number, call number): the program's number stands
    where other policies put a queue index, so the vLLM plugin's
    ``(queue, sequence)`` encoding carries it unchanged. Programs are
    numbered by their first call in the process table.
    """

    name = "program_fcfs"
    preemptive = False

    def on_arrival(self, call, program):
        call.key = (program.seq, call.seq)

    def promote(self, call, now):  # arrival order needs no anti-starvation
        pass


POLICY_CLASSES: dict[str, type[Policy]] = {p.name: p for p in (FCFS, MLFQ, PLAS, ATLAS, SRPT, ProgramFCFS)}


def make_policy(name: str, params: PolicyParams | None = None) -> Policy:
    try:
        cls = POLICY_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid choices: {', '.join(POLICY_CLASSES)}") from None
    return cls(params or PolicyParams())
