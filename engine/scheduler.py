"""The program-aware vLLM v1 scheduler plugin (Autellix PLAS/ATLAS, MLFQ, FCFS).

Load it in the engine-core process with vLLM's ``scheduler_cls``::

    vllm serve MODEL --scheduler-cls engine.scheduler.ProgramAwareAsyncScheduler \
        --additional-config '{"autellix": {"policy": "plas", "params": {"beta": 8}}}'

That is the class for async scheduling, vLLM 0.26.0's default (vLLM's
``AsyncScheduler`` adds the output placeholders that mode needs); with
``--no-async-scheduling`` use ``engine.scheduler.ProgramAwareScheduler``.
Configuration and request tags (``extra_args``: ``program_id``,
``thread_id``, ``program_service``) are described in `engine.plugin_config`.

Why a subclass and not vLLM's own priority mode: that mode orders the
waiting queue by ``request.priority`` but only preempts when the KV cache is
full, never to let a better waiting request in at ``max_num_seqs``
(DESIGN.md section 6). The decisions themselves come from
`sim.core.SchedulerCore`, imported verbatim, so the simulator and the real
engine run the same policy code. The plugin only translates vLLM events
into the core's calls, once per engine step and in the core's order:

1. ``schedule()``: ``promote_starving(now)``; then ``choose_victims`` with
   free seqs ``max_num_seqs - len(running)``, the block pool's free blocks
   and the admissible requests of both of vLLM's waiting queues, and each victim is preempted exactly as vLLM preempts
   (`Scheduler._preempt_request`: free KV, ``num_computed_tokens = 0``,
   status PREEMPTED, back into the waiting heap); then vLLM's own
   ``schedule()`` runs the running requests in key order and admits waiting
   ones in heap order. Every preemption (ours or vLLM's own when the KV cache
   runs out) reaches ``on_preempted`` through the `_preempt_request`
   override; every admission reaches ``on_admitted``.
2. ``update_from_output()``: ``on_step(attribute_service(step_seconds,
   scheduled ids), now)``, then vLLM's processing, during which finished
   requests reach ``finish_call`` (or ``abort_call`` if errored, or
   aborted before any service) through the `_free_request` override. An
   abort that vLLM takes while a step runs (before its output) first
   charges the call that step's time so far (`_charge_aborted_in_step`).

Ordering: the waiting queues are forced to vLLM's PRIORITY heap and each
request's ``priority`` is set to `encode_key` of the core's key, so the
heap pops in exactly the core's order (keys are unique, so vLLM's
``arrival_time`` tie-break never decides). A client's own ``priority`` is
overwritten. Keys change only on arrival, on demotion (a served call, which
is running, so not in the heap) and on starvation promotion (waiting); the
heap is re-heapified, O(n), only in the steps where a queued request's key
changed. vLLM's memory victim in PRIORITY mode is the running request of
largest ``(priority, arrival_time)``, which is the core's `memory_victim`.

Service and time: ``step_seconds`` is the wall-clock time from a
``schedule()`` to its matching ``update_from_output()``, measured by the
``clock`` attribute (default `time.monotonic`; tests inject a fake). Under
async scheduling two steps overlap, so a step's interval starts at the later
of its ``schedule()`` and the previous ``update_from_output()``: the GPU runs
one batch at a time, and the intervals then tile the busy time exactly once.
All times handed to the core come from the same clock.

KV pins (``kv_ttl`` tag, Continuum's time-to-live; `engine.kv_pins`): a
finished call tagged with ``kv_ttl`` (completed, or aborted after service,
which is how a stop string ends) keeps its cached blocks referenced,
so admissions cannot evict them, until a call of its program is admitted
holding them, or the TTL passes. Pins give way to work by the simulator's
rules (`sim.replica`):

* a running request that cannot grow releases the oldest pins before vLLM
  preempts anyone: the plugin wraps the ``allocate_slots`` of this
  scheduler's own `KVCacheManager` (vLLM's loop calls it, then preempts on
  None, with no hook in between). The wrapper costs about 0.5 us per call,
  about 130 us per step with 256 running decodes
  (``benchmarks/bench_core_decision.py``). So it is installed only for a
  step that holds pins and could run short of free blocks
  (`_sync_giving_way`);
* with nothing running, the waiting request being admitted releases the
  oldest pins until it fits (the same wrapper), so pins never idle the GPU;
* before a preemptive policy picks victims, the oldest pins are released
  until the waiting calls that outrank the worst running one would fit.

Otherwise pins hold back admissions while other requests run.

Per-step cost: O(promoted + admitted + scheduled) bookkeeping, an O(running)
sort of an almost-sorted list, and a victim search that returns at once
unless the best waiting request outranks the worst running one
(``benchmarks/bench_core_decision.py`` measures it).
"""

from __future__ import annotations

import math

import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from engine.kv_pins import KVPins
from engine.plugin_config import PluginConfig, PluginConfigError, parse_plugin_config, read_tags
from sim.core import Policy, ProcessTable, SchedulerCore, TokenBudget, attribute_service, make_policy
from sim.core.state import CallState

logger = logging.getLogger(__name__)

# Keys are (queue, sequence number). 2**48 sequence numbers outlast any
# run (a century at 10**5 queue entries per second), and the encoded value
# stays within int64 for up to 2**15 queues. program_fcfs puts the program's
# number in the queue's place, so its values pass int64 after 32,768
# programs; vLLM compares priorities as Python ints, which have no bound.
KEY_STRIDE = 1 << 48
# How often idle programs are dropped from the process table (clock seconds).
EXPIRE_EVERY = 1.0
# Finished statuses that count as a completed call. An aborted call that
# received service is charged too (`_free_request`); the others (ignored,
# error, aborted before any service) are dropped without charging the program.
_COMPLETED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_REPETITION}
)
_PRIORITY = attrgetter("priority")
# Statuses vLLM's waiting pass admits as they stand, in either waiting queue.
_ADMISSIBLE = frozenset({RequestStatus.WAITING, RequestStatus.PREEMPTED})


def encode_key(key: tuple) -> int:
    """The core's ``(queue, sequence)`` key as one integer with the same order."""
    queue, seq = key
    if not (0 <= seq < KEY_STRIDE):
        raise OverflowError(f"key sequence {seq} out of range")
    return queue * KEY_STRIDE + seq


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class _InFlight:
    """A scheduled step awaiting its output."""

    output: object  # the SchedulerOutput, matched by identity
    start: float
    call_ids: list[str]


class ProgramAwareMixin:
    """The plugin's behaviour; combined with `Scheduler` or `AsyncScheduler` below.

    ``core_log``: set to a list to record every core call the plugin makes,
    with its inputs and results (tests replay it into a fresh core).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plugin_config: PluginConfig = parse_plugin_config(self.vllm_config.additional_config)
        cfg = self.plugin_config
        self.core = SchedulerCore(make_policy(cfg.policy, cfg.params), ProcessTable(cfg.params.program_ttl))
        if type(self.core.policy).rank is not Policy.rank:
            # The victim search filters the heap by priority < rank * KEY_STRIDE.
            raise PluginConfigError(f"policy {cfg.policy!r} ranks calls by more than their queue index")
        self.clock: Callable[[], float] = time.monotonic
        self.core_log: list | None = None
        # The core's order is enforced through the PRIORITY heap whatever
        # --scheduling-policy says; the queues are still empty here.
        self.policy = SchedulingPolicy.PRIORITY
        self.waiting = create_request_queue(self.policy)
        self.skipped_waiting = create_request_queue(self.policy)
        self._in_flight: deque[_InFlight] = deque()
        self._last_update = float("-inf")
        self._next_expiry = float("-inf")
        self._now: float | None = None  # the step's time while schedule()/update runs
        self._heap_dirty = False
        self._kv_ttl: dict[str, float] = {}  # request id -> pin seconds, for tagged live requests
        self._starts: dict[str, int] = {}  # request id -> prefix hit, within one victim decision
        self.kv_pins = KVPins(self.kv_cache_manager.block_pool)
        self._allocate_slots = self.kv_cache_manager.allocate_slots
        self._giving_way = False  # whether the wrapper shadows allocate_slots
        if self.core.policy.preemptive and cfg.params.preemption and cfg.params.preempt_limit is None:
            # The simulator stops such a run with an error (sim.replica,
            # LIVELOCK_RECOMPUTES); a live engine has no run to stop.
            logger.warning(
                "preempt_limit is null: under recompute preemption calls can keep displacing each other before "
                "their prefill ends, and the engine then makes no progress (docs/design-decisions.md)"
            )
        if self.scheduler_config.async_scheduling and not isinstance(self, AsyncScheduler):
            logger.warning(
                "async scheduling is on: use engine.scheduler.ProgramAwareAsyncScheduler, "
                "this synchronous variant loses the overlap"
            )

    # -- helpers -------------------------------------------------------------------------
    def _time(self) -> float:
        return self._now if self._now is not None else self.clock()

    def _log(self, *event) -> None:
        if self.core_log is not None:
            self.core_log.append(event)

    def _set_priority(self, request: Request, call: CallState) -> None:
        p = encode_key(call.key)
        if request.priority != p:
            request.priority = p
            if request.status != RequestStatus.RUNNING:
                self._heap_dirty = True

    def _reheap(self) -> None:
        for queue in (self.waiting, self.skipped_waiting):
            heapq.heapify(queue._heap)
        self._heap_dirty = False

    # -- arrivals ------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            self._add_to_core(request, self.clock())
        super().add_request(request)

    def _add_to_core(self, request: Request, now: float) -> None:
        rid = request.request_id
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        try:
            tags = read_tags(rid, extra)
        except PluginConfigError as e:
            # Refusing would kill the engine core for one bad client request.
            logger.warning("%s; scheduling it as a single-call program", e)
            tags = read_tags(rid, None)
        program_id, thread_id = tags.program_id, tags.thread_id
        table = self.core.table
        entry = table.get(program_id)
        if entry is not None and thread_id in entry.live:
            # The request id is unique among live requests but may itself be a
            # live thread's name; raising here would kill the engine core.
            fallback, n = rid, 0
            while fallback in entry.live:
                n += 1
                fallback = f"{rid}#{n}"
            logger.warning(
                "request %r: program %r already has a live call on thread %r; using %r as its thread",
                rid, program_id, thread_id, fallback,
            )
            thread_id = fallback
        if tags.program_service is not None or tags.total_service is not None:
            # The gateway's global view seeds both the program's priority and
            # T_program of the starvation ratio: with T_program = 0 a call of a
            # seeded program would count as starving the moment it arrived.
            entry = table.get_or_create(program_id, now)
            entry.raise_service(tags.program_service, tags.total_service)
        call = self.core.add_call(rid, program_id, thread_id, request.num_prompt_tokens, now)
        if tags.kv_ttl > 0:
            self._kv_ttl[rid] = tags.kv_ttl
        request.priority = encode_key(call.key)
        self._log("add", rid, program_id, thread_id, request.num_prompt_tokens, now, tags.program_service)

    # -- scheduling ----------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        now = self.clock()
        self._now = now
        try:
            victims = self._before_schedule(now)
            # A victim sits out the step that preempted it. Its waiting
            # beneficiary may need fewer blocks than estimated (prefix hits),
            # and vLLM's waiting pass would then readmit the victim at once:
            # a wasted re-prefill, and under async scheduling a duplicated
            # in-flight token (vLLM never preempts and readmits in one step).
            if victims:
                self.waiting.remove_requests(victims)
            try:
                output = super().schedule(*args, **kwargs)
            finally:
                for request in victims:
                    self.waiting.add_request(request)
            self._after_schedule(output, now)
        finally:
            self._now = None
        return output

    def _before_schedule(self, now: float) -> list[Request]:
        """The core's per-step bookkeeping, then its victims preempted; returns their requests."""
        core = self.core
        record = self.core_log is not None
        if self.kv_pins:
            self.kv_pins.expire(now)
        if now >= self._next_expiry:
            gone = core.table.expire(now)
            self._next_expiry = now + EXPIRE_EVERY
            if record:
                self._log("expire", now, gone)
        promoted = core.promote_starving(now)
        if promoted:
            requests = self.requests
            for call in promoted:
                self._set_priority(requests[call.id], call)
        if record:
            self._log("promote", now, [c.id for c in promoted])
        if self._heap_dirty:
            self._reheap()
        self.running.sort(key=_PRIORITY)
        preempted = []
        for call in self._choose_victims():
            request = self.requests[call.id]
            self.running.remove(request)
            self._preempt_request(request, time.monotonic())
            preempted.append(request)
        self._sync_giving_way()
        return preempted

    def _ready_set_aside(self, bound: int | None = None) -> list[Request]:
        """The requests in vLLM's ``skipped_waiting`` (of priority below ``bound``) its waiting pass would admit now.

        vLLM (PRIORITY mode) admits from whichever of its two waiting queues
        has the better head, and ``skipped_waiting`` holds requests set aside
        for a reason that may since have gone: a structured-output request
        whose grammar has compiled (promoted when the pass reaches it, which
        it never does while every seat is taken), a streaming session whose
        next chunk has arrived (WAITING, but left in that queue), a request
        skipped for a LoRA or encoder limit. Those are waiting calls like any
        other, so they may take a victim. A session awaiting its client, a
        grammar still compiling (or failed), and KV-connector transfers are
        not admissible. The bound is applied first: vLLM's grammar check
        waits up to 100 us on a compiling grammar.
        """
        ready = []
        for request in self.skipped_waiting._heap:
            if bound is not None and request.priority >= bound:
                continue
            status = request.status
            if status in _ADMISSIBLE:
                ready.append(request)
            elif status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR:
                structured = request.structured_output_request
                grammar = structured.grammar if structured is not None else None
                if grammar is not None and not isinstance(grammar, Exception):
                    ready.append(request)
        return ready

    def _choose_victims(self) -> list[CallState]:
        try:
            return self._decide_victims()
        finally:
            self._starts.clear()  # prefix hits change once the step runs

    def _decide_victims(self) -> list[CallState]:
        core = self.core
        calls = core.calls
        running, heap = self.running, self.waiting._heap
        record = self.core_log is not None
        policy = core.policy
        if self._pause_state != PauseState.UNPAUSED:
            # Paused (pause_generation), vLLM admits no waiting request: a
            # victim would only be evicted, and a drain would report done
            # without it. No decision is made, so none is logged.
            return []
        if (not running or not (heap or self.skipped_waiting._heap)
                or not (policy.preemptive and policy.params.preemption)):
            if record:
                self._record_decision([], [])
            return []
        worst_call = calls[running[-1].request_id]  # running is sorted by key
        # A victim must be outranked (Policy.outranks: preempt_margin queues
        # worse) by the waiting call it lets in, so only waiting calls that
        # outrank the worst running call can take one. choose_victims walks
        # waiting best-first and, past the first that does not, can only
        # hand out free slots, never victims: cutting the list there gives
        # the same victims.
        # rank is the queue index, the high part of the encoded priority;
        # outranking the worst means rank <= worst - margin.
        bound = (math.floor(core.rank(worst_call) - policy.params.preempt_margin) + 1) * KEY_STRIDE
        ready = self._ready_set_aside(bound) if self.skipped_waiting._heap else []
        if not ready and not (heap and policy.outranks(calls[heap[0].request_id], worst_call)):
            if record:
                self._record_decision([], [])
            return []
        better = sorted([r for queue in (heap, ready) for r in queue if r.priority < bound], key=_PRIORITY)
        waiting = [calls[r.request_id] for r in better[: self.max_num_running_reqs]]
        if self.kv_pins:
            # Pins give way to the better waiting calls' needs, counted one call at a time: a need
            # looks its call's prompt up in the prefix cache, and once no pin is left the rest is moot.
            need = 0
            for c in waiting:
                need += self._blocks_needed(c)
                self.kv_pins.drop_until_free(need)
                if not self.kv_pins:
                    break
        # A streaming-input session with a token in flight (async
        # scheduling) is no victim: if that token stops the chunk, vLLM
        # 0.26.0 re-queues the preempted session in _handle_stopped_request
        # and update_from_output then drops it from waiting, so it is lost.
        # It still takes its tokens in the running pass.
        candidates, fixed = [], 0
        for r in running:
            if r.resumable and r.num_output_placeholders:
                fixed += self._tokens_asked(calls[r.request_id])
            else:
                candidates.append(calls[r.request_id])
        victims = core.choose_victims(
            candidates,
            waiting,
            self._free_seqs(),
            self.kv_cache_manager.block_pool.get_num_free_blocks(),
            self._blocks_needed,
            self._blocks_freed,
            self._budget(fixed),
        )
        if record:
            self._record_decision(waiting, victims)
        return victims

    def _free_seqs(self) -> int:
        return self.max_num_running_reqs - len(self.running) - self.num_waiting_for_streaming_input

    def _blocks_needed(self, call: CallState) -> int:
        """KV blocks vLLM's admission check asks of a waiting request, every prefix hit counted as taking one.

        `KVCacheManager.allocate_slots` needs room for the first chunk
        (after the prefix hit `get_computed_blocks` finds, here looked up
        without its stats and events) plus the speculative lookahead and,
        with ``scheduler_reserve_full_isl`` (vLLM's default), for the whole
        sequence; plus the watermark; less the blocks the request already
        holds (a streaming session's next chunk keeps its earlier chunks'
        KV and computed tokens). A hit on a block another request holds
        takes no free block, so this may over-count; subtracting it would
        count twice a block only a victim holds (`_blocks_freed` frees it,
        and the hit then takes it back), and a follow-up's hits on its own
        pin, which gives way. Over-counting can only cost a victim the
        simulator would also have taken (`sim.replica`'s
        ``_blocks_to_admit`` counts the same way; it has no sessions and
        no lookahead). Ignoring the hit's length, as before, under-counted
        a long history mostly cached when only the first chunk is checked.
        """
        request = self.requests[call.id]
        manager = self.kv_cache_manager
        full = self.scheduler_config.scheduler_reserve_full_isl
        # The first chunk starts past the hit, and with lookahead it may reach past the whole sequence even when full.
        computed = self._admission_start(request)
        chunk = min(request.num_tokens - computed, self.max_num_scheduled_tokens)
        threshold = self.scheduler_config.long_prefill_token_threshold
        if 0 < threshold < chunk:
            chunk = threshold
        tokens = computed + chunk + self.num_lookahead_tokens
        if full:
            tokens = max(tokens, request.num_tokens)
        tokens = min(tokens, self.max_model_len)
        groups = self.kv_cache_config.kv_cache_groups
        held = manager.coordinator.get_blocks(call.id)
        blocks = sum(max(_cdiv(tokens, g.kv_cache_spec.block_size) - len(h), 0) for g, h in zip(groups, held))
        return blocks + manager.watermark_blocks

    def _admission_start(self, request: Request) -> int:
        """The tokens a waiting request's admission starts from: those it holds, else its prefix hit.

        As get_computed_blocks (the last token is always recomputed, for its
        logits), looked up without its stats and events. Remembered for the
        decision (`_starts`): the block and token estimates both ask.
        """
        computed = request.num_computed_tokens
        manager = self.kv_cache_manager
        if computed or not manager.enable_caching or request.skip_reading_prefix_cache:
            return computed
        start = self._starts.get(request.request_id)
        if start is None:
            _, start, _ = manager.coordinator.find_longest_cache_hit(request.block_hashes, request.num_tokens - 1)
            self._starts[request.request_id] = start
        return start

    def _tokens_to_compute(self, call: CallState) -> int:
        """The tokens vLLM's waiting pass would schedule for a waiting request, the budget aside."""
        request = self.requests[call.id]
        tokens = request.num_tokens - self._admission_start(request)
        threshold = self.scheduler_config.long_prefill_token_threshold
        return threshold if 0 < threshold < tokens else tokens

    def _tokens_asked(self, call: CallState) -> int:
        """The tokens vLLM's running pass would give a running request, the budget aside.

        Zero for one whose in-flight tokens reach its max_tokens (async
        scheduling: the pass skips it), as the simulator's draining calls.
        """
        request = self.requests[call.id]
        placeholders = request.num_output_placeholders
        if placeholders and (request.num_computed_tokens + 2 - placeholders
                             >= request.num_prompt_tokens + request.max_tokens):
            return 0
        tokens = request.num_tokens_with_spec + placeholders - request.num_computed_tokens
        threshold = self.scheduler_config.long_prefill_token_threshold
        return max(0, threshold if 0 < threshold < tokens else tokens)

    def _budget(self, fixed: int) -> TokenBudget:
        return TokenBudget(self.max_num_scheduled_tokens, self._tokens_asked, self._tokens_to_compute,
                           self.scheduler_config.enable_chunked_prefill, fixed)

    def _blocks_freed(self, call: CallState) -> int:
        """Blocks that return to the free pool if ``call`` is preempted (not shared)."""
        per_group = self.kv_cache_manager.coordinator.get_blocks(call.id)
        return sum(1 for blocks in per_group for b in blocks if b.ref_cnt == 1 and not b.is_null)

    def _record_decision(self, waiting: list[CallState], victims: list[CallState]) -> None:
        """Everything the replay needs to recompute this step's decision."""
        calls = self.core.calls
        # The admissible waiting requests of both queues, in the order vLLM's pass takes them.
        heap_order = [r.request_id for r in sorted([*self.waiting._heap, *self._ready_set_aside()], key=_PRIORITY)]
        top = heap_order[: self.max_num_running_reqs]
        running = [r.request_id for r in self.running]
        self._log(
            "decide", self._time(), heap_order, running, self._free_seqs(),
            self.kv_cache_manager.block_pool.get_num_free_blocks(),
            {cid: self._blocks_needed(calls[cid]) for cid in top},
            {cid: self._blocks_freed(calls[cid]) for cid in running},
            [v.id for v in victims],
            self.max_num_scheduled_tokens, self.scheduler_config.enable_chunked_prefill,
            {cid: self._tokens_to_compute(calls[cid]) for cid in top},
            {cid: self._tokens_asked(calls[cid]) for cid in running},
        )

    def _preempt_request(self, request: Request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        call = self.core.calls.get(request.request_id)
        if call is not None:
            now = self._time()
            self.core.on_preempted(call, now)
            self._log("preempt", call.id, now)

    def _after_schedule(self, output, now: float) -> None:
        core = self.core
        calls = core.calls
        admitted = [d.req_id for d in output.scheduled_new_reqs]
        admitted.extend(output.scheduled_cached_reqs.resumed_req_ids)
        pins = self.kv_pins
        # vLLM counted this step's common prefix with the pins' references in place
        # (below), so what matters is whether pins were held then, not after the
        # take-ups next: an admission that takes the last pin up left the count wrong.
        pinned_while_counting = bool(pins)
        for rid in admitted:
            call = calls.get(rid)
            if call is not None and not call.running:
                core.on_admitted(call)
                self._log("admit", rid)
            if pins and call is not None:
                pins.release_taken_up(call.program_id, self.kv_cache_manager.coordinator.get_blocks(rid))
        if pinned_while_counting:
            # vLLM counts a block as common to every running request when its
            # ref_cnt equals their number (get_num_common_prefix_blocks); a
            # pin's reference breaks that count, and cascade attention (off by
            # default) would then share a prefix some requests do not have.
            # No common prefix is the safe answer while pins are held.
            output.num_common_prefix_blocks = [0] * len(output.num_common_prefix_blocks)
        self._in_flight.append(_InFlight(output, now, list(output.num_scheduled_tokens)))

    # -- step completion -----------------------------------------------------------------
    def update_from_output(self, scheduler_output, model_runner_output):
        now = self.clock()
        step = self._in_flight.popleft()
        while step.output is not scheduler_output:  # a step whose output never came back
            step = self._in_flight.popleft()
        seconds = max(0.0, now - max(step.start, self._last_update))
        self._last_update = now
        core = self.core
        if step.call_ids:
            services = attribute_service(seconds, step.call_ids)
            core.on_step(services, now)
            self._log("step", services, now)
            calls, requests = core.calls, self.requests
            for cid in step.call_ids:
                call = calls.get(cid)
                if call is not None:
                    self._set_priority(requests[cid], call)
        self._now = now
        try:
            return super().update_from_output(scheduler_output, model_runner_output)
        finally:
            self._now = None

    # -- streaming-input sessions ------------------------------------------------------------
    # A resumable request takes its input in chunks: each chunk is generated
    # for, stops, and waits (out of ``running``) for the client's next chunk.
    # Each chunk is one call of the program: it completes when it stops, and
    # the next one arrives with the client's next chunk, so the time between
    # is the client's, not waiting.

    def _handle_stopped_request(self, request: Request) -> bool:
        if request.resumable:
            call = self.core.calls.get(request.request_id)
            if call is not None:
                now = self._time()
                self.core.finish_call(call, now)
                self._log("finish", call.id, now)
        return super()._handle_stopped_request(request)

    def _update_request_as_session(self, session: Request, update) -> None:
        super()._update_request_as_session(session, update)
        if session.request_id not in self.core.calls:
            self._add_to_core(session, self._time())
            self._heap_dirty = True  # it may be queued already, under its last chunk's priority

    def _free_request(self, request: Request, *args, **kwargs):
        rid = request.request_id
        call = self.core.calls.get(rid)
        ttl = self._kv_ttl.pop(rid, 0.0)
        if call is not None:
            now = self._time()
            if request.status == RequestStatus.FINISHED_ABORTED:
                self._charge_aborted_in_step(call, now)
            if request.status in _COMPLETED or (request.status == RequestStatus.FINISHED_ABORTED and call.service > 0):
                # An abort after service is charged like a completion: the
                # engine core cannot tell a client's disconnect from a stop
                # string, which the frontend detects and ends with an abort,
                # and the program did receive that service either way. Its
                # pin likewise: the client tagged the call for a follow-up.
                if ttl > 0:  # while the request still owns its blocks
                    self.kv_pins.pin(call.program_id, self.kv_cache_manager.coordinator.get_blocks(rid), now + ttl)
                self.core.finish_call(call, now)
                self._log("finish", call.id, now)
            else:
                self.core.abort_call(call, now)
                self._log("abort", call.id, now)
        return super()._free_request(request, *args, **kwargs)

    def _charge_aborted_in_step(self, call: CallState, now: float) -> None:
        """Charge an aborted call its share of the step executing now.

        vLLM's engine core handles aborts between a step's ``schedule()`` and
        its ``update_from_output()`` (`EngineCore.step`), so a call aborted
        while its step runs leaves the core before that step is charged, and
        one aborted in its first step looked as if it never ran. It held its
        place in the batch until now, so it is charged the step's time so
        far, by the same tiling rule as `update_from_output`. A later
        in-flight step (async scheduling) has not begun on the GPU.
        """
        if not self._in_flight or call.id not in self._in_flight[0].call_ids:
            return
        seconds = max(0.0, now - max(self._in_flight[0].start, self._last_update))
        if seconds > 0:
            services = attribute_service(seconds, [call.id])
            self.core.on_step(services, now)
            self._log("step", services, now)

    # -- KV pins giving way --------------------------------------------------------------
    def _allocate_slots_giving_way(self, request: Request, *args, **kwargs):
        """`KVCacheManager.allocate_slots`, releasing the oldest pins where the simulator would.

        A failed allocation changes nothing, so it is retried after each
        release: for a running request (else vLLM preempts one), or for a
        waiting one when nothing runs (else the engine idles).
        """
        blocks = self._allocate_slots(request, *args, **kwargs)
        pins = self.kv_pins
        while blocks is None and pins and (request.status == RequestStatus.RUNNING or not self.running):
            pins.drop_oldest()
            blocks = self._allocate_slots(request, *args, **kwargs)
        return blocks

    def _sync_giving_way(self) -> None:
        """Shadow the manager's ``allocate_slots`` with the wrapper for this step if a pin may have to give way in it.

        That is while pins are held and either nothing runs (the idle rule)
        or the running requests could run out of free blocks. A running
        request given n new tokens needs at most n / block_size + 2 new
        blocks per KV cache group (plus its lookahead), and the n add up to
        at most the step's token budget. With more free blocks than that no
        running allocation can fail, and the running list cannot empty in
        this step, so the wrapper would only cost time. Called once per
        step, after the victims are preempted, when the running list is final.
        """
        want = False
        if self.kv_pins:
            running = len(self.running)
            if not running:
                want = True
            else:
                groups = self.kv_cache_config.kv_cache_groups
                block = min(g.kv_cache_spec.block_size for g in groups)
                per_request = 2 + _cdiv(self.num_lookahead_tokens, block)
                worst = (self.max_num_scheduled_tokens // block + running * per_request) * len(groups)
                want = self.kv_cache_manager.block_pool.get_num_free_blocks() < worst
        if want != self._giving_way:
            manager = self.kv_cache_manager
            if want:
                manager.allocate_slots = self._allocate_slots_giving_way
            else:
                del manager.allocate_slots  # the class's own method again
            self._giving_way = want

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        """vLLM resets only when no block is in use, so pins are released first,
        unless a request's blocks would make the reset fail anyway: then the pins stay.

        With ``reset_running_requests`` vLLM preempts the running requests
        first, so the reset then always releases the pins.
        """
        preempts_running = bool(args[0]) if args else bool(kwargs.get("reset_running_requests", False))
        if preempts_running or self.kv_pins.hold_all_used_blocks():
            self.kv_pins.release_all()
            self._sync_giving_way()
        return super().reset_prefix_cache(*args, **kwargs)


class ProgramAwareScheduler(ProgramAwareMixin, Scheduler):
    """``--scheduler-cls engine.scheduler.ProgramAwareScheduler`` (synchronous scheduling)."""


class ProgramAwareAsyncScheduler(ProgramAwareMixin, AsyncScheduler):
    """``--scheduler-cls engine.scheduler.ProgramAwareAsyncScheduler`` (async scheduling)."""
