"""Roofline latency: an analytic step time from the model and GPU specs.

Why: it needs no profile, so any (model, GPU, TP degree) in ``sim/specs``
gets a plausible step time, and its terms are the same ones the fitted model
uses, which makes the two comparable term by term.

Per step, on each of the ``gpus`` tensor-parallel GPUs (work split evenly)::

    gemm      = max(2 * params * num_tokens / F,  weight_bytes / B)
    prefill   = 4 * layers * heads * head_dim * prefill_attn_pairs / F
    kv_reads  = kv_bytes_per_token * kv_read_tokens / B       (decodes' and prefill chunks')
    allreduce = 2 * layers * ring(num_tokens * hidden * dtype_bytes)   (gpus > 1)
    step      = gemm + prefill + kv_reads + allreduce + step_overhead

with ``F = peak_flops * flops_efficiency * gpus`` and
``B = hbm_bandwidth * bandwidth_efficiency * gpus``. ``step_overhead`` is
the roofline's only term not spent on a GPU kernel, so it is the step's host
time (``host_time``), the part async scheduling overlaps with the GPU.

Simplifications (deliberate; the fitted model corrects them from data):

* GEMMs: 2 FLOPs per parameter per token, for every token, including the
  embedding and LM head. vLLM computes logits only for the sampled positions
  and the embedding is a lookup, so this overestimates large prefills of an
  8B model by ~13% of the GEMM term. Weights are read once per step (the
  batch shares them); activation traffic is ignored.
* The GEMM, attention and communication kernels run one after another, so
  their times add; only within the GEMMs is compute overlapped with the
  weight reads (the max).
* Attention: a prefill chunk counts QK^T and PV, 2 x 2 FLOPs per (query,
  key) pair per head-dim element per query head, and reads its context's K
  and V once, as a decode does; a decode's FLOPs are ignored (memory-bound).
  The two terms add, where one kernel overlaps them (a long chunk is
  compute-bound, a short one on a long context memory-bound), so a chunk
  pays both: at most the smaller one too much (4% of a 2,048-token chunk at
  context 0, under 2% at 16,384).
* Tensor parallel: two all-reduces per layer (after attention and after the
  MLP) of the step's hidden states, as a bandwidth-only ring all-reduce,
  ``2 (g-1)/g x bytes / link_bandwidth``, plus a fixed latency per
  all-reduce. GPUSpec has no interconnect field, so ``link_bandwidth``
  defaults to NVLink-class 300 GB/s per direction (A100 NVLink3 is 600 GB/s
  bidirectional; H100 NVLink4 is 900 GB/s). No overlap with compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.config import LatencyConfig
from sim.hardware import GPUSpec, ModelSpec
from sim.latency.base import StepShape

DEFAULT_LINK_BANDWIDTH = 300e9  # bytes/s per direction, NVLink-class
DEFAULT_ALLREDUCE_LATENCY = 10e-6  # seconds per all-reduce call (launch + sync)


@dataclass(frozen=True)
class RooflineLatency:
    """Coefficients precomputed so ``step_time`` is a handful of float ops."""

    gemm_seconds_per_token: float
    weights_read_seconds: float
    seconds_per_attn_pair: float
    seconds_per_kv_read_token: float
    allreduce_seconds_per_token: float
    allreduce_fixed_seconds: float
    step_overhead: float
    name: str = "roofline"

    @classmethod
    def from_specs(
        cls,
        model: ModelSpec,
        gpu: GPUSpec,
        gpus: int = 1,
        cfg: LatencyConfig | None = None,
        link_bandwidth: float = DEFAULT_LINK_BANDWIDTH,
        allreduce_latency: float = DEFAULT_ALLREDUCE_LATENCY,
    ) -> "RooflineLatency":
        cfg = cfg or LatencyConfig()
        if gpus < 1:
            raise ValueError(f"roofline: gpus must be >= 1, got {gpus}")
        for key in ("flops_efficiency", "bandwidth_efficiency"):
            value = getattr(cfg, key)
            if not 0 < value <= 1:
                raise ValueError(f"latency.{key}: expected a fraction in (0, 1], got {value}")
        if cfg.step_overhead < 0:
            raise ValueError(f"latency.step_overhead: expected >= 0 seconds, got {cfg.step_overhead}")
        flops = gpu.peak_flops * cfg.flops_efficiency * gpus
        bw = gpu.hbm_bandwidth * cfg.bandwidth_efficiency * gpus
        if gpus > 1:
            per_token_bytes = model.hidden_size * model.dtype_bytes
            ring = 2 * (gpus - 1) / gpus / link_bandwidth
            ar_per_token = 2 * model.num_layers * per_token_bytes * ring
            ar_fixed = 2 * model.num_layers * allreduce_latency
        else:
            ar_per_token = ar_fixed = 0.0
        return cls(
            gemm_seconds_per_token=2 * model.num_params / flops,
            weights_read_seconds=model.weight_bytes / bw,
            seconds_per_attn_pair=4 * model.num_layers * model.num_heads * model.head_dim / flops,
            seconds_per_kv_read_token=model.kv_bytes_per_token_on(gpus) / bw,
            allreduce_seconds_per_token=ar_per_token,
            allreduce_fixed_seconds=ar_fixed,
            step_overhead=cfg.step_overhead,
            name=f"roofline:{model.name}@{gpus}x{gpu.name}",
        )

    def step_time(self, shape: StepShape) -> float:
        if not shape.num_seqs:
            return 0.0
        n = shape.num_tokens
        gemm = self.gemm_seconds_per_token * n
        if gemm < self.weights_read_seconds:
            gemm = self.weights_read_seconds
        return (
            gemm
            + self.seconds_per_attn_pair * shape.prefill_attn_pairs
            + self.seconds_per_kv_read_token * (shape.decode_kv_tokens + shape.prefill_kv_tokens)
            + self.allreduce_seconds_per_token * n
            + self.allreduce_fixed_seconds
            + self.step_overhead
        )

    def host_time(self, shape: StepShape) -> float:
        return self.step_overhead if shape.num_seqs else 0.0
