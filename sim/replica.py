"""One engine replica: a SimPy process that loops over vLLM v1-style steps.

Scenario: calls arrive at any time (``submit``). Each step the replica

1. lets the scheduler core promote starving calls and, for preemptive
   policies, preempt running calls of worse rank so better waiting calls fit;
2. schedules the running calls in priority order: a decode takes one token
   of the budget, an unfinished prefill the next chunk; a call that cannot
   grow its KV evicts the worst unscheduled running call (possibly itself);
3. if nothing was preempted for memory, admits waiting calls in priority
   order while ``max_num_seqs``, the token budget and the KV cache allow,
   using prefix-cache hits (vLLM stops at the first call that does not fit,
   and so do we);
4. advances time by the latency model's step time plus any swap transfers,
   then charges service (`sim.core.attribute_service`), emits tokens, and
   finishes calls.

A token is sampled in the step that computes a call's last known token: the
prefill's final chunk yields the first output token, each decode one more.
Preemption by recompute frees the KV and recomputes prompt plus generated
tokens on readmission (vLLM v1); by swap it moves the KV over PCIe and back.

Steps are scheduled when the previous one ends. With
``engine.async_scheduling`` (``vllm serve``'s default) the replica shows each
decision what vLLM, scheduling one step ahead, could see then: calls
submitted during the step in flight, finished calls' slots and KV, and the
step's service charges wait one step longer. In exchange a step that
follows another back to back hides its CPU work (the latency model's
``host_time``) behind the GPU work of the one before (section "async
scheduling").

With ``engine.kv_ttl`` (Continuum's KV time-to-live) a finished call whose
program will send a follow-up keeps its keyed blocks pinned for that long,
or until one of its children is admitted here. (``sim serve`` does not know
the DAG: there a call tagged ``kv_ttl`` is pinned, and the pin ends when a
call of its program that re-sends the pinned history is admitted, as in the
vLLM plugin, `engine.kv_pins`.) Admission cannot evict a
pin. The oldest pins are released instead of preempting: before a running
call that cannot grow preempts anyone, and before a preemptive policy picks
victims for waiting calls that outrank running ones. An engine with nothing
running releases them until its best waiting call fits. So pins never idle
the engine; they hold back admissions while other calls run.
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable

import simpy

from sim.config import EngineConfig
from sim.core import SchedulerCore, TokenBudget, attribute_service
from sim.core.state import CallState
from sim.decode_cohort import DecodeCohort
from sim.draining import DrainingCalls
from sim.errors import SimulationError
from sim.kv_pins import SimKVPins
from sim.kvcache import KVCache
from sim.lazy_decode import LazyDecodePath, quantize
from sim.latency.base import LatencyModel, StepShape
from sim.sim_call import SimCall, core_call_id

_KEY = attrgetter("core.key")
INF = float("inf")

# A replica that computes this many times its live calls' tokens of prefill
# without any call sampling a token is livelocked: calls are preempted and
# recomputed before they finish prefill, over and over. Output tokens are
# never lost (a recomputed call keeps what it generated), so a run that
# samples tokens always ends; one that does not never would. A finite run
# needs at most about one recompute per policy preemption, far below this.
LIVELOCK_RECOMPUTES = 100


@dataclass(slots=True)
class StepInfo:
    """What an observer (tests, tracing) sees of each step after scheduling.

    Not frozen: ``end`` is filled in once the step's time has passed.
    """

    replica: int
    start: float
    scheduled: tuple[tuple[str, int], ...]  # (call id, new tokens)
    kv_in_use: int
    kv_capacity: int
    running: int
    waiting: int
    budget_left: int
    head_waiting_fits: bool  # the best waiting call would have fit as scheduled
    # For checks that do not trust the replica's own admission test: the
    # seats in use, whether the step preempted for memory (vLLM then admits
    # nothing), and the best waiting call the step could have admitted: its id,
    # its tokens (all need KV) and those left to compute.
    seats_taken: int = 0
    memory_preempted: bool = False
    head_call: str | None = None
    head_tokens: int = 0
    head_new_tokens: int = 0
    end: float = -1.0  # when the step's time had passed (set then); -1 for a step that took none


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Replica(LazyDecodePath):
    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        cfg: EngineConfig,
        latency: LatencyModel,
        core: SchedulerCore,
        kv: KVCache,
        kv_bytes_per_token: int,
        pcie_bandwidth: float,
        on_finish: Callable[[SimCall], None],
        on_progress: Callable[[SimCall, int, bool], None] | None = None,
        observer: Callable[[StepInfo], None] | None = None,
    ):
        self.env = env
        self.index = index
        self.cfg = cfg
        self.latency = latency
        self.core = core
        self.kv = kv
        self.block = cfg.block_size
        self.swap_seconds_per_block = cfg.block_size * kv_bytes_per_token / pcie_bandwidth
        # The step's token budget as the policy victim search counts it (`_policy_victims`).
        self._budget = TokenBudget(cfg.max_num_batched_tokens, self._asked_of, self._tokens_of,
                                   cfg.enable_chunked_prefill)
        self.on_finish = on_finish
        self.on_progress = on_progress
        self.observer = observer
        # Steady decodes accounted lazily (`sim.decode_cohort`) unless something must see every step.
        self.lazy = cfg.fast_forward and on_progress is None and observer is None
        self.waiting: list[SimCall] = []  # kept sorted by key
        self.running: list[SimCall] = []
        self._wake: simpy.Event | None = None
        self._aborted: set[SimCall] = set()  # aborted while their step is in flight
        self._live: dict[str, SimCall] = {}  # core call id -> call, for victim lookups
        self.steps = 0
        self.lazy_decode_steps = 0  # decode call-steps accounted lazily (cohort members)
        self.coasted_steps = 0  # steps taken inside another step's timeout (`_coast`)
        self.cohort = DecodeCohort(cfg.block_size)  # the running calls whose decodes are accounted lazily
        self._unsorted = False  # running may be out of key order (lazy path)
        self.preemptions = 0
        self.busy_time = 0.0
        self.prefill_tokens = 0  # tokens computed in chunks of more than one (prompts and recomputes)
        self.swap_seconds = 0.0  # step time spent moving swapped KV over PCIe
        # Finished calls' KV kept for their follow-ups; the replica decides when a pin gives way
        # (for a running call that cannot grow, a better-ranked waiting one, an idle engine's head).
        self.kv_pins = SimKVPins(kv)
        self._stalled_tokens = 0  # prefill tokens computed since a call last sampled a token
        self._stall_check = LIVELOCK_RECOMPUTES * cfg.max_num_batched_tokens
        # Async scheduling (see "async scheduling" below): calls submitted
        # while a step is in flight, with their submit times, and finished
        # calls still holding a sequence slot and their KV blocks until the
        # next step has been scheduled.
        self._async = cfg.async_scheduling
        self._staged: list[tuple[float, SimCall]] = []
        self._arriving: list[tuple[float, SimCall]] = []  # submitted during the step in flight (`submit`)
        self._in_step = False  # a step's timeout is running
        self.draining = DrainingCalls(kv, self.kv_pins)  # finished calls still holding their slot and KV (async)
        self._last_start = -INF  # start of the step that completed last
        self._overlap = False  # async: this step was scheduled while the last one ran (`_overlapped_seconds`)
        # A step's duration when it follows the last one back to back.
        self._steady_seconds = self._overlapped_seconds if self._async else latency.step_time
        # Async with prefix caching: blocks whose last token was in flight
        # when scheduled, keyed one schedule late (see "async scheduling").
        self._sched_seq = 0  # schedules so far, empty ones included
        self._key_due: list[tuple[SimCall, int]] = []  # (call, tokens) to key after this schedule
        self._key_next: list[tuple[SimCall, int]] = []  # ... after the next one
        self._lag_keys = self._async and kv.prefix_caching
        # Async: what the last step's output tells the scheduler core,
        # applied after the next schedule (`_apply_outputs`): its service
        # charges, the members whose quantum expiry is due once charged, and
        # the calls it finished.
        self._outputs_due = False
        self._charges: dict[str, float] = {}
        self._requantum: list[SimCall] = []
        self._finished: list[SimCall] = []
        self._preemptions_charged = 0  # self.preemptions when charges were last applied
        self._last_dt = 0.0  # lazy path: the last step's duration, and the members it skipped
        self._last_skipped: list[SimCall] = []
        self._joined_unsampled: list[SimCall] = []  # members that joined last step without sampling (async keys)
        self._info: StepInfo | None = None  # the observer's view of the step being scheduled
        self.process = env.process(self.run(env))

    # -- interface ---------------------------------------------------------------------
    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running) + len(self._staged) + len(self._arriving)

    def submit(self, call: SimCall) -> None:
        """A call reaches this engine now.

        While a step is in flight the scheduler learns of it only when the
        step ends, after the step's service is charged, as vLLM's engine
        core adds requests between steps: the plugin's core sees the
        arrival then, so both rank it against the same queue state.
        """
        call.engine = self.index
        if self._in_step:
            self._arriving.append((self.env.now, call))
            return
        self._register(call, self.env.now)
        if self._async and self._wake is None:  # scheduled at this instant: its successor already is
            self._staged.append((self.env.now, call))
            return
        insort(self.waiting, call, key=_KEY)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def is_arriving(self, program_id: str, thread_id: str | None = None) -> bool:
        """Whether a call of this program thread (of any thread, if None) was submitted during
        the step in flight (not yet registered)."""
        return any(c.program_id == program_id and thread_id in (None, c.call_id) for _, c in self._arriving)

    def arriving_programs(self) -> set[str]:
        """Programs with a call submitted during the step in flight: not idle, though not yet in the table's live set."""
        return {c.program_id for _, c in self._arriving}

    def _register(self, call: SimCall, now: float) -> None:
        call.core = self.core.add_call(
            core_call_id(call.program_id, call.call_id), call.program_id, call.call_id, call.prompt_tokens, now
        )
        self._live[call.core.id] = call

    def _register_arriving(self, until: float = INF) -> None:
        """At a step's end: the calls submitted during it (up to time ``until``) join the scheduler, in submission order.

        Under async scheduling they wait in ``_staged`` one step more, as
        the step after this one was scheduled before they arrived.
        """
        now = self.env.now
        n = 0
        for t, call in self._arriving:
            if t > until:
                break
            n += 1
            self._register(call, now)
            if self._async:
                self._staged.append((t, call))
            else:
                insort(self.waiting, call, key=_KEY)
        del self._arriving[:n]

    def abort(self, call: SimCall) -> bool:
        """Drop a call whose client went away, as vLLM's abort does.

        Its KV is freed at once and ``on_finish`` is never called; its
        service is not charged to its program. A running call may be in the
        step in flight: that step's completion skips it. Returns False if
        the call already finished or was aborted.

        Aborts come from `sim.realtime`, which watches every step
        (``on_progress``) and so runs the per-step path. On the lazy path a
        decode left out of the step in flight would settle one token short
        here, so a replica on that path refuses every abort, whatever the
        call's state, rather than some by timing.
        """
        if self.lazy:
            raise RuntimeError("Replica.abort needs the per-step path (fast_forward: false, or an on_progress "
                               "observer): lazily accounted decodes cannot be aborted mid-step")
        if any(c is call for _, c in self._arriving):
            self._arriving = [(t, c) for t, c in self._arriving if c is not call]
            return True  # the scheduler never saw it
        if call.finish >= 0 or call.core is None or call.core.finished:
            return False
        if call in self.waiting:
            self.waiting.remove(call)  # stays sorted
        elif any(c is call for _, c in self._staged):
            self._staged = [(t, c) for t, c in self._staged if c is not call]
        else:
            self._leave(call, self.env.now)
            self.running.remove(call)
            self.kv.release(call.blocks)
            self._aborted.add(call)
        self.core.abort_call(call.core, self.env.now)
        del self._live[call.core.id]
        return True

    def refresh_order(self) -> None:
        """Re-sort waiting calls after keys changed outside a step (SRPT refresh)."""
        self.waiting.sort(key=_KEY)
        self._unsorted = True

    # -- the step loop ---------------------------------------------------------------
    def run(self, env: simpy.Environment):
        lazy = self.lazy
        empty_at = -1.0  # start of the last step that scheduled nothing
        while True:
            if self._staged:
                self._reveal(self._last_start)
            if not self.running and not self.waiting:
                if self._staged or self.draining or self._outputs_due:  # nothing in flight: vLLM schedules them at once
                    if self.kv_pins.expiries_queued():  # vLLM's empty schedule before it processes the last output
                        self._expire_pins(env.now)
                    if self._lag_keys:
                        self._key_late()
                    self.draining.release(env.now)
                    self._apply_outputs()
                    self._reveal(INF)
                    self._overlap = False
                    continue
                self._overlap = False
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            start = env.now
            if lazy:
                step = self._schedule_lazy(start)
                batch, transfer, members = step.batch, step.transfer, step.members
            else:
                batch, transfer = self._schedule(start)
                members = 0
            if self._lag_keys:
                self._key_late()
            freed = self.draining.release(start)
            if self._outputs_due:
                self._apply_outputs()
            if not batch and not members and (freed or self._staged):
                # Async: the step scheduled before the last one's outputs is
                # empty, so vLLM schedules again at once with them applied.
                self._reveal(INF)
                self._overlap = False
                continue
            if self.observer is not None:
                self.observer(self._info)
            if not batch and not members:
                if self.running or not self.waiting or empty_at == start:
                    raise RuntimeError(f"engine {self.index} stalled at t={start} with runnable calls")
                # Everything was preempted this step; readmit next iteration.
                empty_at = start
                self._overlap = False
                continue
            if not members:
                shape = self._shape(batch)
            elif not batch:
                shape = StepShape(members, members, members, step.member_kv, 0, 0)
            else:
                shape = self._shape(batch)
                shape = StepShape(
                    shape.num_seqs + members, shape.num_tokens + members, shape.num_decode + members,
                    shape.decode_kv_tokens + step.member_kv, shape.prefill_tokens, shape.prefill_attn_pairs,
                    shape.prefill_kv_tokens,
                )
            if members or any(c.num_computed + n == c.num_tokens for c, n in batch):
                self._stalled_tokens = 0
            else:
                self._stalled_tokens += shape.num_tokens
                if self._stalled_tokens > self._stall_check:
                    self._check_progress(start)
            seconds = self._steady_seconds if self._overlap else self.latency.step_time
            dt = quantize(seconds(shape) + transfer)
            self.steps += 1
            self.busy_time += dt
            self.prefill_tokens += shape.prefill_tokens
            self.swap_seconds += transfer
            delay = dt
            if (
                lazy and not batch and not self.waiting and not self._staged
                and not step.skipped and not step.finishing and not transfer
            ):
                delay, dt, start = self._coast(start, dt)
            self._last_start = start
            self._in_step = True
            yield env.timeout(delay)
            self._in_step = False
            if self.observer is not None:
                self._info.end = env.now
            self._overlap = self._async
            if lazy:
                self._complete_lazy(step, dt, start)
            else:
                self._complete(batch, dt, start)
            if self._async:
                # Calls submitted during the step join after its output is
                # applied (`_apply_outputs`), except those submitted as it
                # started (after it was scheduled): vLLM added them before
                # scheduling the next step, with the previous output applied.
                self._outputs_due = True
                if self._arriving and self._arriving[0][0] <= start:
                    self._register_arriving(start)
            elif self._arriving:
                self._register_arriving()

    def _check_progress(self, now: float) -> None:
        """Raise if the prefill since the last sampled token is a livelock (`LIVELOCK_RECOMPUTES`)."""
        work = sum(c.num_tokens for c in self._live.values())
        limit = LIVELOCK_RECOMPUTES * max(work, self.cfg.max_num_batched_tokens)
        if self._stalled_tokens <= limit:
            self._stall_check = limit
            return
        # Only policy preemption without a limit can do this: memory
        # preemption always lets the best-ranked call progress.
        raise SimulationError(
            f"engine {self.index} livelocked at t={now:.3f} s: it computed {self._stalled_tokens} prompt "
            f"tokens, more than {LIVELOCK_RECOMPUTES}x its {len(self._live)} live calls' {work} tokens, without any "
            f"call sampling a token, because policy {self.core.policy.name!r} preempts calls before they "
            f"finish prefill and recompute throws the work away; set policy_params.preempt_limit to an "
            f"integer (default 1), use engine.preemption_mode=swap, or give calls a longer quantum "
            f"(policy_params.queue_base)"
        )

    # -- scheduling --------------------------------------------------------------------
    def _key_full_blocks(self, call: SimCall, computed: int) -> None:
        """Key ``call``'s full blocks up to ``computed`` tokens for the prefix cache.

        The scheduling paths call it with the end of the chunk they schedule:
        vLLM caches a request's blocks when it schedules them
        (``KVCacheManager.allocate_slots``), not when they are computed, so
        a call admitted later in the same step hits blocks a running call or
        an earlier admission fills in this step: LATS siblings that arrive
        together compute their parent's evicted context once, not once
        each. Cohort members' decode blocks are keyed when the member is
        settled instead; only their own follow-ups could hit them, and those
        cannot arrive before the member finishes.

        Under async scheduling a decode's input token, sampled by the step
        just ended, is still in flight when vLLM schedules the next step, so
        vLLM cannot key a block that token fills until it processes that
        output, after scheduling once more, and skips a call preempted by
        then (`AsyncScheduler._update_request_with_output`). Such a block
        waits in ``_key_next`` (`_key_late`); a call preempted in between
        recomputes it.
        """
        blocks = call.blocks
        if self._lag_keys and computed == call.num_tokens and call.sampled_in == self._sched_seq - 1:
            computed -= 1
            if (computed + 1) % self.block == 0:
                self._key_next.append((call, computed + 1))
        if blocks.private and computed // self.block > len(blocks.keys):
            self.kv.register_full(blocks, call.keys, computed)

    def _key_late(self) -> None:
        """Async: key the blocks held back one schedule ago, for the calls that still hold them.

        Called once per schedule, after it. Cohort members' blocks filled by
        the last step join ``_key_due`` when that schedule starts, and those
        of a member that finished in it when it completes: with coasting
        steps, which key as they go, that is every block vLLM keys, at the
        same schedule. A call preempted or aborted meanwhile has released its
        blocks and is skipped, as vLLM skips it.
        """
        block, kv = self.block, self.kv
        for call, tokens in self._key_due:
            blocks = call.blocks
            if blocks.private and tokens // block > len(blocks.keys):
                kv.register_full(blocks, call.keys, tokens)
        self._key_due = self._key_next
        self._key_next = []

    def _preempt(self, call: SimCall, now: float) -> float:
        """Move a running call back to waiting; returns swap-out seconds."""
        self.running.remove(call)
        self.preemptions += 1
        transfer = 0.0
        if self.cfg.preemption_mode == "swap":
            transfer = cdiv(call.num_computed, self.block) * self.swap_seconds_per_block
            call.swapped = True
        else:
            call.num_computed = 0
        self.kv.release(call.blocks)
        self.core.on_preempted(call.core, now)
        insort(self.waiting, call, key=_KEY)
        return transfer

    def _policy_victims(self) -> list[SimCall]:
        """The running calls the policy preempts this step for better-ranked waiting ones, in the search's order.

        Under async scheduling a call that finished in the step just ended
        is still running for vLLM (its last token is in flight), so it is a
        candidate too, as in the plugin. Such a victim (``finish >= 0``) is
        only dropped (`DrainingCalls.drop`): its slot and KV are freed a step
        early, as `DrainingCalls.evict_below` does for memory, and it pins nothing.
        Like that memory victim it is not counted as a preemption (vLLM
        counts one), since no work is redone.
        """
        running, policy = self.running, self.core.policy
        worst = running[-1].core if running else None
        draining = [c.core for c in self.draining]
        if draining:
            last = max(draining, key=attrgetter("key"))
            if worst is None or worst.key < last.key:
                worst = last
        # Fast exit: the best waiting call outranks nobody if not the worst running one.
        if worst is None or not policy.outranks(self.waiting[0].core, worst):
            return []
        if self.kv_pins:
            self._unpin_for_better_waiting(worst)
        victims = self.core.choose_victims(
            [c.core for c in running] + draining,
            [c.core for c in self.waiting[: self.cfg.max_num_seqs]],
            self.cfg.max_num_seqs - self._seats_taken(),
            self.kv.free,
            self._need_of,
            self._freed_of,
            self._budget,
        )
        return list(map(self._by_core, victims))

    def _blocks_to_admit(self, call: SimCall) -> int:
        """Blocks a waiting call needs, every prefix hit counted as taking one (the plugin's `_blocks_needed` too).

        The whole sequence under reserve_full_isl, else the first chunk
        past its prefix hit, as the admission gate (`_fits`) counts them. A
        hit on a block another call holds takes no free block, so this may
        over-count; not subtracting it keeps the estimate consistent with
        the victims' freed blocks (`_freed_of`), which count a block only a
        victim holds, and with pins that give way (a follow-up's hits on its
        own pin). Ignoring the hit's length, as before, under-counted a long
        history mostly cached when only the first chunk is checked.
        """
        if self.cfg.scheduler_reserve_full_isl:
            return cdiv(call.num_tokens, self.block)
        base = self._admission_base(call)
        first = min(call.num_tokens - base, self.cfg.max_num_batched_tokens)
        return cdiv(base + first, self.block)

    def _admission_base(self, call: SimCall) -> int:
        """The tokens a waiting call's admission starts from: its swapped-out KV, else its prefix hit (`_admission`)."""
        if call.swapped:
            return call.num_computed
        return self.kv.hit_blocks(call.keys, (call.num_tokens - 1) // self.block) * self.block

    def _schedule(self, now: float):
        cfg, kv, core = self.cfg, self.kv, self.core
        self._sched_seq += 1
        if self.kv_pins.expiries_queued():
            self._expire_pins(now)
        if core.promote_starving(now):
            self.waiting.sort(key=_KEY)
        self.running.sort(key=_KEY)
        transfer = 0.0
        held: set[SimCall] = set()  # this step's policy victims sit it out (see _admit)

        if core.policy.preemptive and core.policy.params.preemption and self.waiting:
            for call in self._policy_victims():  # in the search's order, as the plugin preempts them
                if call.finish >= 0:
                    self.draining.drop(call)
                    continue
                transfer += self._preempt(call, now)
                held.add(call)

        budget = cfg.max_num_batched_tokens
        batch: list[tuple[SimCall, int]] = []
        preempted_for_memory = False
        chunked = cfg.enable_chunked_prefill
        block = self.block
        pending = self.running[:]  # best first; the tail is the worst unscheduled call
        i = 0
        while i < len(pending):
            call = pending[i]
            i += 1
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
                kv.allocate(blocks, need)
            self._key_full_blocks(call, computed + new)
            batch.append((call, new))
            budget -= new

        head_fits = True
        head = None
        if not preempted_for_memory:
            budget, swap_in = self._admit(batch, budget, held)
            transfer += swap_in
            if self.observer is not None:
                head = next((c for c in self.waiting if c not in held), None)
                if head is not None:
                    head_fits = self._would_fit(head, budget)
        if self.observer is not None:
            seats = self._seats_taken()
            self._info = StepInfo(
                self.index, now, tuple((c.core.id, n) for c, n in batch), kv.in_use, kv.capacity,
                len(self.running), len(self.waiting), budget,
                head_fits and not preempted_for_memory and any(c not in held for c in self.waiting)
                and seats < cfg.max_num_seqs and budget > 0,
                seats, preempted_for_memory,
                None if head is None else head.core.id,
                0 if head is None else head.num_tokens,
                0 if head is None else head.num_tokens - (head.num_computed if head.swapped else 0),
            )
        return batch, transfer

    def _admit(self, batch: list[tuple[SimCall, int]], budget: int, held: set[SimCall]) -> tuple[int, float]:
        """Admit waiting calls in order while they fit; returns (budget left, swap-in seconds).

        vLLM stops at the first call that does not fit, and so do we. The
        ``held`` calls, this step's policy victims, are passed over: the
        calls they made room for may need fewer blocks than the victim
        search assumed (prefix hits), and the victim must not be readmitted
        into the step that preempted it. The vLLM plugin holds them out of
        the waiting queue the same way (under async scheduling vLLM would
        duplicate their in-flight token).
        """
        cfg, kv = self.cfg, self.kv
        transfer = 0.0
        admitted = 0
        if self.kv_pins and not self.running and not self.draining and self.waiting:
            self._unpin_for_head()
        seats = cfg.max_num_seqs - len(self.draining)
        for call in self.waiting:
            if len(self.running) >= seats or budget == 0:
                break
            if call in held:
                continue
            new, hits, fresh, swap_in = self._admission(call, budget)
            if new == 0 or not self._fits(call, hits, fresh):
                break
            kv.acquire_hits(call.blocks, call.keys, hits)
            kv.allocate(call.blocks, fresh)
            if self.kv_pins:
                if call.parents is None:
                    self.kv_pins.release_taken_up(call.program_id, call.keys)
                else:
                    for parent in call.parents:
                        self.kv_pins.release_call((call.program_id, parent))
            if call.swapped:
                transfer += swap_in * self.swap_seconds_per_block
                call.swapped = False
            else:
                call.num_computed = hits * self.block
                if call.core.preemptions == 0:  # the prompt's hit, not re-hits after preemption
                    call.prefix_hit_tokens = hits * self.block
            self._key_full_blocks(call, call.num_computed + new)
            self.running.append(call)
            self.core.on_admitted(call.core)
            batch.append((call, new))
            budget -= new
            admitted += 1
        if admitted:
            if held:  # the admitted calls are the first non-held ones, now running
                self.waiting[:] = [c for c in self.waiting if not c.core.running]
            else:
                del self.waiting[:admitted]
            self._unsorted = True
        return budget, transfer

    def _admission(self, call: SimCall, budget: int) -> tuple[int, int, int, int]:
        """(new tokens, prefix-hit blocks, fresh blocks, blocks to swap in) to admit ``call``."""
        total = call.num_tokens
        if call.swapped:
            held = cdiv(call.num_computed, self.block)
            hits = self.kv.hit_blocks(call.keys, min(held, (total - 1) // self.block))
            base = call.num_computed
        else:
            hits = self.kv.hit_blocks(call.keys, (total - 1) // self.block)
            held = hits
            base = hits * self.block
        new = total - base
        if new > budget:
            if not self.cfg.enable_chunked_prefill:
                return 0, 0, 0, 0
            new = budget
        fresh = cdiv(base + new, self.block) - hits
        return new, hits, fresh, held - hits

    def _fits(self, call: SimCall, hits: int, fresh: int) -> bool:
        """vLLM's admission gate: the first chunk's blocks, or (reserve_full_isl) the whole sequence's."""
        if self.cfg.scheduler_reserve_full_isl:
            fresh = cdiv(call.num_tokens, self.block) - hits
        return self.kv.can_allocate(fresh + self.kv.hit_cost(call.keys, hits))

    def _would_fit(self, call: SimCall, budget: int) -> bool:
        new, hits, fresh, _ = self._admission(call, budget)
        return new > 0 and self._fits(call, hits, fresh)

    def _need_of(self, core_call: CallState) -> int:
        return self._blocks_to_admit(self._by_core(core_call))

    def _freed_of(self, core_call: CallState) -> int:
        return self.kv.freed_by_release(self._by_core(core_call).blocks)

    def _asked_of(self, core_call: CallState) -> int:
        """The tokens a running call asks of the running pass: a steady decode's one (its fields lag),
        else its unscheduled rest; a draining call (finished, async) is not in that pass."""
        call = self._by_core(core_call)
        if call.finish >= 0:
            return 0
        return 1 if call.steady else call.num_tokens - call.num_computed

    def _tokens_of(self, core_call: CallState) -> int:
        """The tokens a waiting call would compute, past its prefix hit or swapped-out KV (`_admission`)."""
        call = self._by_core(core_call)
        return call.num_tokens - self._admission_base(call)

    def _by_core(self, core_call: CallState) -> SimCall:
        return self._live[core_call.id]

    # -- async scheduling ----------------------------------------------------------------
    # With vLLM's async scheduling the engine schedules step N+1 as soon as
    # step N is launched, and processes N's outputs while N+1 runs. The step
    # loop here still decides each step when the previous one ends, so it
    # reproduces what that earlier decision could see: calls submitted while
    # step N ran are held back (``_staged``) and join the waiting queue one
    # step later; a call that finished in step N keeps its sequence slot and
    # KV blocks (`sim.draining.DrainingCalls`) until step N+1 has been scheduled, as vLLM
    # only frees them when it processes N's outputs; until then it may still
    # be a memory or policy victim, which frees them early. The scheduler
    # core, too, learns of step N (its service charges, demotions and
    # finished calls, then the calls that arrived during it) only after step
    # N+1 has been scheduled (`_apply_outputs`), as our vLLM plugin does in
    # `update_from_output`. A step scheduled while the previous one ran
    # overlaps its CPU work (`LatencyModel.host_time`) with that step's GPU
    # work, so back to back it takes max(step - host, host); the first step
    # after an idle engine or a schedule that had to wait for outputs pays
    # its host time in full, as every synchronous step does.

    def _overlapped_seconds(self, shape: StepShape) -> float:
        """An async step's duration when it follows the previous one back to back: host time overlapped."""
        t = self.latency.step_time(shape)
        host = min(self.latency.host_time(shape), t)  # capped at the whole step
        return max(t - host, host)

    def _seats_taken(self) -> int:
        return len(self.running) + len(self.draining)

    def _reveal(self, cut: float) -> None:
        """Move staged calls submitted at or before ``cut`` to the waiting queue."""
        keep = []
        for t, call in self._staged:
            if t <= cut:
                insort(self.waiting, call, key=_KEY)
            else:
                keep.append((t, call))
        self._staged = keep

    def _make_room(self, call: SimCall, need: int, pending: list[SimCall], i: int, now: float) -> tuple[float, bool]:
        """Free ``need`` blocks for running ``call`` as vLLM's running pass does.

        Pins give way first; then the worst running call not yet scheduled
        in this step (``pending[i:]``) is preempted, or a finished call whose
        last token is in flight if it ranks lower, or else ``call`` itself.
        Returns (swap-out seconds, whether anything was preempted).
        """
        kv = self.kv
        if self.kv_pins:
            self.kv_pins.drop_until_free(need)
        transfer, preempted = 0.0, False
        while need > kv.capacity - kv.in_use:
            preempted = True
            # The core's rule, the worst key, over ``call`` and the calls not yet scheduled in this
            # step (``pending[i:]``, in key order: its worst is its tail), so two candidates suffice.
            tail = pending[-1] if len(pending) > i else call
            victim = tail if self.core.memory_victim([call.core, tail.core]) is tail.core else call
            if self.draining.evict_below(victim):
                continue
            if victim is not call:
                pending.pop()
            self._leave(victim, now)  # settles a lazily accounted member; nothing for the others
            transfer += self._preempt(victim, now)
            if victim is call:
                break
        return transfer, preempted

    @staticmethod
    def _shape(batch: list[tuple[SimCall, int]]) -> StepShape:
        return StepShape.from_batch((new, call.num_computed) for call, new in batch)

    # -- step completion ---------------------------------------------------------------
    def _complete(self, batch: list[tuple[SimCall, int]], dt: float, start: float) -> None:
        """Apply one step of ``dt`` seconds to every call in it (the per-step reference path)."""
        now = self.env.now
        if self._aborted:
            batch = [(c, n) for c, n in batch if c not in self._aborted]
            self._aborted.clear()
        self._charge(attribute_service(dt, [c.core.id for c, _ in batch]), now)
        on_progress = self.on_progress
        finished = []
        for call, new in batch:
            call.service += dt
            if call.first_scheduled < 0:
                call.first_scheduled = start
            computed = call.num_computed = call.num_computed + new
            sampled = computed == call.num_tokens
            if sampled:
                call.generated += 1
                call.num_tokens += 1
                call.sampled_in = self._sched_seq
                if call.generated == 1:
                    call.first_token = now
            if on_progress is not None:
                on_progress(call, new, sampled)
            if call.generated == call.output_tokens:
                finished.append(call)
        self._finish(finished, now)

    def _charge(self, services: dict[str, float], now: float) -> None:
        """Hand a step's service to the core: at once, or under async with its output (`_apply_outputs`)."""
        if self._async:
            self._charges = services
        else:
            self.core.on_step(services, now)

    def _finish(self, finished: list[SimCall], now: float) -> None:
        kv = self.kv
        for call in finished:
            call.finish = now
            if self._async:  # its last token is in flight: slot and KV held (pinned) later
                self.draining.add(call)
            elif call.pin_ttl > 0 and call.blocks.keys:
                self._pin(call, call.pin_ttl)
            else:
                kv.release(call.blocks)
            self.running.remove(call)
            if self._async:
                self._finished.append(call)
            else:
                self._close(call, now)

    def _close(self, call: SimCall, now: float) -> None:
        """The core and the caller learn that ``call`` finished."""
        self.core.finish_call(call.core, now)
        del self._live[call.core.id]
        self.on_finish(call)
        if call.done is not None:
            call.done.succeed()

    def _apply_outputs(self) -> None:
        """Async: the last step's output reaches the scheduler core, after the next step was scheduled.

        vLLM's engine core schedules step N+1 before it processes step N's
        output (`update_from_output`), so the plugin charges step N's
        service, demotes calls and completes finished ones only then, and
        adds the requests that arrived during step N after that. The
        replica does the same at the same instant: decisions for step N+1
        see the core as of step N-1, one step stale, as in vLLM.
        """
        self._outputs_due = False
        now = self.env.now
        if self._charges:
            self.core.on_step(self._charges, now)
            self._charges = {}
            self._unsorted = True  # a demoted running call moves back in the order
            if self.preemptions != self._preemptions_charged:
                # A call preempted by the schedule in between was charged
                # while waiting and may have been demoted there.
                self._preemptions_charged = self.preemptions
                self.waiting.sort(key=_KEY)
        if self._requantum:
            for call in self._requantum:
                if call.steady:  # not preempted by the schedule in between
                    self.cohort.push_quantum(call)
            self._requantum.clear()
        if self._finished:
            for call in self._finished:
                self._close(call, now)
            self._finished.clear()
        if self._arriving:
            self._register_arriving()

    # -- KV pins (Continuum's time-to-live; the table is `sim.kv_pins.SimKVPins`) ----------
    def _pin(self, call: SimCall, ttl: float) -> None:
        """Keep a finished call's keyed blocks for its program's follow-up, for ``ttl`` seconds."""
        self.kv_pins.pin((call.program_id, call.call_id), call.blocks, self.env.now + ttl)

    def _expire_pins(self, now: float) -> None:
        """Release the pins whose time-to-live has passed; called as each step is scheduled.

        As in the plugin (`engine.kv_pins.KVPins.expire`), expiry happens
        when the engine schedules, so expired blocks rejoin the LRU order
        after the blocks freed by the step that just ended. It needs no
        wake-up: an engine sleeps only with no calls at all, and one with
        nothing running unpins until its best waiting call fits.
        """
        self.kv_pins.expire(now)

    def _unpin_for_better_waiting(self, worst: CallState) -> None:
        """Before a preemptive policy picks victims, release the oldest pins for the calls it would preempt for.

        Those are the waiting calls (best first, as many as may run) that
        outrank the ``worst`` running call; each may need the blocks to admit it.
        """
        outranks = self.core.policy.outranks
        pins = self.kv_pins
        need = 0
        for call in self.waiting[: self.cfg.max_num_seqs]:  # one call at a time, as the plugin counts them
            if not outranks(call.core, worst):
                break
            need += self._blocks_to_admit(call)
            pins.drop_until_free(need)
            if not pins:
                break

    def _unpin_for_head(self) -> None:
        """With nothing running, release the oldest pins until the best waiting call fits.

        It then fits, as any call fits an empty engine (`sim.simulate.check_fits`).
        """
        budget, pins = self.cfg.max_num_batched_tokens, self.kv_pins
        while pins and not self._would_fit(self.waiting[0], budget):
            pins.drop_oldest()
