"""The simulated replica against vLLM 0.26.0's own scheduler, step for step.

Random FCFS cases on small engines (a few KV blocks, small token budgets
and seat limits, so calls chunk, wait and are preempted) run twice: in the
simulator with a constant 1 s step, and through vLLM's real v1 `Scheduler`
(or `AsyncScheduler`) on CPU, advanced one 1 s step at a time, with
`engine.testing`'s fake model runner. Every call's first-scheduled,
first-token and finish time must agree.

Under async scheduling vLLM keys a block filled by a token still in flight
one schedule late, so a call preempted in between recomputes it; the async
cases with prefix caching check that the replica does the same.
"""

from __future__ import annotations

import collections
import random

import pytest
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from engine.testing import fake_output, make_request, make_scheduler, write_tiny_model
from sim.config import EngineConfig, ExperimentConfig, LatencyConfig
from sim.simulate import simulate
from traces.format import Call, Program, SharedPrefix

STEP = 1.0
ARRIVALS = (0.0, 0.5, 1.5, 3.5, 7.5, 12.25, 20.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def random_case(rng: random.Random, prefix_caching: bool):
    """Single-call programs, and the same requests as vLLM token ids (shared prefixes share ids)."""
    engine = dict(num_gpu_blocks=rng.randint(6, 30), max_num_seqs=rng.randint(1, 4),
                  max_num_batched_tokens=rng.choice([16, 32, 64, 100, 512]),
                  enable_prefix_caching=prefix_caching, scheduler_reserve_full_isl=rng.random() < 0.7)
    programs, requests = [], []
    fresh = 1000
    for k in range(rng.randint(1, 12)):
        arrival = rng.choice(ARRIVALS)
        while True:
            prompt, out = rng.randint(1, 200), rng.randint(1, 40)
            if prompt + out <= engine["num_gpu_blocks"] * 16:
                break
        shared, ids = None, []
        if prefix_caching and prompt > 2 and rng.random() < 0.5:
            family = rng.choice(["sys", "doc"])
            shared = SharedPrefix(family, rng.randint(1, prompt - 1))
            base = 10 if family == "sys" else 600
            ids = [base + j % 500 for j in range(shared.tokens)]
        ids += range(fresh, fresh + prompt - len(ids))
        fresh += prompt
        extra = {"shared_prefix": shared} if shared else {}
        programs.append(Program(f"P{k}", arrival, "diff", (Call("c", (), prompt, out, 0.0, **extra),)))
        requests.append((f"P{k}", arrival, ids, out))
    return engine, programs, requests


def simulated(engine, programs, async_scheduling):
    config = ExperimentConfig("diff", engine=EngineConfig(**engine, async_scheduling=async_scheduling),
                              latency=LatencyConfig(kind="constant", seconds=STEP))
    return {r.program_id: (r.first_scheduled, r.first_token, r.finish) for r in simulate(programs, config, "fcfs").calls}


def through_vllm(model_dir, engine, requests, async_scheduling):
    """Drive vLLM's scheduler: each scheduled step runs STEP seconds on one GPU, in order.

    Async: step N+1 is scheduled before step N's output is processed, as
    vLLM's batch queue does; an empty schedule still waits for the step in flight.
    """
    s = make_scheduler(model_dir, scheduler_cls=AsyncScheduler if async_scheduling else Scheduler,
                       max_num_seqs=engine["max_num_seqs"], max_num_batched_tokens=engine["max_num_batched_tokens"],
                       num_blocks=engine["num_gpu_blocks"] + 1,  # vLLM's null block
                       enable_prefix_caching=engine["enable_prefix_caching"], max_model_len=8192,
                       async_scheduling=async_scheduling)
    s.scheduler_reserve_full_isl = engine["scheduler_reserve_full_isl"]
    pending = sorted(requests, key=lambda r: r[1])
    live, times = {}, {}
    now, gpu_free, nxt = 0.0, 0.0, 0
    in_flight = collections.deque()
    depth = 2 if async_scheduling else 1
    for _ in range(100_000):
        while nxt < len(pending) and pending[nxt][1] <= now:
            rid, arrival, ids, out = pending[nxt]
            live[rid] = make_request(rid, ids, out, arrival_time=arrival)
            times[rid] = [None, None, None]
            s.add_request(live[rid])
            nxt += 1
        if s.has_requests():
            out = s.schedule()
            answer = fake_output(s, out)  # the runner's answer depends on the state at schedule time
            if out.num_scheduled_tokens:
                start = max(now, gpu_free)
                gpu_free = end = start + STEP
                for rid in out.num_scheduled_tokens:
                    if times[rid][0] is None:
                        times[rid][0] = start
            else:
                end = max(now, gpu_free)
            in_flight.appendleft((out, answer, end))
            if len(in_flight) < depth and s.has_requests():
                continue
        elif not in_flight:
            if nxt >= len(pending):
                return {rid: tuple(t) for rid, t in times.items()}, sum(r.num_preemptions for r in live.values())
            now = pending[nxt][1]
            continue
        out, answer, end = in_flight.pop()
        now = max(now, end)
        before = {rid: len(r.output_token_ids) for rid, r in live.items()}
        s.update_from_output(out, answer)
        for rid, r in live.items():
            if before[rid] == 0 and r.output_token_ids and times[rid][1] is None:
                times[rid][1] = now
            if r.is_finished() and times[rid][2] is None:
                times[rid][2] = now
    raise AssertionError("vLLM's scheduler did not finish the case")


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_the_replica_matches_vllms_scheduler_step_for_step(model_dir, async_scheduling):
    preempted = 0
    for seed in range(600):  # under async the in-flight memory victim first mattered at seeds 219, 327, 382, 512
        rng = random.Random(seed)
        engine, programs, requests = random_case(rng, prefix_caching=rng.random() < 0.5)
        sim = simulated(engine, programs, async_scheduling)
        vllm_times, preemptions = through_vllm(model_dir, engine, requests, async_scheduling)
        assert sim == vllm_times, (seed, engine)
        preempted += preemptions
    assert preempted > 50  # the cases must exercise preemption, not only queueing
