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
    """The engine configuration leaves no room for the KV cache; ``key`` is the
    engine field to blame (``model`` when the memory as a whole is short)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"engine.{key}: {problem}")
        self.key = key
        self.problem = problem


def kv_cache_bytes(cfg: EngineConfig, model: ModelSpec, gpu: GPUSpec) -> int:
    budget = gpu.memory_bytes * cfg.gpus_per_replica * cfg.gpu_memory_utilization
    return int(budget - model.weight_bytes - cfg.activation_reserve_bytes * cfg.gpus_per_replica)


def max_model_len(cfg: EngineConfig, model: ModelSpec) -> int:
    """The longest call (prompt + output tokens) the engine takes: ``engine.max_model_len``,
    else the model's context (vLLM's default). vLLM refuses a longer request outright."""
    return cfg.max_model_len if cfg.max_model_len is not None else model.max_position_embeddings


def context_problem(cfg: EngineConfig, model: ModelSpec) -> str | None:
    """Why ``engine.max_model_len`` is refused whatever the memory: past the model's context,
    which vLLM 0.26.0 refuses (config/model.py, _get_and_verify_max_len)."""
    longest = max_model_len(cfg, model)
    if longest > model.max_position_embeddings:
        return (f"expected at most {model.name}'s context (max_position_embeddings: "
                f"{model.max_position_embeddings}), as vLLM requires, got {longest}")
    return None


def _check_context_fits(cfg: EngineConfig, model: ModelSpec, blocks: int) -> None:
    """vLLM refuses to start when one call of ``max_model_len`` tokens would not fit the KV cache
    its memory leaves (v1/core/kv_cache_utils.py, check_enough_kv_cache_memory), whatever
    ``num_gpu_blocks`` overrides; ``blocks`` is what the memory holds."""
    problem = context_problem(cfg, model)
    if problem:
        raise CapacityError("max_model_len", problem)
    longest = max_model_len(cfg, model)
    if -(-longest // cfg.block_size) <= blocks:
        return
    fits = blocks * cfg.block_size
    given = ("engine.max_model_len" if cfg.max_model_len is not None
             else f"the model's context (max_position_embeddings of {model.name})")
    raise CapacityError(
        "max_model_len",
        f"{given} is {longest} tokens, but the KV cache left after the weights holds {fits} tokens, and vLLM "
        f"refuses to start unless one call of max_model_len fits; set engine.max_model_len to at most {fits}, "
        f"or give the KV cache more memory (engine.gpu_memory_utilization, engine.gpus_per_replica)",
    )


def num_kv_blocks(cfg: EngineConfig, model: ModelSpec | None = None, gpu: GPUSpec | None = None) -> int:
    """Blocks of ``cfg.block_size`` tokens per replica; raises CapacityError if < 1 request fits.

    ``engine.num_gpu_blocks`` replaces the count, as vLLM's
    ``num_gpu_blocks_override`` does (to make memory bind in a test), but
    vLLM still loads the weights and allocates those blocks: a model that
    does not fit, or more blocks than the memory left holds, is refused too.
    """
    if cfg.num_gpu_blocks is not None and cfg.num_gpu_blocks < 1:
        raise CapacityError("num_gpu_blocks", f"expected an integer >= 1, got {cfg.num_gpu_blocks}")
    model = model or load_model(cfg.model)
    gpu = gpu or load_gpu(cfg.gpu)
    free = kv_cache_bytes(cfg, model, gpu)
    per_token = model.kv_bytes_per_token_on(cfg.gpus_per_replica)
    bytes_per_block = per_token * cfg.block_size
    if free <= 0:
        raise CapacityError("model", _does_not_fit(cfg, model, gpu))
    if free >= bytes_per_block:
        _check_context_fits(cfg, model, int(free // bytes_per_block))
    if cfg.num_gpu_blocks is not None:
        if cfg.num_gpu_blocks * bytes_per_block > free:
            raise CapacityError(
                "num_gpu_blocks",
                f"{cfg.num_gpu_blocks} blocks of {cfg.block_size} tokens need "
                f"{cfg.num_gpu_blocks * bytes_per_block / 1e9:.4g} GB of KV cache, more than the "
                f"{free / 1e9:.4g} GB left after the weights; at most {int(free // bytes_per_block)} fit",
            )
        return cfg.num_gpu_blocks
    if free < bytes_per_block:
        # The weights fit; one block is what does not.
        group = f" on {cfg.gpus_per_replica} GPUs" if cfg.gpus_per_replica > 1 else ""
        raise CapacityError(
            "block_size",
            f"a block of {cfg.block_size} tokens needs {bytes_per_block / 1e9:.3g} GB of KV cache "
            f"({per_token} bytes per token for {model.name}{group}), more than the "
            f"{free / 1e9:.3g} GB left for the KV cache; use a smaller engine.block_size (vLLM's default is 16)",
        )
    return int(free // bytes_per_block)


def _does_not_fit(cfg: EngineConfig, model: ModelSpec, gpu: GPUSpec) -> str:
    """Every term of the memory arithmetic with its key, since any of them may be the one set wrong."""
    n = cfg.gpus_per_replica
    weights = model.weight_bytes / 1e9
    reserve = cfg.activation_reserve_bytes * n / 1e9
    have = gpu.memory_bytes * n * cfg.gpu_memory_utilization / 1e9
    return (
        f"{model.name} does not fit on engine.gpus_per_replica={n} x {gpu.name}: "
        f"the weights (engine.model) need {weights:.1f} GB and the activation reserve "
        f"(engine.activation_reserve_bytes={cfg.activation_reserve_bytes} per GPU) {reserve:.1f} GB, "
        f"{weights + reserve:.1f} GB in all, but the usable memory is {have:.1f} GB "
        f"({n} x {gpu.memory_bytes / 1e9:.1f} GB x engine.gpu_memory_utilization={cfg.gpu_memory_utilization}); "
        f"raise engine.gpus_per_replica (the paper serves 70B on 4 GPUs) or engine.gpu_memory_utilization, "
        f"or lower engine.activation_reserve_bytes"
    )
