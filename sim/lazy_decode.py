"""The replica's exact fast path for steady decodes (``engine.fast_forward``).

Most of a simulation's work is decode steps: each running call computes
one token and attains the step's duration. Doing that per call per step
costs ~8 us per call-step in Python, and a 1,000-program LATS run has
~12 million of them. Instead a call that has sampled its first token
joins the replica's decode cohort (`sim.decode_cohort.DecodeCohort`):
the cohort counts its steps and service once per step, and a member's
token and service fields are brought up to date (``_settle``) only when
something needs them: it finishes, its quantum runs out, it is
preempted or aborted. Per step a member costs one budget check and one
block-boundary check; KV blocks are still allocated per call at the
step that needs them, so memory pressure and preemption happen at
exactly the same step.

Results are bit-identical to the per-step path (``fast_forward: false``,
checked by a hypothesis test): step durations lie on a 2**-30 s grid,
so a lump of service equals the sum of its steps; charges and finishes
are applied in the order the per-step path applies them (the batch
order: running calls by key, then admitted ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

from sim.core import attribute_service
from sim.latency.base import StepShape
from sim.sim_call import SimCall

if TYPE_CHECKING:
    from sim.decode_cohort import DecodeCohort

_KEY = attrgetter("core.key")

# Step durations are kept on a 2**-30 s (~1 ns) grid. Sums of such values
# are exact in float64 (below 2**22 s), so service added per step or as one
# lump is bit-identical, which lets steady decodes be accounted lazily.
_GRID = float(2**30)


def quantize(seconds: float) -> float:
    return round(seconds * _GRID) / _GRID


@dataclass(eq=False, slots=True)
class _LazyStep:
    """One step as the lazy path scheduled it."""

    batch: list[tuple["SimCall", int]] = field(default_factory=list)  # calls outside the cohort
    running_part: int = 0  # batch[:running_part] were running before the step's admissions
    skipped: list["SimCall"] = field(default_factory=list)  # members left out (budget spent)
    finishing: list["SimCall"] = field(default_factory=list)  # members sampling their last token
    members: int = 0  # members scheduled (one decode token each)
    member_kv: int = 0  # their decode KV tokens (context + 1)
    skipped_kv: int = 0  # what the skipped members would have added to member_kv
    transfer: float = 0.0


class LazyDecodePath:
    """The steps of a `sim.replica.Replica` on the lazy path, and the cohort's bookkeeping.

    A mixin: the replica's state (its running and waiting calls, KV cache,
    cohort, scheduler core, async flags) and its per-step helpers
    (`Replica._admit`, `_preempt`, `_make_room`, `_key_full_blocks`,
    `_charge`, `_finish`) are the replica's; what lives here is only what
    the lazy path does differently from the per-step one.
    """

    cohort: "DecodeCohort"


    def _coast(self, start: float, dt: float) -> tuple[float, float, float]:
        """Take the pure decode steps that follow this one, with nothing to decide, in one timeout.

        A step of cohort members only, with nothing waiting, is followed by
        more such steps until a member finishes, a quantum runs out, the KV
        cache cannot give a crossing member its block, a KV pin expires, or
        another event in the environment may submit a call. Those steps
        change nothing but counters and KV blocks: with nothing waiting, the
        step starts' ``promote_starving`` finds only stale entries, as a
        core's deadline heap holds only its own calls
        (`SchedulerCore.recheck_starvation`). So they are applied here, in
        the order the step loop would apply them, and the replica sleeps once until the
        last one ends (its completion is left to the caller, as for any
        step). This saves the event, scheduling and completion of each step
        (half of LATS's light-load steps coast, ~5% of its run time: most of
        the cost is per call). Exactness needs the end times the step loop
        would reach by successive additions, and a timeout that lands on
        them exactly, which the loop checks.
        Returns (delay from ``start``, the last step's duration, its start).
        """
        env, kv, cohort = self.env, self.kv, self.cohort
        horizon = env.peek()  # no call can arrive before this event is processed
        expiry = self.kv_pins.next_expiry()  # may be stale, as q_next
        m = cohort.members
        q_next = cohort.next_quantum_due()  # may be stale: only ever stops a run early
        c = cohort.steps
        service = cohort.service + dt
        end = start + dt
        if (
            end >= horizon
            or end >= expiry  # the next step's schedule releases a pin
            or q_next <= service + 1e-9
            or m > self.cfg.max_num_batched_tokens
            or m != len(self.running)
        ):
            return dt, dt, start
        # The members' decode KV tokens at cohort step c are kv_base + m * c (`DecodeCohort.kv_tokens`).
        step_time, kv_base = self._steady_seconds, cohort.kv_tokens(0)
        last_start, last_dt = start, dt
        while True:
            c += 1  # the candidate step's cohort index, starting at ``end``
            if cohort.finishes_at(c) or end >= expiry:
                break
            crossing = cohort.crossing_at(c)
            if len(crossing) > kv.capacity - kv.in_use:
                break
            d = quantize(step_time(StepShape(m, m, m, kv_base + m * c, 0, 0)))
            t = end + d
            if t > horizon or q_next <= service + d + 1e-9 or start + (t - start) != t:
                break
            # The previous step completes (members only: counters), this one is scheduled.
            cohort.complete_step(last_dt)
            if crossing:
                if kv.prefix_caching:
                    for call in crossing:
                        kv.register_filled(call.blocks, call.keys, call.num_computed + c - call.j_steps)
                for call in crossing:
                    kv.allocate_one(call.blocks)
            self.steps += 1
            self.busy_time += d
            self.lazy_decode_steps += m
            self.coasted_steps += 1
            service += d
            last_start, last_dt, end = end, d, t
        return end - start, last_dt, last_start

    def _settle(self, call: SimCall) -> float:
        """Bring a member's fields up to date (`DecodeCohort.settle`); returns service not yet charged to the core."""
        steps, lump = self.cohort.settle(call)
        if steps and not self._async:  # async: the schedules key members' blocks (`_key_late`)
            self._key_full_blocks(call, call.num_computed)
        return lump

    def _join(self, call: SimCall) -> None:
        """A running call that has sampled a token and decodes from now on joins the cohort."""
        self.cohort.join(call)
        self._requantum_after_charges(call)

    def _requantum_after_charges(self, call: SimCall) -> None:
        """Push a member's quantum expiry once the core has its charges (under async, after the next schedule)."""
        if self._async:
            self._requantum.append(call)
        else:
            self.cohort.push_quantum(call)

    def _leave(self, call: SimCall, now: float) -> None:
        """Settle a member and charge its service before it leaves the running set."""
        if call.steady:
            lump = self._settle(call)
            self.cohort.remove(call)
            if lump and self._outputs_due and call not in self._last_skipped:
                # Async: the core learns of the last step's service only
                # with its output, after this schedule (`_apply_outputs`).
                self._charges[call.core.id] = self._last_dt
                lump -= self._last_dt
            if lump:
                self.core.on_step({call.core.id: lump}, now)

    def _schedule_lazy(self, now: float) -> "_LazyStep":
        cfg, kv, core = self.cfg, self.kv, self.core
        self._sched_seq += 1
        if self.kv_pins.expiries_queued():
            self._expire_pins(now)
        if core.promote_starving(now):
            self.waiting.sort(key=_KEY)
        if self._unsorted:  # running keys change only on admission, charges and refreshes
            self.running.sort(key=_KEY)
            self._unsorted = False
        transfer = 0.0
        held: set[SimCall] = set()  # this step's policy victims sit it out (see _admit)
        if core.policy.preemptive and core.policy.params.preemption and self.waiting:
            for call in self._policy_victims():  # in the search's order, as the plugin preempts them
                if call.finish >= 0:
                    self.draining.drop(call)
                    continue
                self._leave(call, now)
                transfer += self._preempt(call, now)
                held.add(call)

        step = _LazyStep()
        budget = cfg.max_num_batched_tokens
        block = self.block
        cohort = self.cohort
        c_steps = cohort.steps
        crossing = cohort.crossing_at(c_steps)  # members whose next token starts a block
        if crossing and kv.prefix_caching:
            if self._lag_keys:  # its last token was in flight: keyed after scheduling, if not preempted
                self._key_due.extend((call, call.num_computed + c_steps - call.j_steps) for call in crossing)
            else:
                register = kv.register_filled
                for call in crossing:  # the block just filled gets its content key (as at step end)
                    register(call.blocks, call.keys, call.num_computed + c_steps - call.j_steps)

        # Fast case: the running calls' whole demand fits the budget and the
        # KV cache, so every running call is scheduled and order cannot matter.
        others = [c for c in self.running if not c.steady] if cohort.members != len(self.running) else []
        demand = cohort.members
        blocks_needed = len(crossing)
        for call in others:
            new = call.num_tokens - call.num_computed
            demand += new
            b = call.blocks
            blocks_needed += max(0, -(-call.num_tokens // block) - len(b.keys) - b.private)
        batch = step.batch
        preempted_for_memory = False
        if demand <= budget and blocks_needed <= kv.capacity - kv.in_use:
            allocate_one = kv.allocate_one
            for call in crossing:
                allocate_one(call.blocks)
            for call in others:
                new = call.num_tokens - call.num_computed
                b = call.blocks
                need = -(-call.num_tokens // block) - len(b.keys) - b.private
                if need > 0:
                    kv.allocate(b, need)
                self._key_full_blocks(call, call.num_computed + new)
                batch.append((call, new))
            budget -= demand
        else:
            budget, preempted_for_memory, transfer = self._schedule_running_exactly(step, budget, now, transfer)
        if self._lag_keys and (self._last_skipped or self._joined_unsampled):
            self._key_known_inputs(step.skipped, c_steps)
        step.running_part = len(batch)
        step.members = cohort.members - len(step.skipped)
        step.member_kv = cohort.kv_tokens(c_steps) - step.skipped_kv
        step.finishing = cohort.finishing_at(c_steps)
        if not preempted_for_memory:
            transfer += self._admit(batch, budget, held)[1]
        step.transfer = transfer
        self.lazy_decode_steps += step.members
        return step

    def _schedule_running_exactly(self, step: "_LazyStep", budget: int, now: float, transfer: float):
        """The running calls in key order, as the per-step path does, when the budget or KV binds.

        Members left out because the budget ran out are skipped; a call that
        cannot grow its KV evicts the worst unscheduled running call.
        """
        kv, block = self.kv, self.block
        chunked = self.cfg.enable_chunked_prefill
        c_steps = self.cohort.steps
        batch = step.batch
        preempted_for_memory = False
        pending = self.running[:]
        i = 0
        while i < len(pending):
            call = pending[i]
            i += 1
            if call.steady:
                if budget == 0:
                    step.skipped.append(call)
                    continue
                computed = call.num_computed + c_steps - call.j_steps
                need = 1 if computed % block == 0 else 0
                new = 1
            else:
                computed = call.num_computed
                new = call.num_tokens - computed
                if new > budget:
                    if not chunked or budget == 0:
                        continue
                    new = budget
                blocks = call.blocks
                need = -(-(computed + new) // block) - len(blocks.keys) - blocks.private
            if need > 0:
                if need > kv.capacity - kv.in_use:
                    swap_out, preempted = self._make_room(call, need, pending, i, now)
                    transfer += swap_out
                    preempted_for_memory = preempted_for_memory or preempted
                if not call.core.running:
                    continue
                kv.allocate(call.blocks, need)
            if not call.steady:
                self._key_full_blocks(call, computed + new)
                batch.append((call, new))
            budget -= new
        for call in step.skipped:
            step.skipped_kv += call.num_computed + c_steps - call.j_steps  # (context + 1) after the skip
            self.cohort.skip(call)
        return budget, preempted_for_memory, transfer

    def _key_known_inputs(self, skipped: list[SimCall], c_steps: int) -> None:
        """Async: key the block filled by a member whose input token is not in flight.

        That is a member left out of the last step (token budget), or one
        that joined the cohort after a recomputed prefill without sampling.
        vLLM keys the block as it schedules the decode (`_key_full_blocks`),
        not one schedule late as the cohort's crossing blocks are; a
        preemption at the next schedule must find it keyed.
        """
        joined, self._joined_unsampled = self._joined_unsampled, []
        for call in self._last_skipped + joined:
            if call.steady and call not in skipped:
                tokens = call.num_computed + c_steps - call.j_steps + 1
                if tokens % self.block == 0:
                    self.kv.register_full(call.blocks, call.keys, tokens)

    def _complete_lazy(self, step: "_LazyStep", dt: float, start: float) -> None:
        now = self.env.now
        cohort = self.cohort
        cohort.complete_step(dt)
        c_service = cohort.service
        aborted = self._aborted
        run_batch = step.batch[: step.running_part]
        adm_batch = step.batch[step.running_part :]
        if aborted:
            run_batch = [(c, n) for c, n in run_batch if c not in aborted]
            adm_batch = [(c, n) for c, n in adm_batch if c not in aborted]
            aborted.clear()
        self._last_dt = dt
        self._last_skipped = step.skipped
        if not (run_batch or adm_batch or step.skipped or step.finishing) and not cohort.quantum_due():
            return  # members only, none finishing or out of quantum: nothing to apply
        self._unsorted = True  # service charged below may demote a call
        if step.skipped:  # a skipped step neither serves (j_steps moved in `DecodeCohort.skip`)
            cohort.skipped_step_ended(step.skipped, dt)
        events: dict[SimCall, None] = dict.fromkeys(c for c in step.finishing if c.steady)
        cohort.take_expired_quanta(events)

        # Charge service in batch order: running calls by key as they were
        # sorted when the step was scheduled (``self.running`` keeps that
        # order until the next schedule; keys may have changed since, e.g. an
        # SRPT refresh from another replica's finish), then admitted ones.
        if events:
            wanted = set(events)
            wanted.update(c for c, _ in run_batch)
            order = [c for c in self.running if c in wanted]
        else:
            order = [c for c, _ in run_batch]
        admitted = [c for c, _ in adm_batch]
        charges = attribute_service(dt, [c.core.id for c, _ in run_batch + adm_batch])
        services = {}
        for call in order:
            cid = call.core.id
            services[cid] = c_service - call.j_service if call in events else charges[cid]
        for call in admitted:
            services[call.core.id] = charges[call.core.id]
        if self._async and events:
            # A member's lump covers every step since it joined. The per-step path handed
            # the core all but this step's share with the outputs of those steps, so the
            # next schedule sees them; only this step's waits for its own output. Deferred
            # whole, a member demoted here and preempted by that schedule got a starvation
            # deadline without them (found by the lazy-identity hypothesis test).
            earlier = {}
            for call in events:
                cid = call.core.id
                before = services[cid] - (0.0 if call in step.skipped else dt)
                if before > 0:
                    earlier[cid] = before
                    services[cid] -= before
            if earlier:
                self.core.on_step(earlier, now)
        self._charge(services, now)

        new_of = dict(run_batch)
        new_of.update(adm_batch)
        finished = []
        for call in order + admitted:
            if call in events:
                self._settle(call)
                if call.generated == call.output_tokens:
                    cohort.remove(call)
                    finished.append(call)
                    if self._lag_keys:
                        self._key_due.append((call, call.num_computed))
                else:  # its quantum ran out: demoted, with a fresh quantum
                    self._requantum_after_charges(call)
                continue
            new = new_of[call]
            call.service += dt
            if call.first_scheduled < 0:
                call.first_scheduled = start
            computed = call.num_computed = call.num_computed + new
            if computed == call.num_tokens:
                call.generated += 1
                call.num_tokens += 1
                call.sampled_in = self._sched_seq
                if call.generated == 1:
                    call.first_token = now
            if call.generated == call.output_tokens:
                finished.append(call)
            elif call.generated > 0 and call.num_computed == call.num_tokens - 1:
                self._join(call)
                if self._lag_keys and call.sampled_in != self._sched_seq:  # a recompute's last chunk
                    self._joined_unsampled.append(call)
        self._finish(finished, now)
