"""The decode cohort of a simulated replica: steady decodes, accounted lazily.

A running call that has sampled a token and decodes from then on, one token
per step, joins its replica's cohort. Rather than advance every member's
token and service fields each step, the cohort counts the steps it was
scheduled in (``steps``) and their summed durations (``service``) once per
step. A member's fields lag: they are as of cohort step ``j_steps`` and
cohort service ``j_service`` (fields of `sim.sim_call.SimCall`), and `settle`
brings them up to date only when something needs them: the member finishes,
its quantum runs out, it is preempted or aborted. A lump of service equals
the sum of its steps because step durations lie on a 2**-30 s grid
(`sim.lazy_decode.quantize`).

What a step needs of the members without visiting each one is kept here
too, indexed by the cohort step it concerns: the members whose next token
starts a KV block (by phase), those that sample their last token (by finish
step), the members' decode KV tokens (``kv_tokens``), and their quantum
expiries in cohort service. Which members a step schedules, what it
allocates for them and what it charges the scheduler core are the replica's
decisions (`sim.lazy_decode.LazyDecodePath`).
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from sim.sim_call import SimCall

INF = float("inf")


class DecodeCohort:
    """One replica's steady decodes, counted once per step instead of once per member (module docstring)."""

    def __init__(self, block_size: int):
        self.block = block_size
        self.steps = 0  # steps in which the cohort was scheduled
        self.service = 0.0  # their summed durations
        self.members = 0
        self._kv_base = 0  # sum over members of num_computed - j_steps + 1 (`kv_tokens`)
        # Members by phase (num_computed - j_steps) mod block: at cohort step
        # S those in bucket -S mod block start a new KV block.
        self._by_phase: list[dict[SimCall, None]] = [{} for _ in range(block_size)]
        self._by_finish: dict[int, dict[SimCall, None]] = {}  # cohort step of the last token -> members
        self._quanta: list[tuple[float, int, SimCall]] = []  # members' quantum expiries, lazily invalidated
        self._quanta_pushed = 0  # a heap entry's tie-breaker: members never compare

    # -- membership ----------------------------------------------------------------------
    def join(self, call: SimCall) -> None:
        """``call`` has sampled a token and decodes from now on; its fields are up to date."""
        call.steady = True
        call.j_steps = self.steps
        call.j_service = self.service
        self.members += 1
        self._kv_base += call.num_computed - call.j_steps + 1
        self._bucket(call)

    def settle(self, call: SimCall) -> tuple[int, float]:
        """Bring a member's fields up to date; returns (its steps, its service) since it was last settled.

        The member's phase ``num_computed - j_steps`` and finish step are
        unchanged by settling, so its buckets stay valid. The service is
        not yet charged to the scheduler core: the caller charges it.
        """
        steps = self.steps - call.j_steps
        lump = self.service - call.j_service
        if steps:
            call.num_computed += steps
            call.generated += steps
            call.num_tokens += steps
            call.service += lump
        call.j_steps = self.steps
        call.j_service = self.service
        return steps, lump

    def remove(self, call: SimCall) -> None:
        """A settled member leaves: it finished, or leaves the running set (`settle` it first)."""
        self._unbucket(call)
        self.members -= 1
        self._kv_base -= call.num_computed - call.j_steps + 1
        call.steady = False

    def skip(self, call: SimCall) -> None:
        """A member is left out of the step being scheduled (budget spent): it will not generate in it.

        Its fields then stand for one cohort step later; the step's service
        is excluded once its duration is known (`skipped_step_ended`).
        """
        self._unbucket(call)
        call.j_steps += 1
        self._kv_base -= 1
        self._bucket(call)

    def _finish_step(self, call: SimCall) -> int:
        """The cohort step in which a member computes its last token."""
        return call.j_steps + call.output_tokens - 1 - call.generated

    def _bucket(self, call: SimCall) -> None:
        self._by_phase[(call.num_computed - call.j_steps) % self.block][call] = None
        self._by_finish.setdefault(self._finish_step(call), {})[call] = None

    def _unbucket(self, call: SimCall) -> None:
        del self._by_phase[(call.num_computed - call.j_steps) % self.block][call]
        step = self._finish_step(call)
        bucket = self._by_finish[step]
        del bucket[call]
        if not bucket:
            del self._by_finish[step]

    # -- what a cohort step needs --------------------------------------------------------
    def crossing_at(self, step: int) -> dict[SimCall, None]:
        """The members whose token in cohort step ``step`` starts a new KV block (live: it changes as they do)."""
        return self._by_phase[-step % self.block]

    def finishing_at(self, step: int) -> list[SimCall]:
        """The members that compute their last token in cohort step ``step``."""
        return list(self._by_finish.get(step, ()))

    def finishes_at(self, step: int) -> bool:
        """Whether any member computes its last token in cohort step ``step``."""
        return step in self._by_finish

    def kv_tokens(self, step: int) -> int:
        """The members' decode KV tokens (each its context + 1) in cohort step ``step``, as their fields stand now.

        A member skipped in the step being scheduled counts one token short
        (`skip`); the replica counts what it would have added.
        """
        return self._kv_base + self.members * step

    def complete_step(self, dt: float) -> None:
        """A step that scheduled the cohort has ended after ``dt`` seconds."""
        self.steps += 1
        self.service += dt

    def skipped_step_ended(self, skipped: Iterable[SimCall], dt: float) -> None:
        """The step that left out the ``skipped`` members ended after ``dt`` seconds: they were not served.

        Their quantum expiries move by ``dt`` too (in cohort service), as a
        fresh heap entry; the old one goes stale.
        """
        for call in skipped:
            call.j_service += dt
            if call.core.quantum_left != INF:
                call.q_due += dt
                self._quanta_pushed += 1
                heappush(self._quanta, (call.q_due, self._quanta_pushed, call))

    # -- quanta ----------------------------------------------------------------------------
    def push_quantum(self, call: SimCall) -> None:
        """Queue the cohort service at which a member's quantum (as the core has it now) runs out."""
        q = call.core.quantum_left
        if q != INF:
            call.q_due = call.j_service + q
            self._quanta_pushed += 1
            heappush(self._quanta, (call.q_due, self._quanta_pushed, call))

    def next_quantum_due(self) -> float:
        """The earliest queued quantum expiry, in cohort service (it may be stale: only ever early), or infinity."""
        return self._quanta[0][0] if self._quanta else INF

    def quantum_due(self) -> bool:
        """Whether a queued quantum expiry (maybe stale) has been reached by the cohort's service."""
        quanta = self._quanta
        return bool(quanta) and quanta[0][0] <= self.service + 1e-9

    def take_expired_quanta(self, events: dict[SimCall, None]) -> None:
        """Add to ``events`` the members whose quantum has run out by the cohort's service.

        Stale entries (the member left, re-joined or was skipped since, or
        is in ``events`` already) are dropped; entries due by the heap's
        tolerance whose quantum has not quite run out are queued again.
        """
        quanta, service = self._quanta, self.service
        later = []
        while quanta and quanta[0][0] <= service + 1e-9:
            entry = heappop(quanta)
            call = entry[2]
            if not call.steady or entry[0] != call.q_due or call in events:
                continue  # stale: left, re-joined or skipped since
            if call.core.quantum_left - (service - call.j_service) <= 1e-12:
                events[call] = None
            else:
                later.append(entry)
        for entry in later:
            heappush(quanta, entry)
