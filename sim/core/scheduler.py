"""SchedulerCore: the per-engine decisions both engines delegate to.

One instance per engine replica. The caller (the simulator's replica model
or the vLLM plugin) owns the batch mechanics (token budget, KV blocks) and
calls, once per engine step:

1. ``promote_starving(now)``: anti-starvation promotions;
2. ``order(calls)``: the running and waiting calls in priority order;
3. ``choose_victims(...)``: running calls to preempt so that better-ranked
   waiting calls fit (empty for non-preemptive policies);
4. ``memory_victim(running)``: whom to evict when a running call cannot
   grow (every policy, FCFS included);
5. ``on_admitted`` / ``on_preempted`` as calls move between the two sets;
6. ``on_step(services, now)`` with `attribute_service`'s result;
7. ``finish_call`` when a call completes.

Starvation deadlines live in a heap with lazy invalidation, so a step costs
O(promotions x log n) rather than a scan of every waiting call: the plugin
must decide in well under a millisecond with a thousand waiting requests.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Iterable, Sequence

from sim.core.policies import Policy
from sim.core.process_table import ProcessTable
from sim.core.state import CallState, ProgramState

_KEY = attrgetter("key")


@dataclass(frozen=True)
class TokenBudget:
    """A step's token budget, for `SchedulerCore.choose_victims`.

    Both engines schedule every running call before any waiting one (vLLM's
    running pass, then its waiting pass), so a waiting call gets only what
    the running calls leave of ``tokens``. A victim that blocks, seats and KV
    allow can still be wasted: the call it was taken for is then not
    admitted, and it waits behind the running calls it outranks that spend
    the budget. ``running(c)`` is what running call ``c`` asks of this step
    (its unscheduled tokens: a decode's one, a prefill's rest); ``waiting(w)``
    what waiting call ``w`` would compute (past its prefix hit), all of which
    an admitted call asks, though the budget may cut its chunk. Admission
    needs one token with chunked prefill, else all of them, as vLLM's
    waiting pass does.
    """

    tokens: int
    running: Callable[[CallState], int]
    waiting: Callable[[CallState], int]
    chunked: bool
    fixed: int = 0  # what running calls that are no candidates ask (the plugin's sessions with a token in flight)


class SchedulerCore:
    def __init__(self, policy: Policy, table: ProcessTable):
        self.policy = policy
        self.table = table
        self.calls: dict[str, CallState] = {}
        self._seq = 0
        self._deadlines: list[tuple[float, int, CallState, float]] = []
        self._push_seq = 0

    # -- arrivals and completions ------------------------------------------------
    def add_call(
        self, call_id: str, program_id: str, thread_id: str, prompt_tokens: int, now: float
    ) -> CallState:
        if call_id in self.calls:
            raise ValueError(f"call {call_id!r} is already live on this engine")
        program = self.table.get_or_create(program_id, now)
        if thread_id in program.live:
            raise ValueError(f"program {program_id!r} already has a live call on thread {thread_id!r}")
        self._seq += 1
        call = CallState(
            id=call_id,
            program_id=program_id,
            thread_id=thread_id,
            arrival=now,
            prompt_tokens=prompt_tokens,
            seq=self._seq,
            reset_time=now,
            waiting_since=now,
        )
        program.live[thread_id] = call
        program.last_arrival = now
        self.calls[call_id] = call
        self.policy.on_arrival(call, program)
        self._push_deadline(call, program)
        return call

    def finish_call(self, call: CallState, now: float) -> ProgramState:
        """Account a completed call to its program; returns the program entry."""
        program = self._drop(call, now)
        program.total_service += call.service
        program.total_waiting += max(0.0, (now - call.arrival) - call.service)
        self.policy.on_finish(call, program)
        self.recheck_starvation(program)
        return program

    def recheck_starvation(self, program: ProgramState) -> None:
        """Re-push the deadlines of this engine's waiting calls of ``program``.

        A finished call grows the program's W and T, so its waiting siblings
        may starve earlier. Only this engine's calls: engines that share one
        process table (the simulator's cluster) each promote their own
        calls, so that the engine whose queue holds a promoted call re-sorts
        it. Such a cluster calls this on the other engines when a call
        finishes.
        """
        calls = self.calls
        for sibling in program.live.values():
            if not sibling.running and calls.get(sibling.id) is sibling:
                self._push_deadline(sibling, program)

    def abort_call(self, call: CallState, now: float) -> None:
        """Drop a call that will not complete (client gone); its service is not counted."""
        self._drop(call, now)

    def _drop(self, call: CallState, now: float) -> ProgramState:
        """Remove a call from this engine and its program's live set.

        Refuses a call that is not live here: finishing one twice would
        charge its service to the program twice, and dropping a stale handle
        would take its thread's newer call out of the live set, after which
        the process table could expire a program with a call still queued.
        """
        if self.calls.get(call.id) is not call:
            raise ValueError(f"call {call.id!r} is not live on this engine (already finished or aborted?)")
        program = self.table.programs[call.program_id]
        call.finished = True
        call.running = False
        del self.calls[call.id]
        if program.live.get(call.thread_id) is call:
            del program.live[call.thread_id]
        program.last_completion = now
        return program

    # -- ordering ----------------------------------------------------------------------
    @staticmethod
    def order(calls: Iterable[CallState]) -> list[CallState]:
        return sorted(calls, key=_KEY)

    def rank(self, call: CallState):
        return self.policy.rank(call)

    def memory_victim(self, running: Sequence[CallState]) -> CallState:
        """The running call to evict when memory runs out: the worst key.

        Under FCFS that is the latest arrival. vLLM pops the tail of its
        running list, the latest admitted, and prepends a victim to the
        waiting queue. The two agree because FCFS admits in arrival order
        and stops at the first call that does not fit: the running set is
        always the earliest live arrivals, so a victim goes back ahead of
        every waiting call and, readmitted, is again the latest arrival
        running. (Checked: keying FCFS by admission order, with victims
        prepended, gave byte-identical results on ShareGPT at 0.8/s with
        1,884 preemptions.) Under priority policies it is the lowest
        priority, as vLLM's priority mode picks the largest (priority, arrival).
        """
        return max(running, key=_KEY)

    def choose_victims(
        self,
        running: Sequence[CallState],
        waiting: Sequence[CallState],
        free_seqs: int,
        free_blocks: int,
        blocks_needed: Callable[[CallState], int],
        blocks_freed: Callable[[CallState], int],
        budget: TokenBudget | None = None,
    ) -> list[CallState]:
        """Running calls to preempt so better-ranked waiting calls fit.

        ``waiting`` must be in key order. Walks it best-first; a waiting call
        that does not fit may displace running calls it outranks
        (`Policy.outranks`) and that are under ``preempt_limit``, worst
        first (but see the budget below), only if that makes it fit. Stops at the first
        waiting call that cannot be made to fit, preserving order.
        To fit is to find a seat, its KV blocks and, given a ``budget``,
        the tokens its admission needs among those the running calls left
        (a victim gives back what it asked of the step). Once seat and
        blocks are found, a candidate is taken for the budget only if it
        alone covers what the call still lacks; others are passed over and
        stay candidates. Without that rule a prompt on an engine without
        chunked prefill took one decode per missing token, each to recompute
        its history for one step's tokens. What a victim taken for a seat or
        blocks gives back counts first, so a call short of a seat and two
        tokens may take two decodes. A victim made needless by later ones is
        given back, best first, so the worst stay preempted: first within
        one waiting call's walk, then once more over all the victims, since
        one taken for an earlier call can be made needless by those a later
        call takes (a review found 1 random case in 30,000). After that no
        single victim can be spared: each one's seat, blocks or tokens are
        needed by some waiting call counted in. The victims come in the
        order they were taken, worst first for each waiting call; across
        calls a victim given back and taken again by a later call comes
        after better ones. Both engines preempt them in this order.
        """
        if not (self.policy.preemptive and self.policy.params.preemption) or not waiting or not running:
            return []
        outranks = self.policy.outranks
        limit = self.policy.params.preempt_limit
        candidates = sorted(
            (c for c in running if limit is None or c.preemptions < limit), key=_KEY, reverse=True
        )
        # Demand of the running pass; with no budget every call needs none of it.
        total = 0 if budget is None else budget.tokens
        asked = 0 if budget is None else budget.fixed + sum(map(budget.running, running))
        victims: list[CallState] = []
        gains: dict[str, tuple[int, int]] = {}  # victim id -> (blocks it frees, tokens it gives back)
        # What the waiting calls counted in take together: seats, blocks, and the most any of
        # them needs of the budget's tokens, counted with all the tokens asked before it.
        start_seqs, start_blocks, start_asked = free_seqs, free_blocks, asked
        counted_in = counted_blocks = counted_tokens = tokens_reach = 0
        # Candidates not yet taken, worst first: those given back (`spare`), then candidates[used:].
        spare: list[CallState] = []
        used = 0
        running_tokens = None if budget is None else budget.running
        for w in waiting:
            need = blocks_needed(w)
            if budget is None:
                tokens = least = 0
            else:
                tokens = budget.waiting(w)
                least = tokens if not budget.chunked and tokens > 1 else 1
            # To fit: a seat, the blocks, and `least` of the tokens the running calls leave
            # (without a budget, total = wanted = least = 0 throughout).
            taken: list[tuple[CallState, int, int]] = []  # (victim, blocks it frees, tokens it gives back)
            passed: list[int] = []  # indices in `taken` of candidates passed over, not victims
            seqs, blocks, wanted = free_seqs, free_blocks, asked
            k, n_spare = 0, len(spare)
            available = n_spare + len(candidates) - used
            while (seqs < 1 or blocks < need or total - wanted < least) and k < available:
                c = spare[k] if k < n_spare else candidates[used + k - n_spare]
                if not outranks(w, c):
                    break
                gives = 0 if running_tokens is None else running_tokens(c)
                if seqs >= 1 and blocks >= need and gives < least - (total - wanted):
                    # For the budget alone one victim must cover all the call still lacks: its
                    # tokens are freed for this step only, and piecing an admission together
                    # from decodes' single tokens would cost each its recompute or swap.
                    taken.append((c, 0, 0))
                    passed.append(k)
                    k += 1
                    continue
                freed = blocks_freed(c)
                taken.append((c, freed, gives))
                seqs, blocks, wanted = seqs + 1, blocks + freed, wanted - gives
                k += 1
            if seqs < 1 or blocks < need or total - wanted < least:
                break
            counted_in += 1
            counted_blocks += need
            tokens_reach = max(tokens_reach, counted_tokens + least)
            counted_tokens += tokens
            if k == 1:
                c, freed, gives = taken[0]
                victims.append(c)
                gains[c.id] = (freed, gives)
                if n_spare:
                    del spare[0]
                else:
                    used += 1
            elif k:
                # A victim taken for a seat or blocks may be needless once a later, better one
                # is out for the budget: give those back, best first, so the worst stay preempted.
                kept = [True] * k
                for j in passed:
                    kept[j] = False
                for j in range(k - 2, -1, -1):
                    _, freed, gives = taken[j]
                    if kept[j] and seqs > 1 and blocks - freed >= need and total - wanted - gives >= least:
                        kept[j] = False
                        seqs, blocks, wanted = seqs - 1, blocks - freed, wanted + gives
                for (c, freed, gives), keep in zip(taken, kept):
                    if keep:
                        victims.append(c)
                        gains[c.id] = (freed, gives)
                back = [c for (c, _, _), keep in zip(taken, kept) if not keep]
                # Still worst first: those given back or passed over from the spares, the spares not
                # reached, then those from candidates[used:] (the spares are all worse than those).
                cut = min(k, n_spare)
                split = cut - sum(kept[:cut])
                spare = back[:split] + spare[k:] + back[split:]
                used += max(0, k - n_spare)
            free_seqs, free_blocks = seqs - 1, blocks - need
            # It asks all it would compute: a chunk the budget cut short takes first whatever a
            # later victim gives back, as the waiting pass serves calls in order.
            asked = wanted + tokens
        if len(victims) < 2:
            return victims
        return self._spare_needless(
            victims, gains,
            seats=len(victims) + start_seqs - counted_in,
            blocks=sum(freed for freed, _ in gains.values()) + start_blocks - counted_blocks,
            tokens=sum(gives for _, gives in gains.values()) + total - start_asked - tokens_reach,
        )

    @staticmethod
    def _spare_needless(
        victims: list[CallState], gains: dict[str, tuple[int, int]], seats: int, blocks: int, tokens: int
    ) -> list[CallState]:
        """Give back, best first, each victim whose seat, blocks and tokens the waiting calls
        counted in can do without.

        ``seats``, ``blocks`` and ``tokens`` are what all the victims leave over once every
        counted-in call has what it needs (its seat, its blocks, and the least of the budget
        it needs after all the tokens asked before it). The waiting pass admits in order
        after the running calls have taken theirs, so those totals, not the order in which
        the victims were found, decide whether a victim is needed.
        """
        spared: set[str] = set()
        for c in sorted(victims, key=_KEY):
            freed, gives = gains[c.id]
            if seats >= 1 and blocks >= freed and tokens >= gives:
                spared.add(c.id)
                seats, blocks, tokens = seats - 1, blocks - freed, tokens - gives
        return [c for c in victims if c.id not in spared] if spared else victims

    # -- state transitions -------------------------------------------------------------
    def on_admitted(self, call: CallState) -> None:
        call.running = True

    def on_preempted(self, call: CallState, now: float) -> None:
        call.running = False
        call.preemptions += 1
        call.waiting_since = now
        self._push_deadline(call, self.table.programs[call.program_id])

    def on_step(self, services: dict[str, float], now: float) -> None:
        """Charge each call its service (from `attribute_service`).

        A charged call may already be waiting again: under vLLM's async
        scheduling the plugin (and the simulated replica, which follows it)
        charges step N after step N+1 was scheduled, and that may have
        preempted the call. If the charge demotes such a
        call out of the top queue, it needs a starvation deadline, which it
        had none of while it waited in the top queue.
        """
        policy = self.policy
        calls = self.calls
        for cid, seconds in services.items():
            call = calls.get(cid)
            if call is None:
                continue  # finished in this step; finish_call already ran
            call.service += seconds
            call.service_since_reset += seconds
            queue = call.queue
            policy.on_service(call, seconds)
            if not call.running and call.queue != queue:
                self._push_deadline(call, self.table.programs[call.program_id])

    # -- anti-starvation ---------------------------------------------------------------
    def _push_deadline(self, call: CallState, program: ProgramState) -> None:
        deadline = self.policy.starve_deadline(call, program)
        if deadline != float("inf"):
            self._push_seq += 1
            heapq.heappush(self._deadlines, (deadline, self._push_seq, call, call.waiting_since))
            if len(self._deadlines) > 2 * len(self.calls) + 64:
                self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Drop the entries a pop would skip for good, and all but the earliest of a
        call's entries for the same wait.

        Lazy invalidation leaves a finished call's entry until its deadline
        passes, and with a large beta that is never: the plugin's heap grew by
        one entry per finished call, and by one per waiting sibling at each
        finish. A pop recomputes the deadline and re-pushes it when it is not
        yet due, so a call's earliest entry stands in for its later ones, and
        what is promoted, and when, does not change.
        """
        calls = self.calls
        earliest: dict[tuple[str, float], tuple[float, int, CallState, float]] = {}
        for entry in self._deadlines:
            _, _, call, since = entry
            if call.finished or calls.get(call.id) is not call or call.waiting_since != since:
                continue
            key = (call.id, since)
            if key not in earliest or entry[:2] < earliest[key][:2]:
                earliest[key] = entry
        self._deadlines = list(earliest.values())
        heapq.heapify(self._deadlines)

    def promote_starving(self, now: float) -> list[CallState]:
        """Promote every waiting call whose starvation deadline has passed."""
        promoted = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, call, since = heapq.heappop(heap)
            if call.finished or call.running or call.waiting_since != since or call.queue == 0:
                continue  # stale entry
            program = self.table.programs[call.program_id]
            deadline = self.policy.starve_deadline(call, program)
            if deadline > now:
                self._push_seq += 1
                heapq.heappush(heap, (deadline, self._push_seq, call, since))
                continue
            self.policy.promote(call, now)
            promoted.append(call)
        return promoted

    # -- oracle ------------------------------------------------------------------------
    def set_remaining(self, program: ProgramState, work: float) -> None:
        """SRPT only: the program's exact remaining work, refreshed by the simulator."""
        program.remaining_work = work
        if self.policy.oracle:
            for call in program.live.values():
                self.policy.on_arrival(call, program)
