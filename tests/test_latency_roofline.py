"""Roofline latency: hand-computed values on a tiny model, monotonicity, dispatch."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from sim.config import LatencyConfig
from sim.hardware import GPUSpec, ModelSpec, load_gpu, load_model
from sim.latency import build
from sim.latency.base import StepShape
from sim.latency.roofline import RooflineLatency

TINY = ModelSpec(name="tiny", source="test", num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1,
                 head_dim=4, intermediate_size=16, vocab_size=10, max_position_embeddings=4096, num_params=1000, dtype_bytes=2,
                 tensor_parallel=1)
GPU = GPUSpec(name="toy", source="test", memory_bytes=10**9, peak_flops=1e6, hbm_bandwidth=1e4,
              pcie_bandwidth=1e3)
CFG = LatencyConfig(kind="roofline", flops_efficiency=0.5, bandwidth_efficiency=0.5, step_overhead=0.01)


def test_hand_computed_single_gpu():
    m = RooflineLatency.from_specs(TINY, GPU, 1, CFG)
    # F = 1e6 * 0.5 = 5e5 FLOP/s; B = 1e4 * 0.5 = 5e3 B/s.
    # Weights: 1000 params * 2 B = 2000 B -> 0.4 s. GEMM per token: 2 * 1000 / 5e5 = 0.004 s.
    # KV bytes per token: 2 * 2 layers * 1 kv head * 4 * 2 B = 32 B -> 32 / 5e3 = 0.0064 s.
    # FLOPs per attention pair: 4 * 2 * 2 * 4 = 64 -> 64 / 5e5 = 1.28e-4 s.
    decode = StepShape.from_batch([(1, 9), (1, 19)])  # 2 tokens (< knee 100), kv 10 + 20 = 30
    assert m.step_time(decode) == pytest.approx(0.4 + 30 * 0.0064 + 0.01)
    prefill = StepShape.from_batch([(200, 0)])  # 200 tokens > knee, pairs 200 * 201 / 2 = 20100, reads its 200 KV
    assert m.step_time(prefill) == pytest.approx(200 * 0.004 + 20100 * 1.28e-4 + 200 * 0.0064 + 0.01)
    # A short chunk on a long context reads that context, as a decode there does: 2 tokens at 998 read 1,000.
    short = StepShape.from_batch([(2, 998)])  # pairs 2 * 998 + 3 = 1999
    assert m.step_time(short) == pytest.approx(0.4 + 1999 * 1.28e-4 + 1000 * 0.0064 + 0.01)
    assert m.step_time(StepShape()) == 0.0
    # step_overhead is the roofline's only CPU term: async scheduling overlaps it.
    assert m.host_time(decode) == m.host_time(prefill) == 0.01 and m.host_time(StepShape()) == 0.0


def test_hand_computed_tensor_parallel():
    m = RooflineLatency.from_specs(TINY, GPU, 2, CFG, link_bandwidth=1e3, allreduce_latency=1e-3)
    # Two GPUs double F and B. All-reduce: 2 per layer * 2 layers = 4 calls of 200 tokens * 8 * 2 B
    # = 3200 B each, ring 2 * (2 - 1) / 2 = 1 -> 3.2 s each, plus 1 ms latency each.
    s = StepShape.from_batch([(200, 0)])
    # TINY's one KV head is replicated on both GPUs: each reads all 200 tokens' 32 B at its own 5e3 B/s.
    expect = 200 * 0.002 + 20100 * 0.64e-4 + 200 * 0.0064 + 4 * 3.2 + 4 * 1e-3 + 0.01
    assert m.step_time(s) == pytest.approx(expect)
    # TINY's one KV head is replicated on both GPUs, so each reads the full 32 B per token of
    # context at its own B = 5e3 B/s: 0.0064 s, as on one GPU, not half of it.
    assert m.seconds_per_kv_read_token == pytest.approx(0.0064)


def test_real_specs_plausible():
    m = RooflineLatency.from_specs(load_model("llama-3.1-8b"), load_gpu("a100-80gb"), 1, LatencyConfig())
    one = m.step_time(StepShape.from_batch([(1, 100)]))
    assert 0.01 < one < 0.02  # 16 GB of weights at 70% of 2 TB/s is ~11 ms, plus 4 ms overhead


batch = st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 8192)), min_size=1, max_size=20)


@given(batch, st.integers(1, 512), st.integers(0, 512))
def test_monotone_in_tokens_and_context(b, extra_new, extra_ctx):
    m = RooflineLatency.from_specs(load_model("llama-3.1-8b"), load_gpu("h100"), 2, LatencyConfig())
    base = m.step_time(StepShape.from_batch(b))
    more_ctx = [(n, c + extra_ctx) for n, c in b]
    more_tok = b + [(extra_new, 0)]
    assert m.step_time(StepShape.from_batch(more_ctx)) >= base
    assert m.step_time(StepShape.from_batch(more_tok)) > base


def test_build_dispatch_and_bad_config():
    model, gpu = load_model("llama-3.1-8b"), load_gpu("a100-80gb")
    assert isinstance(build(LatencyConfig(kind="roofline"), model, gpu, 1), RooflineLatency)
    with pytest.raises(ValueError, match=r"^latency\.flops_efficiency: expected a fraction in \(0, 1\], got 1\.5$"):
        RooflineLatency.from_specs(model, gpu, 1, LatencyConfig(flops_efficiency=1.5))
    with pytest.raises(ValueError, match=r"^roofline: gpus must be >= 1, got 0$"):
        RooflineLatency.from_specs(model, gpu, 0, LatencyConfig())
