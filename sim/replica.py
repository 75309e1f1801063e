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
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable

import simpy

from sim.config import EngineConfig
from sim.core import SchedulerCore, attribute_service
from sim.core.state import CallState
from sim.kvcache import BlockTable, KVCache
from sim.latency.base import LatencyModel, StepShape

_KEY = attrgetter("core.key")


@dataclass(eq=False, slots=True)
class SimCall:
    """A call on an engine: the core's state plus token and KV bookkeeping."""

    program_id: str
    call_id: str
    prompt_tokens: int
    output_tokens: int
    keys: tuple[int, ...]  # content keys of the full blocks of prompt+output
    done: simpy.Event
    arrival: float
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

    def __post_init__(self) -> None:
        self.num_tokens = self.prompt_tokens


@dataclass(frozen=True)
class StepInfo:
    """What an observer (tests, tracing) sees of each step after scheduling."""

    replica: int
    start: float
    scheduled: tuple[tuple[str, int], ...]  # (call id, new tokens)
    kv_in_use: int
    kv_capacity: int
    running: int
    waiting: int
    budget_left: int
    head_waiting_fits: bool  # the best waiting call would have fit as scheduled


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Step durations are kept on a 2**-30 s (~1 ns) grid. Sums of such values
# are exact in float64 (below 2**22 s), so service added per step or per
# run of steps is bit-identical, which lets decode runs be fast-forwarded.
_GRID = float(2**30)
_MAX_RUN = 4096  # steps planned at once


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
        self.on_finish = on_finish
        self.on_progress = on_progress
        self.observer = observer
        self.waiting: list[SimCall] = []  # kept sorted by key
        self.running: list[SimCall] = []
        self._wake: simpy.Event | None = None
        self._aborted: set[SimCall] = set()  # aborted while their step is in flight
        self._live: dict[str, SimCall] = {}  # core call id -> call, for victim lookups
        self.steps = 0
        self.fast_forward_steps = 0  # steps advanced inside decode runs
        self.preemptions = 0
        self.busy_time = 0.0
        self.process = env.process(self.run(env))

    # -- interface ---------------------------------------------------------------------
    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)

    def submit(self, call: SimCall) -> None:
        call.engine = self.index
        call.core = self.core.add_call(
            f"{call.program_id}/{call.call_id}", call.program_id, call.call_id, call.prompt_tokens, self.env.now
        )
        self._live[call.core.id] = call
        insort(self.waiting, call, key=_KEY)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def abort(self, call: SimCall) -> bool:
        """Drop a call whose client went away, as vLLM's abort does.

        Its KV is freed at once and ``on_finish`` is never called; its
        service is not charged to its program. A running call may be in the
        step in flight: that step's completion skips it. Returns False if
        the call already finished or was aborted.
        """
        if call.finish >= 0 or call.core is None or call.core.finished:
            return False
        if call in self.waiting:
            self.waiting.remove(call)  # stays sorted
        else:
            self.running.remove(call)
            self.kv.release(call.blocks)
            self._aborted.add(call)
        self.core.abort_call(call.core, self.env.now)
        del self._live[call.core.id]
        return True

    def refresh_order(self) -> None:
        """Re-sort waiting calls after keys changed outside a step (SRPT refresh)."""
        self.waiting.sort(key=_KEY)

    # -- the step loop ---------------------------------------------------------------
    def run(self, env: simpy.Environment):
        while True:
            if not self.running and not self.waiting:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            start = env.now
            batch, transfer = self._schedule(start)
            if not batch:
                if self.running or not self.waiting:
                    raise RuntimeError(f"engine {self.index} stalled at t={start} with runnable calls")
                # Everything was preempted this step; readmit next iteration.
                continue
            shape = self._shape(batch)
            dt = quantize(self.latency.step_time(shape) + transfer)
            if transfer == 0.0 and self._fast_forward_ok(batch):
                yield from self._decode_run(env, batch, shape, dt, start)
                continue
            self.steps += 1
            self.busy_time += dt
            yield env.timeout(dt)
            self._complete(batch, dt, start)

    # -- fast-forward of decode runs ---------------------------------------------------
    def _fast_forward_ok(self, batch: list[tuple[SimCall, int]]) -> bool:
        """A run of decode steps may be taken in one go only while nothing can change it:
        no waiting call, every running call decoding, and no per-step observer."""
        return (
            self.cfg.fast_forward
            and self.on_progress is None
            and self.observer is None
            and not self.waiting
            and len(batch) == len(self.running)
            # Decoding proper: a 1-token step of a call that has not sampled
            # yet is its prefill, which also sets its first-token time.
            and all(new == 1 and call.generated > 0 for call, new in batch)
        )

    def _plan_run(self, batch, shape: StepShape, dt: float) -> list[float]:
        """Durations of the decode steps that may run back to back from now.

        The run ends at the step where the first call finishes or a call's
        quantum runs out (both change the batch's order or membership), or
        before the step whose KV growth would not fit (vLLM would preempt).
        """
        calls = [c for c, _ in batch]
        left = min(c.output_tokens - c.generated for c in calls)
        quantum = min(c.core.quantum_left for c in calls)
        block = self.block
        free = self.kv.capacity - self.kv.in_use  # step 1's blocks are already allocated
        dts = [dt]
        spent = dt
        n = shape.num_seqs
        kv_tokens = shape.decode_kv_tokens
        grown = 0  # blocks needed beyond step 1
        # A call needs a fresh block at the step computing token position
        # num_computed + j when that position starts a block: count calls by
        # num_computed mod block so each step's need is one lookup.
        by_residue = [0] * block
        for c in calls:
            by_residue[c.num_computed % block] += 1
        while len(dts) < min(left, _MAX_RUN) and quantum - spent > 1e-12:
            j = len(dts)  # steps done; the next step computes token num_computed + j
            need = by_residue[-j % block]
            if grown + need > free:
                break
            grown += need
            kv_tokens += n
            nxt = quantize(self.latency.step_time(StepShape(n, n, n, kv_tokens, 0, 0)))
            dts.append(nxt)
            spent += nxt
        return dts

    def _decode_run(self, env: simpy.Environment, batch, shape: StepShape, dt: float, start: float):
        """Run the planned decode steps, stopping early if a call arrives, then apply them at once.

        Step durations lie on a 2**-30 s grid, so adding a run's total to a
        call's service equals adding each step's duration in turn: the result
        is bit-identical to stepping one at a time.
        """
        dts = self._plan_run(batch, shape, dt)
        done = 0
        total = 0.0
        step_start = start
        for d in dts:
            step_start = env.now
            yield env.timeout(d)
            done += 1
            total += d
            if self.waiting:  # an arrival: the next step must schedule normally
                break
        self.steps += done
        self.busy_time += total
        self.fast_forward_steps += done - 1
        if done > 1:
            kv, block = self.kv, self.block
            for call, _ in batch:
                blocks = call.blocks
                need = -(-(call.num_computed + done) // block) - len(blocks.keys) - blocks.private
                if need > 0:
                    kv.allocate(blocks, need)
        self._complete(batch, total, start if done == 1 else step_start, steps=done)

    # -- scheduling --------------------------------------------------------------------
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

    def _blocks_to_admit(self, call: SimCall) -> int:
        base = call.num_computed if call.swapped else 0
        first = min(call.num_tokens - base, self.cfg.max_num_batched_tokens)
        return cdiv(base + first, self.block)

    def _schedule(self, now: float):
        cfg, kv, core = self.cfg, self.kv, self.core
        if core.promote_starving(now):
            self.waiting.sort(key=_KEY)
        self.running.sort(key=_KEY)
        transfer = 0.0

        policy = core.policy
        if (
            policy.preemptive
            and policy.params.preemption
            and self.waiting
            and self.running
            # Fast exit: the best waiting call outranks nobody if not the worst running one.
            and policy.outranks(self.waiting[0].core, self.running[-1].core)
        ):
            victims = core.choose_victims(
                [c.core for c in self.running],
                [c.core for c in self.waiting[: cfg.max_num_seqs]],
                cfg.max_num_seqs - len(self.running),
                kv.free,
                self._need_of,
                self._freed_of,
            )
            if victims:
                ids = {v.id for v in victims}
                for call in [c for c in self.running if c.core.id in ids]:
                    transfer += self._preempt(call, now)

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
                while need > kv.capacity - kv.in_use:
                    victim = pending.pop() if len(pending) > i else call
                    transfer += self._preempt(victim, now)
                    preempted_for_memory = True
                    if victim is call:
                        break
                if not call.core.running:
                    continue
                kv.allocate(blocks, need)
            batch.append((call, new))
            budget -= new

        head_fits = True
        if not preempted_for_memory:
            admitted = 0
            for call in self.waiting:
                if len(self.running) >= cfg.max_num_seqs or budget == 0:
                    break
                new, hits, fresh, swap_in = self._admission(call, budget)
                if new == 0 or not kv.can_allocate(fresh + kv.hit_cost(call.keys, hits)):
                    break
                kv.acquire_hits(call.blocks, call.keys, hits)
                kv.allocate(call.blocks, fresh)
                if call.swapped:
                    transfer += swap_in * self.swap_seconds_per_block
                    call.swapped = False
                else:
                    call.num_computed = hits * self.block
                    if call.core.preemptions == 0:  # the prompt's hit, not re-hits after preemption
                        call.prefix_hit_tokens = hits * self.block
                self.running.append(call)
                core.on_admitted(call.core)
                batch.append((call, new))
                budget -= new
                admitted += 1
            del self.waiting[:admitted]
            if self.observer is not None and self.waiting:
                head_fits = self._would_fit(self.waiting[0], budget)
        if self.observer is not None:
            self.observer(
                StepInfo(
                    self.index, now, tuple((c.core.id, n) for c, n in batch), kv.in_use, kv.capacity,
                    len(self.running), len(self.waiting), budget,
                    head_fits and not preempted_for_memory and bool(self.waiting)
                    and len(self.running) < cfg.max_num_seqs and budget > 0,
                )
            )
        return batch, transfer

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

    def _would_fit(self, call: SimCall, budget: int) -> bool:
        new, hits, fresh, _ = self._admission(call, budget)
        return new > 0 and self.kv.can_allocate(fresh + self.kv.hit_cost(call.keys, hits))

    def _need_of(self, core_call: CallState) -> int:
        return self._blocks_to_admit(self._by_core(core_call))

    def _freed_of(self, core_call: CallState) -> int:
        return self.kv.freed_by_release(self._by_core(core_call).blocks)

    def _by_core(self, core_call: CallState) -> SimCall:
        return self._live[core_call.id]

    @staticmethod
    def _shape(batch: list[tuple[SimCall, int]]) -> StepShape:
        return StepShape.from_batch((new, call.num_computed) for call, new in batch)

    # -- step completion ---------------------------------------------------------------
    def _complete(self, batch: list[tuple[SimCall, int]], dt: float, start: float, steps: int = 1) -> None:
        """Apply ``steps`` steps (more than one only for a decode run) lasting ``dt`` in all."""
        now = self.env.now
        core, kv = self.core, self.kv
        block = self.block
        if self._aborted:
            batch = [(c, n) for c, n in batch if c not in self._aborted]
            self._aborted.clear()
        core.on_step(attribute_service(dt, [c.core.id for c, _ in batch]), now)
        on_progress = self.on_progress
        finished = []
        for call, new in batch:
            call.service += dt
            if call.first_scheduled < 0:
                call.first_scheduled = start
            if steps == 1:
                computed = call.num_computed = call.num_computed + new
                sampled = computed == call.num_tokens
                if sampled:
                    call.generated += 1
                    call.num_tokens += 1
                    if call.generated == 1:
                        call.first_token = now
            else:  # a decode run: one token per step
                computed = call.num_computed = call.num_computed + steps
                call.generated += steps
                call.num_tokens += steps
                sampled = True
            blocks = call.blocks
            if blocks.private and computed // block > len(blocks.keys):
                kv.register_full(blocks, call.keys, computed)
            if on_progress is not None:
                on_progress(call, new, sampled)
            if call.generated == call.output_tokens:
                finished.append(call)
        for call in finished:
            call.finish = now
            kv.release(call.blocks)
            self.running.remove(call)
            core.finish_call(call.core, now)
            del self._live[call.core.id]
            self.on_finish(call)
            call.done.succeed()
