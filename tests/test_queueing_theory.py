"""The engine model against queueing theory.

Two limits of a continuous-batching engine have closed forms, and the model
must reproduce both:

* **One sequence at a time** (``max_num_seqs=1``) with a constant step time
  is an M/G/1 queue served in arrival order. Each call's finish time follows
  Lindley's recursion exactly, and the mean response time is the
  Pollaczek-Khinchine value.
* **An unbounded batch** whose step time is proportional to the tokens in it
  is processor sharing: every call in the batch gets one token per step, and
  a step of ``b`` decodes takes ``b`` times as long. The M/G/1-PS response
  time of a call of work ``x`` is ``x / (1 - rho)`` whatever the size
  distribution, and almost none of it is waiting to be scheduled.

The second limit is why the 90%-load checks in docs/findings.md show every policy at
1.000 of FCFS: when the batch never fills, nothing waits for admission, the
slowdown is inside the batch, and no admission order can change who is
served when. `test_without_a_queue_every_policy_gives_the_same_timeline`
checks that directly on the paper's workloads.

The statistical checks use fixed seeds, so they are deterministic; their
tolerance is three standard errors from batch means, which a one-step
accounting error (an extra step per call, say) exceeds several times over.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import EngineConfig, ExperimentConfig, LatencyConfig
from sim.core import POLICY_CLASSES
from sim.hardware import SPEC_DIR
from sim.simulate import simulate
from traces.format import Call, Program
from traces.generators import generate

UNBOUNDED = dict(num_gpu_blocks=10**6, max_num_seqs=10**6, max_num_batched_tokens=10**7)
# A million blocks of the 8B's KV (2.1 TB) fit no real GPU, and num_gpu_blocks is refused past the memory:
# the textbook limits run on a GPU spec with room for them (nothing else in it is used: the latency is a file).
IDEAL_GPU_MEMORY = 4 * 10**12
PER_TOKEN = 2.0**-10  # about 1 ms; a binary fraction, so the engine's 2**-30 s rounding of step times is exact
TIMING = ("arrival", "first_scheduled", "first_token", "finish", "waiting", "service", "preemptions", "engine")


@pytest.fixture(scope="module")
def per_token_model(tmp_path_factory):
    """A latency-model file whose step time is exactly ``PER_TOKEN x tokens in the step``."""
    path = tmp_path_factory.mktemp("latency") / "per-token.json"
    coefficients = dict(per_token=PER_TOKEN, weights_floor=0.0, per_attn_pair=0.0, per_kv_read_token=0.0,
                        per_seq=0.0, per_step=0.0)
    path.write_text(json.dumps({"format": "autellix-fitted-latency v2", "coefficients": coefficients}))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def ideal_gpu(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "ideal.gpu.json"
    spec = json.loads((SPEC_DIR / "a100-80gb.gpu.json").read_text())
    path.write_text(json.dumps({**spec, "name": "ideal", "memory_bytes": IDEAL_GPU_MEMORY}))
    IDEAL_GPU[:] = [str(path)]


IDEAL_GPU: list[str] = []  # set by the fixture above, for every engine here


def experiment(latency: LatencyConfig, **engine) -> ExperimentConfig:
    engine.setdefault("enable_prefix_caching", False)
    engine.setdefault("gpu", IDEAL_GPU[0])
    return ExperimentConfig("queueing", engine=EngineConfig(**engine), latency=latency)


def single_calls(arrivals, prompts, outputs) -> list[Program]:
    return [Program(f"p{i}", float(t), "mg1", (Call("c", (), int(p), int(n), 0.0),))
            for i, (t, p, n) in enumerate(zip(arrivals, prompts, outputs))]


def poisson_single_calls(n: int, rate: float, sizes, probs, seed: int):
    """``n`` one-call programs, Poisson arrivals, one-token prompts, outputs drawn from ``sizes``."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    outputs = rng.choice(np.asarray(sizes), size=n, p=np.asarray(probs))
    return single_calls(arrivals, np.ones(n, dtype=int), outputs), outputs


def by_arrival(records):
    return sorted(records, key=lambda r: int(r.program_id[1:]))


def batch_means_se(values: np.ndarray, batches: int = 20) -> float:
    """Standard error of the mean of a correlated series (non-overlapping batch means)."""
    means = values[: len(values) // batches * batches].reshape(batches, -1).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(batches))


# ---------------------------------------------------------------- M/G/1: one sequence at a time
@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=25),
    data=st.data(),
    budget=st.sampled_from([8, 32, 2048]),
)
def test_fcfs_one_sequence_follows_lindleys_recursion(gaps, data, budget):
    # A call of prompt p and n outputs needs ceil(p / budget) prefill-chunk
    # steps (the last yields the first token) and n - 1 decodes. It starts
    # when it has arrived and the previous call has finished.
    n = len(gaps)
    prompts = data.draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    outputs = data.draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    step = 0.125  # a binary fraction: the engine rounds step times to 2**-30 s
    arrivals = np.cumsum(gaps)
    result = simulate(single_calls(arrivals, prompts, outputs),
                      experiment(LatencyConfig(kind="constant", seconds=step),
                                 num_gpu_blocks=1000, max_num_seqs=1, max_num_batched_tokens=budget), "fcfs")
    free = 0.0
    for rec, t, p, out in zip(by_arrival(result.calls), arrivals, prompts, outputs):
        service = (math.ceil(p / budget) + out - 1) * step
        start = max(t, free)
        free = start + service
        assert rec.first_scheduled == pytest.approx(start, abs=1e-9)
        assert rec.finish == pytest.approx(free, abs=1e-9)
        assert rec.waiting == pytest.approx(start - t, abs=1e-9)
        assert rec.service == pytest.approx(service, abs=1e-9)


def test_fcfs_one_sequence_mean_response_is_pollaczek_khinchine():
    step, rho = 0.01, 0.7
    sizes, probs = [2, 8, 32], [0.5, 0.35, 0.15]  # steps per call; squared coefficient of variation 1.41
    mean_s = step * float(np.dot(sizes, probs))
    second_s = step**2 * float(np.dot(np.square(sizes), probs))
    rate = rho / mean_s
    programs, _ = poisson_single_calls(40_000, rate, sizes, probs, seed=0)
    result = simulate(programs, experiment(LatencyConfig(kind="constant", seconds=step),
                                           num_gpu_blocks=10**4, max_num_seqs=1, max_num_batched_tokens=2048), "fcfs")
    latency = np.array([p.latency for p in by_arrival(result.programs)])
    waiting = np.array([c.waiting for c in by_arrival(result.calls)])
    queue_wait = rate * second_s / (2 * (1 - rho))  # Pollaczek-Khinchine
    assert abs(latency.mean() - (mean_s + queue_wait)) < 3 * batch_means_se(latency)
    assert abs(waiting.mean() - queue_wait) < 3 * batch_means_se(waiting)
    assert result.stats["busy_fraction"] == pytest.approx(rho, abs=0.02)


# ---------------------------------------------------------------- processor sharing: an unbounded batch
def step_granular_ps(arrivals, outputs, per_token):
    """Reference: each step admits every call that has arrived, gives each one token, and lasts tokens x per_token."""
    finish = [0.0] * len(arrivals)
    left = {}
    nxt, now = 0, 0.0
    while nxt < len(arrivals) or left:
        if not left:
            now = max(now, arrivals[nxt])
        while nxt < len(arrivals) and arrivals[nxt] <= now:
            left[nxt] = outputs[nxt]
            nxt += 1
        now += per_token * len(left)
        for i in list(left):
            left[i] -= 1
            if left[i] == 0:
                finish[i] = now
                del left[i]
    return finish


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    gaps=st.lists(st.one_of(st.just(0.0), st.floats(0.0005, 0.05)), min_size=1, max_size=30),
    data=st.data(),
    policy=st.sampled_from(sorted(POLICY_CLASSES)),
)
def test_an_unbounded_batch_is_step_granular_processor_sharing(per_token_model, gaps, data, policy):
    # One-token prompts, so every step is decodes only and lasts PER_TOKEN per call
    # in it. Calls join at the next step boundary; nobody waits longer.
    outputs = data.draw(st.lists(st.integers(1, 20), min_size=len(gaps), max_size=len(gaps)))
    arrivals = list(np.cumsum(gaps))
    result = simulate(single_calls(arrivals, [1] * len(gaps), outputs),
                      experiment(LatencyConfig(kind="fitted", name=per_token_model), **UNBOUNDED), policy)
    expected = step_granular_ps(arrivals, outputs, PER_TOKEN)
    for rec, want in zip(by_arrival(result.calls), expected):
        assert rec.finish == pytest.approx(want, abs=1e-9)
        assert rec.preemptions == 0


def test_processor_sharing_slows_every_size_by_one_over_one_minus_rho(per_token_model):
    # M/G/1-PS: E[T | work x] = x / (1 - rho) for every x. The step
    # granularity adds about half a step to each call, which the largest
    # size (160 tokens) makes negligible; that is the size checked tightly.
    rho, per_token = 0.7, PER_TOKEN
    sizes, probs = [10, 40, 160], [0.6, 0.3, 0.1]
    rate = rho / (per_token * float(np.dot(sizes, probs)))
    programs, outputs = poisson_single_calls(40_000, rate, sizes, probs, seed=0)
    result = simulate(programs, experiment(LatencyConfig(kind="fitted", name=per_token_model), **UNBOUNDED), "fcfs")
    latency = np.array([p.latency for p in by_arrival(result.programs)])
    stretch = latency * (1 - rho) / (outputs * per_token)  # 1.0 under exact processor sharing
    largest = stretch[outputs == 160]
    assert abs(largest.mean() - 1.0) < 3 * batch_means_se(largest)
    for size in (10, 40):  # smaller calls: slowed the same, plus the boundary wait
        assert 1.0 - 0.05 < stretch[outputs == size].mean() < 1.0 + 0.1
    # The slowdown is inside the batch: calls wait to be scheduled ~1% of their time.
    waiting_share = sum(c.waiting for c in result.calls) / latency.sum()
    assert waiting_share < 0.02


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    workload=st.sampled_from(["bfcl", "sharegpt", "lats", "mixed"]),
    seed=st.integers(0, 10**6),
    rate=st.sampled_from([0.5, 2.0, 8.0]),
    prefix_caching=st.booleans(),
    async_scheduling=st.booleans(),
    constant=st.booleans(),
)
def test_without_a_queue_every_policy_gives_the_same_timeline(
        per_token_model, workload, seed, rate, prefix_caching, async_scheduling, constant):
    # When every call is admitted at the next step, the order a policy
    # chooses decides nothing: every call's times are the same under all
    # of them. Only which of two calls admitted in the same step computes a
    # shared prefix block and which hits it may differ, so hits are
    # compared in total. One engine: behind a balancer, calls released at
    # the same instant reach it in the order their parents finished, which
    # is the policy's order within a step, so round-robin or least-used may
    # place them differently.
    programs = generate(workload, 2 if workload == "lats" else 6, rate, seed)
    latency = LatencyConfig(kind="constant", seconds=0.02) if constant else \
        LatencyConfig(kind="fitted", name=per_token_model)
    config = experiment(latency, **UNBOUNDED, enable_prefix_caching=prefix_caching,
                        async_scheduling=async_scheduling)

    def timeline(policy):
        calls = simulate(programs, config, policy).calls
        return ({(c.program_id, c.call_id): tuple(getattr(c, f) for f in TIMING) for c in calls},
                sum(c.prefix_hit_tokens for c in calls))

    reference = timeline("fcfs")
    for policy in sorted(POLICY_CLASSES):
        assert timeline(policy) == reference, policy
