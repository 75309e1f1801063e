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
from dataclasses import dataclass, field
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
from sim.kvcache import BlockTable, KVCache
from sim.latency.base import LatencyModel, StepShape

_KEY = attrgetter("core.key")
INF = float("inf")

# A replica that computes this many times its live calls' tokens of prefill
# without any call sampling a token is livelocked: calls are preempted and
# recomputed before they finish prefill, over and over. Output tokens are
# never lost (a recomputed call keeps what it generated), so a run that
# samples tokens always ends; one that does not never would. A finite run
# needs at most about one recompute per policy preemption, far below this.
LIVELOCK_RECOMPUTES = 100


@dataclass(eq=False, slots=True)
class SimCall:
    """A call on an engine: the core's state plus token and KV bookkeeping."""

    program_id: str
    call_id: str
    prompt_tokens: int
    output_tokens: int
    keys: tuple[int, ...]  # content keys of the full blocks of prompt+output
    done: simpy.Event | None  # succeeded at finish, for callers that wait on it
    arrival: float
    # The call's parents in its program, whose pins its admission releases;
    # None when unknown (sim serve), and then it releases the pins of its
    # program whose history it re-sends. Seconds to pin its KV at finish
    # (0: none), for its program's follow-up.
    parents: tuple[str, ...] | None = None
    pin_ttl: float = 0.0
    core: CallState | None = None
    engine: int = -1
    num_tokens: int = 0  # prompt + generated
    num_computed: int = 0  # tokens whose KV is on the GPU (or swapped out)
    generated: int = 0
    swapped: bool = False
    blocks: BlockTable = field(default_factory=BlockTable)
    first_scheduled: float = -1.0
    first_token: float = -1.0
    finish: float = -1.0
    service: float = 0.0
    prefix_hit_tokens: int = 0
    # Lazy decode accounting (`sim.decode_cohort`): while ``steady`` the
    # token and service fields above are as of cohort step ``j_steps`` and
    # cohort service ``j_service``; ``q_due`` is the cohort service at
    # which the call's quantum runs out.
    steady: bool = False
    j_steps: int = 0
    j_service: float = 0.0
    q_due: float = 0.0
    sampled_in: int = -1  # the schedule (`Replica._sched_seq`) whose step sampled the last token

    def __post_init__(self) -> None:
        self.num_tokens = self.prompt_tokens


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


def core_call_id(program_id: str, call_id: str) -> str:
    """The scheduler core's id of a call: ``PROGRAM/CALL``, unambiguous whatever the ids hold.

    Trace ids may contain ``/``: program ``a/b`` call ``c`` and program ``a``
    call ``b/c`` would both read ``a/b/c`` and clash in the core. A ``/`` or
    ``\\`` in the program id is escaped with ``\\``, so the first unescaped
    ``/`` ends it; ids without either, as every generator writes, are unchanged.
    """
    if "/" in program_id or "\\" in program_id:
        program_id = program_id.replace("\\", "\\\\").replace("/", "\\/")
    return f"{program_id}/{call_id}"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Step durations are kept on a 2**-30 s (~1 ns) grid. Sums of such values
# are exact in float64 (below 2**22 s), so service added per step or as one
# lump is bit-identical, which lets steady decodes be accounted lazily.
_GRID = float(2**30)


def quantize(seconds: float) -> float:
    return round(seconds * _GRID) / _GRID


class Replica:
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

    # -- steady decodes, accounted lazily ----------------------------------------------
    # Most of a simulation's work is decode steps: each running call computes
    # one token and attains the step's duration. Doing that per call per step
    # costs ~8 us per call-step in Python, and a 1,000-program LATS run has
    # ~12 million of them. Instead a call that has sampled its first token
    # joins the replica's decode cohort (`sim.decode_cohort.DecodeCohort`):
    # the cohort counts its steps and service once per step, and a member's
    # token and service fields are brought up to date (``_settle``) only when
    # something needs them: it finishes, its quantum runs out, it is
    # preempted or aborted. Per step a member costs one budget check and one
    # block-boundary check; KV blocks are still allocated per call at the
    # step that needs them, so memory pressure and preemption happen at
    # exactly the same step.
    #
    # Results are bit-identical to the per-step path (``fast_forward: false``,
    # checked by a hypothesis test): step durations lie on a 2**-30 s grid,
    # so a lump of service equals the sum of its steps; charges and finishes
    # are applied in the order the per-step path applies them (the batch
    # order: running calls by key, then admitted ones).

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
            for call in self._policy_victims():  # worst first, as the plugin preempts them
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
        """The running calls the policy preempts this step for better-ranked waiting ones, worst first.

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
            for call in self._policy_victims():  # worst first, as the plugin preempts them
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
