"""KV-cache capacity of one engine replica, as vLLM sizes it.

vLLM profiles the GPU, then gives the KV cache what is left of
``memory x gpu_memory_utilization`` after the weights and the activations.
We use the same arithmetic with a fixed activation reserve. An impossible
configuration (a model that does not fit) is a configuration error, reported
before any simulation starts.
"""

from __future__ import annotations

from sim.config import EngineConfig
from sim.hardware import GPUSpec, ModelSpec, load_gpu, load_model


class CapacityError(ValueError):
    """The engine configuration leaves no room for the KV cache."""


def kv_cache_bytes(cfg: EngineConfig, model: ModelSpec, gpu: GPUSpec) -> int:
    budget = gpu.memory_bytes * cfg.gpus_per_replica * cfg.gpu_memory_utilization
    return int(budget - model.weight_bytes - cfg.activation_reserve_bytes * cfg.gpus_per_replica)


def num_kv_blocks(cfg: EngineConfig, model: ModelSpec | None = None, gpu: GPUSpec | None = None) -> int:
    """Blocks of ``cfg.block_size`` tokens per replica; raises CapacityError if < 1 request fits."""
    if cfg.num_gpu_blocks is not None:
        if cfg.num_gpu_blocks < 1:
            raise CapacityError(f"engine.num_gpu_blocks: expected an integer >= 1, got {cfg.num_gpu_blocks}")
        return cfg.num_gpu_blocks
    model = model or load_model(cfg.model)
    gpu = gpu or load_gpu(cfg.gpu)
    free = kv_cache_bytes(cfg, model, gpu)
    bytes_per_block = model.kv_bytes_per_token * cfg.block_size
    blocks = free // bytes_per_block if free > 0 else 0
    if blocks < 1:
        need = (model.weight_bytes + cfg.activation_reserve_bytes * cfg.gpus_per_replica) / 1e9
        have = gpu.memory_bytes * cfg.gpus_per_replica * cfg.gpu_memory_utilization / 1e9
        raise CapacityError(
            f"engine.model: {model.name} does not fit on engine.gpus_per_replica="
            f"{cfg.gpus_per_replica} x {gpu.name}: weights and activations need {need:.1f} GB, "
            f"the usable memory is {have:.1f} GB (gpu_memory_utilization={cfg.gpu_memory_utilization}); "
            f"raise engine.gpus_per_replica (the paper serves 70B on 4 GPUs)"
        )
    return int(blocks)
