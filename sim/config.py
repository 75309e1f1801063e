"""Configuration dataclasses for one simulated experiment.

`sim.experiments` builds these from `experiments.yaml` (with ``--set``
overrides) and validates them; the simulator only reads them. Defaults
follow vLLM v1's online-serving defaults so an unconfigured run behaves like
``vllm serve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sim.core.params import PolicyParams
from sim.core.policies import POLICY_CLASSES


class ConfigError(ValueError):
    """A bad experiments file, experiment or override; the message is for the user."""


# Every policy an experiment may name.
POLICIES = tuple(POLICY_CLASSES)
# The ones an experiment compares when it names none: the five, the
# paper's comparison. program_fcfs (Continuum's order) is opt-in.
DEFAULT_POLICIES = ("fcfs", "mlfq", "plas", "atlas", "srpt")
BALANCERS = ("round_robin", "least_used", "locality")
PREEMPTION_MODES = ("recompute", "swap")
# vLLM 0.26.0 takes any --block-size > 0 (config/cache.py), but its attention backends for these GPUs
# (FlashAttention, Triton, FlexAttention: `get_supported_kernel_block_sizes`) take multiples of 16 only,
# so a block of 8 finds no backend and the engine does not start.
KV_BLOCK_MULTIPLE = 16
# The most engine replicas one experiment may have. Each is a simulated engine
# with its own KV-cache pool and scheduler, built before the first arrival,
# so 10**8 (a typo) runs for minutes and gigabytes before failing; the
# paper's clusters have at most 8, and 4096 is past any real vLLM deployment
# behind one balancer.
MAX_REPLICAS = 4096


@dataclass(frozen=True)
class EngineConfig:
    model: str = "llama-3.1-8b"
    gpu: str = "a100-80gb"
    # GPUs per replica; the replica's memory is gpu memory x this.
    gpus_per_replica: int = 1
    # vLLM 0.26.0's default is 0.92 (config/cache.py); we keep 0.9, the
    # default for most of vLLM's history, which every figure in docs/
    # and the in-process replay use. 0.92 gives 2.9% more KV blocks.
    gpu_memory_utilization: float = 0.9
    # Memory kept for activations and CUDA graphs, on top of the weights.
    activation_reserve_bytes: int = 2 * 1024**3
    block_size: int = 16  # vLLM's default KV block
    max_num_seqs: int = 256  # vLLM v1 default
    # `vllm serve` defaults on an A100 (vLLM 0.26.0, engine/arg_utils.py): 256
    # sequences and a 2048-token budget. An experiment that leaves these two
    # unset gets its GPU's (`GPUSpec.serve_batch_defaults`: an H100 1024 and 8192).
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # vLLM's scheduler_reserve_full_isl (default true in 0.26.0): a waiting
    # call is admitted only if its whole sequence fits in the free KV blocks,
    # prefix hits counted, not just its first prefill chunk. false checks the
    # first chunk only, as earlier releases did: a long prompt then gets in
    # on its first chunk and its later chunks preempt for memory.
    scheduler_reserve_full_isl: bool = True
    preemption_mode: str = "recompute"  # vLLM v1 preempts by recompute only
    replicas: int = 1
    balancer: str = "locality"
    # Explicit KV capacity in blocks; None derives it from the specs. All are
    # usable: from a vLLM log's "GPU KV cache size" or num_gpu_blocks, take
    # one off for the null block vLLM reserves (v1/core/block_pool.py). The
    # weights must still fit, and the blocks in what they leave (`sim.capacity`).
    num_gpu_blocks: int | None = None
    # vLLM's --max-model-len: the longest call (prompt + output tokens) the
    # engine takes; a longer one is refused, as vLLM refuses it. None: the
    # model's context (its spec's max_position_embeddings, 131,072 for
    # Llama-3.1), vLLM's default. At most that, and one call of it must fit
    # the KV cache the memory leaves, or vLLM does not start.
    max_model_len: int | None = None
    # Continuum's KV time-to-live, in seconds; 0 (vLLM) turns it off. A call
    # whose program will send a follow-up (it has children in the DAG, as a
    # tool-calling turn does) keeps its keyed KV blocks pinned on its replica
    # for this long, or until a child is admitted there: new calls cannot
    # evict them, so the follow-up hits its history. Pins give way instead of
    # a preemption (for a running call that needs blocks, or for waiting
    # calls a preemptive policy ranks first) and to an idle engine's best
    # waiting call (see sim.replica). Needs enable_prefix_caching. Live
    # engines (sim serve, the vLLM plugin) do not know the DAG, so there a
    # client tags each call to pin instead (vllm_xargs.kv_ttl; python -m
    # engine replay --kv-ttl), and sim serve refuses this key.
    kv_ttl: float = 0.0
    # vLLM's async scheduling, the default of `vllm serve` 0.26.0 on one
    # GPU: step N+1 is scheduled when step N starts, before N's outputs are
    # known. So a call that arrives during step N is first computed in step
    # N+2, and the KV blocks and sequence slot of a call that finishes in
    # step N are free only from step N+2 (sim.replica, "async scheduling").
    # false (the default) schedules each step after the previous one ends,
    # as the in-process replay (python -m engine replay --target inprocess) does,
    # and as every figure in docs/ but the few marked async was measured.
    async_scheduling: bool = False
    # Account steady decodes lazily (sim.lazy_decode); results
    # are bit-identical either way, false runs the per-step reference path.
    fast_forward: bool = True


@dataclass(frozen=True)
class LatencyConfig:
    kind: str = "roofline"  # constant | roofline | fitted
    seconds: float = 0.02  # constant kind
    name: str | None = None  # fitted kind: the model's name or path
    # Roofline: fraction of peak FLOP/s and bandwidth actually reached.
    flops_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.7
    step_overhead: float = 0.004  # CPU seconds per step: scheduling, input preparation, launches (async overlaps it)


@dataclass(frozen=True)
class WorkloadConfig:
    # Either a generator (`generator` and `params`) or a trace file (`trace`).
    generator: str | None = "bfcl"
    params: dict[str, Any] = field(default_factory=dict)  # programs, rate, arrival, ...
    trace: str | None = None
    # Where ``params`` were set ("experiments.yaml:12", "--set"), for errors that
    # only the draw shows (a mean whose draws pass the trace format's limits).
    # Not part of the configuration: equal workloads from two files are equal.
    origin: str | None = field(default=None, compare=False, repr=False)
    # Where to blame each parameter given, latest-set first, for a draw error
    # that names the parameters shaping it (`traces.generators.DrawError`).
    param_origins: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class FitOrigins:
    """Where an experiment set what made a call too large, one place per limit a call can
    exceed (``"--set engine.num_gpu_blocks=1"``, ``"experiments.yaml:12"``), since a
    call over the token budget was blamed on the keys that size the KV cache."""

    kv_cache: str | None = None
    token_budget: str | None = None
    context_length: str | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    description: str = ""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    policy_params: PolicyParams = field(default_factory=PolicyParams)
    seed: int = 0
    # Where the key was set that made a call too large for the engine, when one is: for
    # each limit, of its keys and the workload's, the one set last. Not part of the
    # configuration, as WorkloadConfig.origin.
    fit_origins: FitOrigins | None = field(default=None, compare=False, repr=False)
