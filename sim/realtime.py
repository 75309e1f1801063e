"""One simulated engine replica, run in wall-clock time from an asyncio loop.

``python -m sim serve`` answers real HTTP requests with the simulator's
engine model, so the gateway and the replayer can be exercised end to end
without a GPU, and a replay against it is timed like the simulation.

How time is kept: the SimPy environment's clock is "seconds since the
engine started". Whenever something happens in the asyncio world (a request
arrives, is aborted, or the driver task wakes up) the environment is first
run up to the current wall time, so a call is submitted at the simulated
instant that matches its real arrival. A background task sleeps until the
environment's next event (``env.peek()``) or until a new arrival, whichever
is first, and runs the environment up to then. Each step's ``on_progress``
callback pushes the sampled token to the call's asyncio queue, so a
streaming response sees one token per simulated step, in real time.

Aborts: `Replica.abort` drops the call as vLLM's abort does (KV freed at
once, no service charged); a running call in the step in flight is skipped
when that step completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import simpy

from sim.capacity import max_model_len, num_kv_blocks
from sim.config import ExperimentConfig
from sim.core import POLICY_CLASSES, ProcessTable, SchedulerCore, make_policy
from sim.filler_tokens import FILLER_BASE, FILLER_VOCAB, filler_ids
from sim.hardware import load_gpu, load_model
from sim.kvcache import KVCache
from sim.latency import build as build_latency
from sim.latency import timing_problem
from sim.replica import Replica
from sim.sim_call import SimCall


def block_keys(token_ids: list[int], block_size: int, cache_salt: str | None = None) -> tuple[int, ...]:
    """Chain keys of the full blocks of a token sequence (as vLLM's prefix cache hashes them).

    Key ``b`` covers every token of blocks ``0..b``, so two sequences share
    their first ``n`` keys exactly when their first ``n`` blocks are equal
    and they carry the same ``cache_salt``: vLLM mixes a request's salt into
    its first block's hash, so salted requests share only with their salt.
    Tuples of ints hash the same in every Python process; the salt goes in
    as an integer digest, since a str's hash differs between processes.
    """
    keys = []
    prev = 0x5EED
    if cache_salt is not None:
        prev = hash((prev, int.from_bytes(hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"),
                                                          digest_size=8).digest(), "big")))
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = hash((prev, *token_ids[start:start + block_size]))
        keys.append(prev)
    return tuple(keys)


class Conflict(ValueError):
    """The program already has a live call on this thread."""


class TooLarge(ValueError):
    """The request is longer than the engine takes (``max_model_len``, its KV cache, or without
    chunked prefill its token budget); ``param`` is the request field to blame."""

    def __init__(self, message: str, param: str = "max_tokens"):
        super().__init__(message)
        self.param = param


class EngineFailed(RuntimeError):
    """The engine model raised (e.g. its livelock check); it serves nothing more."""


@dataclass(eq=False)
class CallHandle:
    """One live request: its simulated call and the queue its tokens arrive on."""

    call: SimCall
    output_ids: list[int]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # 1 per sampled token, None at the end
    program_service: float | None = None
    finished: bool = False
    aborted: bool = False
    failure: str | None = None  # why the engine stopped before this call finished

    @property
    def done(self) -> bool:
        return self.finished or self.aborted or self.failure is not None

    def stats(self, engine: int) -> dict[str, Any]:
        """Engine-side timing of a finished call (seconds; relative times from its arrival)."""
        c = self.call
        return {
            "engine": engine,
            "service": c.service,
            "waiting": (c.finish - c.arrival) - c.service,
            "first_scheduled_after": c.first_scheduled - c.arrival,
            "first_token_after": c.first_token - c.arrival,
            "preemptions": c.core.preemptions,
            "prefix_hit_tokens": c.prefix_hit_tokens,
        }


class RealtimeEngine:
    """A `sim.replica.Replica` kept in step with the wall clock."""

    def __init__(self, cfg: ExperimentConfig, policy: str, index: int = 0, history: int = 10_000):
        eng = cfg.engine
        live = ", ".join(name for name, cls in POLICY_CLASSES.items() if not cls.oracle)
        if policy not in POLICY_CLASSES:  # make_policy's list has the oracle, which a live engine refuses
            raise ValueError(f"unknown policy {policy!r}; valid choices: {live}")
        if make_policy(policy, cfg.policy_params).oracle:
            raise ValueError(f"policy {policy!r} needs the trace's future and cannot serve live requests; "
                             f"valid choices: {live}")
        if eng.kv_ttl > 0:
            raise ValueError(
                f"engine.kv_ttl: expected 0 for sim serve, got {eng.kv_ttl!r}. A live engine does not know which "
                "calls have follow-ups; it pins the calls whose request carries vllm_xargs.kv_ttl "
                "(python -m engine replay --kv-ttl SECONDS)"
            )
        model, gpu = load_model(eng.model), load_gpu(eng.gpu)
        self.cfg = cfg
        self.policy = policy
        self.index = index
        if model.vocab_size < FILLER_BASE + FILLER_VOCAB:
            # The stand-in's own tokens (outputs, a text prompt's ids) and the replayer's would lie past
            # the vocabulary, and a client re-sending them would be refused as out of it.
            raise ValueError(f"engine.model: {model.name!r} has vocab_size {model.vocab_size:,}; the stand-in's "
                             f"filler tokens use ids {FILLER_BASE:,} to {FILLER_BASE + FILLER_VOCAB - 1:,} (as "
                             f"python -m engine replay's do), so sim serve needs vocab_size >= "
                             f"{FILLER_BASE + FILLER_VOCAB:,}")
        self.vocab_size = model.vocab_size  # prompt ids at or past it are refused, as vLLM refuses them
        self.capacity_blocks = num_kv_blocks(eng, model, gpu)
        self.kv_tokens = self.capacity_blocks * eng.block_size
        self.max_model_len = max_model_len(eng, model)
        self.env = simpy.Environment()
        self.table = ProcessTable(cfg.policy_params.program_ttl)
        self.core = SchedulerCore(make_policy(policy, cfg.policy_params), self.table)
        latency = build_latency(cfg.latency, model, gpu, eng.gpus_per_replica)
        problem = timing_problem(eng, model, gpu, latency)  # flags apply after the experiment's check
        if problem:
            raise ValueError(problem)
        self.replica = Replica(
            self.env, index, eng, latency, self.core,
            KVCache(self.capacity_blocks, eng.block_size, eng.enable_prefix_caching),
            model.kv_bytes_per_token_on(eng.gpus_per_replica), gpu.pcie_bandwidth * eng.gpus_per_replica,
            on_finish=self._on_finish, on_progress=self._on_progress,
        )
        self._handles: dict[SimCall, CallHandle] = {}
        self._seq = 0
        self.completed = 0
        self.aborted = 0
        # Recent requests' ids as the engine received them (a debug view; bounded).
        self.received: deque[dict[str, Any]] = deque(maxlen=history)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.failure: str | None = None  # set once, when the model raises; then every request fails

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._drive(), name=f"sim-engine-{self.index}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def now(self) -> float:
        assert self._loop is not None, "start() the engine first"
        return self._loop.time() - self._t0

    def advance(self) -> None:
        """Run the model up to the current wall time, events due now included.

        Raises EngineFailed once the model has raised: the replica's state is
        then unknown, so the live calls fail with the reason instead of
        waiting forever for tokens, and later requests are refused.
        """
        if self.failure is not None:
            raise EngineFailed(self.failure)
        env = self.env
        target = self.now()
        try:
            if target > env.now:
                env.run(until=target)
            while env.peek() <= env.now:
                env.step()
        except Exception as exc:  # noqa: BLE001 -- any model error ends this engine, reported to every client
            self.failure = f"engine {self.index} stopped at t={env.now:.6g} s: {exc}"
            for handle in self._handles.values():
                handle.failure = self.failure
                handle.queue.put_nowait(None)
            self._handles.clear()
            raise EngineFailed(self.failure) from exc

    async def _drive(self) -> None:
        assert self._wake is not None
        while True:
            try:
                self.advance()
            except EngineFailed:
                return  # the failure is on every handle and refuses new requests
            self._wake.clear()
            due = self.env.peek()
            if due == math.inf:
                await self._wake.wait()
                continue
            delay = due - self.now()
            if delay <= 0:  # behind real time: catch up, but let the server stream and answer meanwhile
                await asyncio.sleep(0)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    # -- requests ------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._handles)

    @property
    def longest_call(self) -> int:
        """The most tokens (prompt and output) one call may have here, as `submit` checks them: the
        context, and a --num-gpu-blocks cache smaller than it or, with chunked prefill off, the token
        budget, neither of which vLLM would start with. A chat without a cap gets what its prompt leaves."""
        eng = self.cfg.engine
        budget = eng.max_num_batched_tokens if not eng.enable_chunked_prefill else self.max_model_len
        return min(self.max_model_len, self.kv_tokens, budget)

    def submit(self, prompt_ids: list[int], max_tokens: int, program_id: str | None, thread_id: str | None,
               program_service: float | None, kv_ttl: float = 0.0, cache_salt: str | None = None,
               total_service: float | None = None) -> CallHandle:
        """Start a call now; its tokens arrive on the handle's queue.

        Without a program id the request is a program of its own. A given
        ``program_service`` (the gateway's global view, across engines)
        raises this engine's local value for the program to at least that
        before the call is prioritised, as the vLLM plugin does with
        ``extra_args`` (``max(local, forwarded)``); ``total_service``
        likewise raises T_program of the starvation ratio (default: the
        ``program_service``, a lower bound). A ``kv_ttl`` (seconds)
        pins the call's cached blocks at finish for its program's next call
        (`sim.replica`; with prefix caching off there is nothing to pin).
        A ``cache_salt`` keeps the call's blocks apart from those of calls
        with another salt or none (`block_keys`).
        """
        prompt = len(prompt_ids)
        if prompt >= self.max_model_len:  # vLLM's words (entrypoints/openai/serving_engine.py)
            raise TooLarge(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"request has {prompt} input tokens. Please reduce the length of the input messages.",
                           "prompt")
        if prompt + max_tokens > self.max_model_len:
            raise TooLarge(f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                           f"maximum context length is {self.max_model_len} tokens and your request has {prompt} "
                           f"input tokens ({max_tokens} > {self.max_model_len} - {prompt}).")
        if prompt + max_tokens > self.kv_tokens:  # only under engine.num_gpu_blocks: vLLM starts with max_model_len fitting
            raise TooLarge(
                f"prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds this engine's "
                f"KV cache of {self.kv_tokens} tokens (engine.num_gpu_blocks, sim serve's --num-gpu-blocks)"
            )
        eng = self.cfg.engine
        if not eng.enable_chunked_prefill and len(prompt_ids) + max_tokens > eng.max_num_batched_tokens:
            # As `sim.simulate.check_fits`: a (re)computed prompt must fit one step, or the call never runs.
            raise TooLarge(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds this engine's token "
                f"budget of {eng.max_num_batched_tokens} (engine.max_num_batched_tokens), which must cover a "
                f"whole prompt when chunked prefill is off"
            )
        self.advance()
        self._seq += 1
        pid = program_id
        if pid is None:  # a program of its own, under a name no live or remembered client program has
            pid, n = f"req-{self._seq}", 0
            while self.table.get(pid) is not None or self.replica.is_arriving(pid):
                n += 1
                pid = f"req-{self._seq}.{n}"
        entry = self.table.get(pid)
        tid = thread_id
        if tid is None:  # as the plugin: the request's own id, so every untagged call is its own thread
            tid, n = f"req-{self._seq}", 0
            while (entry is not None and tid in entry.live) or self.replica.is_arriving(pid, tid):
                n += 1
                tid = f"req-{self._seq}#{n}"
        if (entry is not None and tid in entry.live) or self.replica.is_arriving(pid, tid):
            raise Conflict(f"program {pid!r} already has a live call on thread {tid!r}")
        if program_service is not None or total_service is not None:
            # Both the priority and T_program of the starvation ratio, as the
            # plugin: with T_program = 0 a call of a program seeded from
            # another engine would count as starving the moment it arrived.
            self.table.get_or_create(pid, self.env.now).raise_service(program_service, total_service)
        output_ids = filler_ids(self.index, self._seq, max_tokens)
        keys = block_keys(list(prompt_ids) + output_ids, self.cfg.engine.block_size, cache_salt)
        call = SimCall(pid, tid, len(prompt_ids), max_tokens, keys, self.env.event(), self.env.now, pin_ttl=kv_ttl)
        handle = CallHandle(call, output_ids, program_service=program_service)
        self._handles[call] = handle
        self.replica.submit(call)
        self.received.append({"program_id": pid, "thread_id": tid, "program_service": program_service,
                              "program_total_service": total_service, "prompt_tokens": len(prompt_ids), "max_tokens": max_tokens})
        self._poke()
        return handle

    def abort(self, handle: CallHandle) -> None:
        """The client went away: stop the call (see the module docstring for how)."""
        if handle.done:
            return
        try:
            self.advance()
        except EngineFailed:
            return  # the handle already carries the failure
        if handle.finished:
            return
        handle.aborted = True
        self.aborted += 1
        self._handles.pop(handle.call, None)
        self.replica.abort(handle.call)
        handle.queue.put_nowait(None)
        self._poke()

    def expire(self) -> list[str]:
        """Forget idle programs (the engine never learns when a program ends)."""
        return self.table.expire(self.env.now, self.replica.arriving_programs())

    # -- replica callbacks ---------------------------------------------------------------
    def _on_progress(self, call: SimCall, new_tokens: int, sampled: bool) -> None:
        handle = self._handles.get(call)
        if handle is not None and sampled:
            handle.queue.put_nowait(1)

    def _on_finish(self, call: SimCall) -> None:
        handle = self._handles.pop(call, None)
        if handle is None:
            return
        handle.finished = True
        self.completed += 1
        handle.queue.put_nowait(None)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "engine": self.index,
            "policy": self.policy,
            "now": self.env.now,
            "in_flight": self.in_flight,
            "model_load": self.replica.load,
            "completed": self.completed,
            "aborted": self.aborted,
            "failure": self.failure,
            "programs": len(self.table),
            "kv_pins": self.replica.kv_pins.pinned,
            "kv_pins_held": len(self.replica.kv_pins),
            "kv_pins_dropped": self.replica.kv_pins.dropped,
            "received": list(self.received),
        }
