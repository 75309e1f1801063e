"""Run one policy over a trace on a cluster of simulated engine replicas.

Scenario: programs arrive at their trace arrival times. A program releases
each call once all its parents have finished and the call's delay (tool or
think time) has passed; the balancer sends the call to a replica, which
runs it to completion (`sim.replica`). A program ends when its last call
finishes. Everything runs in one SimPy environment; replicas share one
process table, as engines behind the paper's gateway do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import simpy

from sim.capacity import max_model_len, num_kv_blocks
from sim.config import ExperimentConfig, FitOrigins
from sim.core import ProcessTable, SchedulerCore, make_balancer, make_policy
from sim.errors import SimulationError
from sim.hardware import load_gpu, load_model
from sim.kvcache import KVCache
from sim.latency import build as build_latency
from sim.latency import timing_problem
from sim.records import CallRecord, ProgramRecord
from sim.replica import Replica, StepInfo
from sim.sim_call import SimCall
from traces.format import Program
from traces.prefix import context_block_keys
from traces.validate import TraceError, check_program

# SRPT's remaining work is counted in decode-step equivalents: each output
# token is one step, and this many prompt tokens of prefill cost about one.
PREFILL_TOKENS_PER_STEP = 512


@dataclass
class SimResult:
    policy: str
    calls: list[CallRecord]
    programs: list[ProgramRecord]
    stats: dict[str, float] = field(default_factory=dict)


class BlockKeys:
    """The prefix-cache keys of one trace's calls, computed once per program.

    Hashing every call's context is ~7% of a LATS run; runs of the same
    programs under several policies (``sim run``, a sweep worker) share one
    instance. It is keyed by program id, so use one instance per trace.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._by_program: dict[str, dict[str, tuple[int, ...]]] = {}

    def of(self, program: Program) -> dict[str, tuple[int, ...]]:
        keys = self._by_program.get(program.id)
        if keys is None:
            keys = self._by_program[program.id] = context_block_keys(program, self.block_size)
        return keys


class _ProgramRun:
    """A program in flight: which calls wait for parents, and how many are left."""

    __slots__ = ("program", "keys", "parents_left", "children", "calls_left")

    def __init__(self, program: Program, keys: dict[str, tuple[int, ...]]):
        self.program = program
        self.keys = keys
        self.parents_left: dict[str, int] = {}
        self.children: dict[str, list] = {}
        self.calls_left = len(program.calls)


def _work(call) -> float:
    return call.output_tokens + call.prompt_tokens / PREFILL_TOKENS_PER_STEP


class Cluster:
    """Replicas behind a load balancer, plus the program runner."""

    def __init__(
        self,
        env: simpy.Environment,
        cfg: ExperimentConfig,
        policy: str,
        progress: Callable[[int], None] | None = None,
        observer: Callable[[StepInfo], None] | None = None,
        block_keys: BlockKeys | None = None,
    ):
        self.env = env
        self.cfg = cfg
        self.policy = policy
        self.progress = progress
        eng = cfg.engine
        model, gpu = load_model(eng.model), load_gpu(eng.gpu)
        self.capacity_blocks = num_kv_blocks(eng, model, gpu)
        latency = build_latency(cfg.latency, model, gpu, eng.gpus_per_replica)
        problem = timing_problem(eng, model, gpu, latency)  # resolve refuses these; a config built in Python meets them here
        if problem:
            raise SimulationError(problem)
        self.table = ProcessTable(cfg.policy_params.program_ttl)
        self.balancer = make_balancer(eng.balancer, cfg.policy_params.locality_threshold)
        self.oracle = make_policy(policy, cfg.policy_params).oracle
        self.replicas = [
            Replica(
                env, i, eng, latency,
                SchedulerCore(make_policy(policy, cfg.policy_params), self.table),
                KVCache(self.capacity_blocks, eng.block_size, eng.enable_prefix_caching),
                model.kv_bytes_per_token_on(eng.gpus_per_replica), gpu.pcie_bandwidth * eng.gpus_per_replica,
                on_finish=self._on_finish,
                observer=observer,
            )
            for i in range(eng.replicas)
        ]
        self.call_records: list[CallRecord] = []
        self.program_records: list[ProgramRecord] = []
        self._by_program: dict[str, list[CallRecord]] = {}
        self._remaining: dict[str, float] = {}
        self._runs: dict[str, _ProgramRun] = {}
        self.block_keys = block_keys if block_keys is not None else BlockKeys(eng.block_size)
        if self.block_keys.block_size != eng.block_size:
            raise ValueError(f"block_keys were made for blocks of {self.block_keys.block_size}, not {eng.block_size}")

    # -- program runner ------------------------------------------------------------------
    # Calls are released by callbacks, not one SimPy process per call: a
    # 1,000-program LATS run has 160,000 calls, and a process plus its
    # condition event per call cost a sixth of the run. A call is released
    # when its last parent finishes, after its delay (a timeout whose
    # callback submits it); the program ends when its last call finishes.
    def source(self, env: simpy.Environment, programs: Sequence[Program]):
        for program in programs:
            if program.arrival > env.now:
                yield env.timeout(program.arrival - env.now)
            self.start_program(program)

    def start_program(self, program: Program) -> None:
        keys = self.block_keys.of(program) if self.cfg.engine.enable_prefix_caching else {}
        run = _ProgramRun(program, keys)
        for call in program.calls:
            run.parents_left[call.id] = len(call.parents)
            for parent in call.parents:
                run.children.setdefault(parent, []).append(call)
        self._runs[program.id] = run
        if self.oracle:
            self._remaining[program.id] = sum(_work(c) for c in program.calls)
        for call in program.calls:
            if not call.parents:
                if call.delay > 0:
                    self._release(run, call)
                else:  # reaches the engines at the program's arrival, before any step ending then
                    self._submit(run, call)

    def _release(self, run: "_ProgramRun", call) -> None:
        # Even without a delay the call reaches the engines through an event,
        # after the engine that finished its parent has planned its next step.
        self.env.timeout(call.delay).callbacks.append(lambda _event: self._submit(run, call))

    def _submit(self, run: "_ProgramRun", call) -> None:
        program = run.program
        env = self.env
        sim_call = SimCall(
            program.id, call.id, call.prompt_tokens, call.output_tokens, run.keys.get(call.id, ()), None, env.now,
            parents=call.parents, pin_ttl=self.cfg.engine.kv_ttl if call.id in run.children else 0.0,
        )
        entry = self.table.get_or_create(program.id, env.now)
        loads = [r.load for r in self.replicas]
        replica = self.replicas[self.balancer.choose(call.prompt_tokens, entry, loads)]
        if self.oracle:
            replica.core.set_remaining(entry, self._remaining[program.id])
        replica.submit(sim_call)
        if self.oracle:
            replica.refresh_order()

    def _call_done(self, call: SimCall) -> None:
        run = self._runs[call.program_id]
        run.calls_left -= 1
        if run.calls_left == 0:
            self._end_program(run.program)
            return
        for child in run.children.get(call.call_id, ()):
            run.parents_left[child.id] -= 1
            if run.parents_left[child.id] == 0:
                self._release(run, child)

    def _end_program(self, program: Program) -> None:
        del self._runs[program.id]
        self._record_program(program)
        self._remaining.pop(program.id, None)
        if program.id in self.table:
            self.table.remove(program.id)
        if self.progress is not None:
            self.progress(1)

    # -- accounting ----------------------------------------------------------------------
    def _on_finish(self, call: SimCall) -> None:
        record = CallRecord(
                policy=self.policy,
                program_id=call.program_id,
                call_id=call.call_id,
                engine=call.engine,
                prompt_tokens=call.prompt_tokens,
                output_tokens=call.output_tokens,
                arrival=call.arrival,
                first_scheduled=call.first_scheduled,
                first_token=call.first_token,
                finish=call.finish,
                # >= 0 by construction (service accrues between arrival and finish); the max drops
                # the rounding of a long sum of steps, which read -3e-14 s for a call never waiting
                waiting=max(0.0, (call.finish - call.arrival) - call.service),
                service=call.service,
                preemptions=call.core.preemptions,
                prefix_hit_tokens=call.prefix_hit_tokens,
        )
        self.call_records.append(record)
        self._by_program.setdefault(call.program_id, []).append(record)
        program = self.table.programs.get(call.program_id)
        if len(self.replicas) > 1 and program is not None and program.live:
            for replica in self.replicas:  # siblings waiting elsewhere may starve earlier
                if replica.index != call.engine:
                    replica.core.recheck_starvation(program)
        if self.oracle:
            # SRPT's remaining work drops when a call finishes, by the call's
            # whole work: the oracle ranks programs at call granularity.
            pid = call.program_id
            self._remaining[pid] -= _work(call)
            self.replicas[call.engine].core.set_remaining(self.table.programs[pid], self._remaining[pid])
            for replica in self.replicas:
                replica.refresh_order()
        self._call_done(call)

    def _record_program(self, program: Program) -> None:
        n = len(program.calls)
        mine = self._by_program.pop(program.id)
        finish = max(r.finish for r in mine)
        out = sum(c.output_tokens for c in program.calls)
        waiting = sum(r.waiting for r in mine)
        service = sum(r.service for r in mine)
        latency = finish - program.arrival
        self.program_records.append(
            ProgramRecord(
                policy=self.policy,
                program_id=program.id,
                workload=program.workload,
                arrival=program.arrival,
                finish=finish,
                calls=n,
                output_tokens=out,
                latency=latency,
                normalized_latency=latency / out,
                waiting=waiting,
                service=service,
                waiting_share=waiting / (waiting + service) if waiting + service > 0 else 0.0,
            )
        )


def check_timing(cfg: ExperimentConfig) -> None:
    """`timing_problem` of the experiment's engine, run before any output is written,
    so an engine whose steps or swaps are out of bounds leaves no half-made results."""
    eng = cfg.engine
    model, gpu = load_model(eng.model), load_gpu(eng.gpu)
    problem = timing_problem(eng, model, gpu, build_latency(cfg.latency, model, gpu, eng.gpus_per_replica))
    if problem:
        raise SimulationError(problem)


def check_workload(programs: Sequence[Program], cfg: ExperimentConfig) -> None:
    """`check_fits` on the experiment's engine: run before any output is written, so a
    workload the engine cannot serve leaves no half-made results. ``programs`` are in
    their file's order when the workload is a trace, so a call is located by its line."""
    eng = cfg.engine
    check_fits(programs, num_kv_blocks(eng, load_model(eng.model), load_gpu(eng.gpu)), eng, cfg.workload.trace,
               cfg.fit_origins)


def check_fits(programs: Sequence[Program], capacity_blocks: int, engine, trace: str | None = None,
               origins: FitOrigins | None = None) -> None:
    """Every call must fit the engine, or vLLM would refuse it or the simulation would stall.

    A call (prompt + output tokens) must be no longer than ``max_model_len``,
    which vLLM refuses outright; fit an empty engine's KV cache (vLLM
    requires ``max_model_len`` to, but ``num_gpu_blocks`` can make it
    smaller); and, without chunked prefill, fit the token budget, which must
    cover a whole (re)computed prompt. ``trace``: the file ``programs`` were
    read from, one per line, to name the line; else ``origins``: where the
    experiment set what made a call too large, per limit, if known.
    """
    limit = capacity_blocks * engine.block_size
    longest = max_model_len(engine, load_model(engine.model))
    origins = origins or FitOrigins()
    for line, program in enumerate(programs, 1):
        for call in program.calls:
            size = call.prompt_tokens + call.output_tokens
            if size <= longest and size <= limit and (engine.enable_chunked_prefill
                                                      or size <= engine.max_num_batched_tokens):
                continue
            what = f"program {program.id!r} call {call.id!r}: prompt_tokens + output_tokens = {size}"
            if size > longest:
                given = (f"engine.max_model_len={longest}" if engine.max_model_len is not None
                         else f"the context of {engine.model} ({longest} tokens, engine.max_model_len unset)")
                origin, problem = origins.context_length, f"exceeds {given}; vLLM refuses a longer request"
            elif size > limit:
                origin = origins.kv_cache
                problem = f"exceeds the KV cache of one replica ({limit} tokens); {_kv_remedy(engine)}"
            else:
                origin = origins.token_budget
                problem = (f"exceeds engine.max_num_batched_tokens={engine.max_num_batched_tokens}, which must "
                           f"cover a whole prompt when engine.enable_chunked_prefill is false")
            where = f"{trace}:{line}: " if trace is not None else f"{origin}: " if origin is not None else ""
            raise SimulationError(f"{where}{what} {problem}")


def check_programs(programs: Sequence[Program]) -> None:
    """The trace format's rules on every program (`traces.validate.check_program`), and unique ids.

    A trace file was checked as it was read, but programs built in Python
    were not: a missing parent raised a bare KeyError, a cycle or an empty
    program stalled the run, and a NaN arrival or a duplicate program id
    ran as if nothing were wrong. About 2 us per call, a few percent of a
    simulation.
    """
    seen: set[str] = set()
    for program in programs:
        try:
            check_program(program)
        except TraceError as exc:
            raise SimulationError(f"invalid program: {exc}") from None
        if program.id in seen:
            raise SimulationError(f"invalid program: program {program.id!r}: duplicate program id")
        seen.add(program.id)


def _kv_remedy(engine) -> str:
    """What sets the KV cache's size: an explicit engine.num_gpu_blocks overrides the GPU arithmetic."""
    if engine.num_gpu_blocks is not None:
        return (
            f"it is engine.num_gpu_blocks={engine.num_gpu_blocks} x engine.block_size={engine.block_size}: "
            f"raise engine.num_gpu_blocks, or drop it to size the cache from the GPUs"
        )
    return "use a larger GPU or engine.gpus_per_replica"


def simulate(
    programs: Sequence[Program],
    cfg: ExperimentConfig,
    policy: str,
    progress: Callable[[int], None] | None = None,
    observer: Callable[[StepInfo], None] | None = None,
    block_keys: BlockKeys | None = None,
) -> SimResult:
    """Simulate ``programs`` (sorted by arrival) under ``policy``; deterministic.

    ``block_keys`` may carry keys computed by an earlier run of the same programs.
    """
    check_programs(programs)
    env = simpy.Environment()
    cluster = Cluster(env, cfg, policy, progress, observer, block_keys)
    check_fits(programs, cluster.capacity_blocks, cfg.engine, origins=cfg.fit_origins)
    ordered = sorted(programs, key=lambda p: p.arrival)  # stable: ties keep file order
    env.process(cluster.source(env, ordered))
    env.run()
    unfinished = len(programs) - len(cluster.program_records)
    if unfinished:
        raise RuntimeError(f"{unfinished} programs did not finish: the simulation stalled")
    reps = cluster.replicas
    # The run ends with its last program. KV pins still held then are never
    # released: as in vLLM, pins expire when an engine next schedules.
    end = max((p.finish for p in cluster.program_records), default=env.now)
    stats = {
        "sim_time": end,
        "steps": float(sum(r.steps for r in reps)),
        "preemptions": float(sum(r.preemptions for r in reps)),
        "lazy_decode_steps": float(sum(r.lazy_decode_steps for r in reps)),
        "coasted_steps": float(sum(r.coasted_steps for r in reps)),
        "kv_evictions": float(sum(r.kv.evictions for r in reps)),
        "kv_pins": float(sum(r.kv_pins.pinned for r in reps)),
        "kv_pins_dropped": float(sum(r.kv_pins.dropped for r in reps)),
        "prefill_tokens": float(sum(r.prefill_tokens for r in reps)),
        "swap_seconds": sum(r.swap_seconds for r in reps),
        "kv_capacity_blocks": float(cluster.capacity_blocks),
        # From the trace's zero, not the first arrival: a generated trace's idle
        # time before its first (exponentially drawn) arrival is the arrival
        # process's own, so leaving it out would bias utilisation upwards.
        "busy_fraction": sum(r.busy_time for r in reps) / (end * len(reps)) if end > 0 else 0.0,
    }
    return SimResult(policy, cluster.call_records, cluster.program_records, stats)
