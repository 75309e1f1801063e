"""Benchmark: the scheduler core's decision time per engine step.

Target (issue #5): under 1 ms per step with 1,024 waiting and 256 running
calls on this CPU, so the vLLM plugin adds little to vLLM's own schedule().

``core`` (stdlib only, no vLLM needed) times one step's core work exactly as
the plugin does it (`engine.scheduler`): ``promote_starving``, re-heapify
only when a promotion changed a queued key, the sort of the running list,
the victim search with the step's token budget (a constant-time check
unless the best waiting call outranks the worst running one), and ``on_step`` with
``attribute_service`` over the batch plus the priority refresh of the
served calls. Waiting calls sit in a heap of objects compared by an integer
priority, like vLLM's ``Request``. Scenarios:

* ``steady``: the batch holds the best calls (the usual state after a step
  admitted what fits): the victim search returns at once.
* ``contended``: fresh programs wait that outrank most running calls, so
  ``choose_victims`` runs over up to 256 waiting calls every step (its
  answer is computed, not applied, so every step pays the full search).
* ``sim-order``: the simulator's replica-style call, a full sort of the
  waiting calls each step before ``choose_victims`` (for comparison).

``plugin`` (needs vLLM) times ``schedule()`` + ``update_from_output()`` of
the plugin and of vLLM's own Scheduler (PRIORITY mode) on CPU with the same
256 running decodes and 1,024 waiting requests; the difference is the
plugin's overhead. ``plugin-plas-pins`` is the plugin while 64 KV pins are
held (`engine.kv_pins`) and memory is plentiful, so the give-way wrapper
around ``allocate_slots`` stays out: the extra over ``plugin-plas`` is what
holding pins costs a step (installed always, the wrapper cost ~137 us).

Each figure is given as CPU time of this thread (``time.thread_time``), the
cost itself, and as wall time, which on a shared machine also counts the
time the OS ran other processes in the middle of a step.

    python benchmarks/bench_core_decision.py [--steps 2000] [--skip-plugin]
"""

from __future__ import annotations

import argparse
import gc
import heapq
import random
import statistics
import sys
import tempfile
import time
from operator import attrgetter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.core import PolicyParams, ProcessTable, SchedulerCore, TokenBudget, attribute_service, make_policy  # noqa: E402

KEY_STRIDE = 1 << 48  # as engine.scheduler.encode_key, without importing vLLM
_PRIORITY = attrgetter("priority")


class FakeRequest:
    """What the plugin touches of a vLLM Request: id, priority, heap order."""

    __slots__ = ("request_id", "priority")

    def __init__(self, request_id: str, priority: int):
        self.request_id = request_id
        self.priority = priority

    def __lt__(self, other: "FakeRequest") -> bool:  # vLLM's Request.__lt__ compares priority first
        return self.priority < other.priority


def encode(key) -> int:
    return key[0] * KEY_STRIDE + key[1]


def build(scenario: str, waiting_n: int, running_n: int, seed: int = 0):
    rng = random.Random(seed)
    params = PolicyParams()
    core = SchedulerCore(make_policy("plas", params), ProcessTable(params.program_ttl))
    requests = {}
    # Running calls: programs with moderate attained service.
    for i in range(running_n):
        pid = f"r{i}"
        entry = core.table.get_or_create(pid, 0.0)
        entry.service = entry.total_service = rng.uniform(0.0, 8.0)
        call = core.add_call(pid, pid, "0", 500, 0.0)
        core.on_admitted(call)
        requests[pid] = FakeRequest(pid, encode(call.key))
    # Waiting calls: worse than every running one (steady) or mostly fresh (contended).
    for i in range(waiting_n):
        pid = f"w{i}"
        entry = core.table.get_or_create(pid, 0.0)
        if scenario == "contended" and i % 2 == 0:
            entry.service = entry.total_service = 0.0
        else:
            entry.service = entry.total_service = rng.uniform(64.0, 500.0)
        call = core.add_call(pid, pid, "0", 500, 0.0)
        requests[pid] = FakeRequest(pid, encode(call.key))
    running = [requests[f"r{i}"] for i in range(running_n)]
    heap = [requests[f"w{i}"] for i in range(waiting_n)]
    heapq.heapify(heap)
    return core, requests, running, heap


def bench_core(scenario: str, steps: int, waiting_n: int = 1024, running_n: int = 256) -> Timings:
    core, requests, running, heap = build("contended" if scenario == "contended" else "steady", waiting_n, running_n)
    calls = core.calls
    rank = core.rank
    need = lambda c: 4  # noqa: E731
    freed = lambda c: 4  # noqa: E731
    # The budget as the plugin passes it: running decodes ask one token, a waiting call its 500.
    budget = TokenBudget(2048, lambda c: 1, lambda c: 500, True)
    dt = 0.02
    now = 0.0
    times = Timings()
    for _ in range(steps):
        now += dt
        times.start()
        # -- schedule(): the plugin's _before_schedule
        promoted = core.promote_starving(now)
        if promoted:
            for call in promoted:
                requests[call.id].priority = encode(call.key)
            heapq.heapify(heap)
        running.sort(key=_PRIORITY)
        if scenario == "sim-order":
            order_w = core.order(calls[r.request_id] for r in heap)
            core.choose_victims(
                [calls[r.request_id] for r in running], order_w[:running_n], 0, 0, need, freed, budget
            )
        else:
            worst = rank(calls[running[-1].request_id])
            if heap and rank(calls[heap[0].request_id]) < worst:
                bound = worst * KEY_STRIDE  # rank is the high part of the priority
                better = sorted([r for r in heap if r.priority < bound], key=_PRIORITY)
                core.choose_victims(
                    [calls[r.request_id] for r in running],
                    [calls[r.request_id] for r in better[:running_n]],
                    0, 0, need, freed, budget,
                )
        # -- update_from_output(): the plugin's service attribution
        ids = [r.request_id for r in running]
        core.on_step(attribute_service(dt, ids), now)
        for rid in ids:
            p = encode(calls[rid].key)
            req = requests[rid]
            if req.priority != p:
                req.priority = p
        times.stop()
    return times


def bench_plugin(steps: int, waiting_n: int = 1024, running_n: int = 256) -> dict[str, Timings]:
    """schedule() + update_from_output() on CPU vLLM: plugin vs vLLM's PRIORITY Scheduler."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from engine.testing import fake_output, make_request, make_scheduler, write_tiny_model

    model_dir = write_tiny_model(tempfile.mkdtemp())
    results = {}
    for name, cls, pins in (("vllm-priority", Scheduler, 0), ("plugin-plas", None, 0), ("plugin-plas-pins", None, 64)):
        s = make_scheduler(
            model_dir, policy="plas", scheduler_cls=cls, scheduling_policy="priority",
            max_num_seqs=running_n, max_num_batched_tokens=8192, num_blocks=20000, max_model_len=8192,
        )
        tok = 1000
        # One-token calls of their own programs, pinned for longer than the run.
        for i in range(pins):
            s.add_request(make_request(f"pin{i}", list(range(tok, tok + 32)), 1,
                                       extra_args={"program_id": f"pinned{i}", "kv_ttl": 1e6}))
            tok += 32
        while s.requests:
            out = s.schedule()
            s.update_from_output(out, fake_output(s, out))
        assert cls is not None or len(s.kv_pins) == pins
        # Running: fresh programs admitted first. Waiting: programs with much more service.
        for i in range(running_n + waiting_n):
            extra = {"program_id": f"p{i}"}
            if i >= running_n:
                extra["program_service"] = 100.0 + i
            prompt = list(range(tok, tok + 16))
            tok += 16
            s.add_request(make_request(f"q{i}", prompt, 100000, extra_args=extra, priority=0 if i < running_n else 1))
        for _ in range(3):  # admit the batch and finish its prefills
            out = s.schedule()
            s.update_from_output(out, fake_output(s, out))
        assert len(s.running) == running_n and len(s.waiting) == waiting_n, (len(s.running), len(s.waiting))
        # As vLLM's engine core does after start-up: the long-lived heap
        # (torch, configs) is frozen so a full collection does not land in
        # one step and dominate its time.
        gc.collect()
        gc.freeze()
        times = Timings()
        out = s.schedule()
        for _ in range(steps):
            mro = fake_output(s, out)  # the fake runner's work is not timed
            times.start()
            s.update_from_output(out, mro)
            out = s.schedule()
            times.stop()
        s.update_from_output(out, fake_output(s, out))
        gc.unfreeze()
        assert len(s.running) == running_n, "the batch changed during the measurement"
        results[name] = times
    return results


class Timings:
    """Per-step CPU and wall times."""

    def __init__(self):
        self.cpu: list[float] = []
        self.wall: list[float] = []
        self._t = (0.0, 0.0)

    def start(self) -> None:
        self._t = (time.thread_time(), time.perf_counter())

    def stop(self) -> None:
        c, w = self._t
        self.cpu.append(time.thread_time() - c)
        self.wall.append(time.perf_counter() - w)


def _stats(values: list[float]) -> str:
    us = sorted(t * 1e6 for t in values)
    p99 = us[min(len(us) - 1, int(0.99 * len(us)))]
    return f"mean {statistics.fmean(us):7.1f}  p50 {us[len(us) // 2]:7.1f}  p99 {p99:7.1f}"


def summary(times: Timings) -> str:
    return f"cpu us: {_stats(times.cpu)} | wall us: {_stats(times.wall)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--plugin-steps", type=int, default=200)
    ap.add_argument("--skip-plugin", action="store_true", help="only the pure core (no vLLM)")
    args = ap.parse_args(argv)
    print("core decision per step, 1024 waiting / 256 running (PLAS):")
    for scenario in ("steady", "contended", "sim-order"):
        print(f"  {scenario:10s} {summary(bench_core(scenario, args.steps))}")
    if not args.skip_plugin:
        print("schedule() + update_from_output() on CPU vLLM, 1024 waiting / 256 running decodes:")
        res = bench_plugin(args.plugin_steps)
        for name, times in res.items():
            print(f"  {name:14s} {summary(times)}")
        extra = statistics.fmean(res["plugin-plas"].cpu) - statistics.fmean(res["vllm-priority"].cpu)
        print(f"  plugin overhead (mean cpu difference): {extra * 1e6:.1f} us")
        pinning = statistics.fmean(res["plugin-plas-pins"].cpu) - statistics.fmean(res["plugin-plas"].cpu)
        print(f"  with 64 KV pins held, a further: {pinning * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
