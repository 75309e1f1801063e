"""Build and drive vLLM's real v1 scheduler on a CPU, without a model or GPU.

Why: the plugin must be tested inside vLLM's own `Scheduler`, not a mock,
because it relies on vLLM's private internals (DESIGN.md section 6). As in
vLLM's unit tests, the scheduler needs only configs: a local ``config.json``
(a tiny Llama written here, no hub access), ``skip_tokenizer_init``,
``DeviceConfig("cpu")``, ``cache_config.num_gpu_blocks`` and a
`KVCacheConfig` with one full-attention group. The model runner is replaced
by `fake_output`, which samples one token for every request whose prefill is
complete, as a real runner would. Used by the tests and the benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from engine.scheduler import ProgramAwareAsyncScheduler, ProgramAwareScheduler

# A token id the fake runner samples; never the EOS of the tiny config.
SAMPLED_TOKEN = 7
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 1024,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}


def write_tiny_model(directory: str | Path) -> Path:
    """A local model directory holding only a tiny Llama ``config.json``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def make_scheduler(
    model_dir: str | Path,
    *,
    policy: str = "plas",
    params: Mapping[str, Any] | None = None,
    max_num_seqs: int = 4,
    max_num_batched_tokens: int = 512,
    num_blocks: int = 256,
    block_size: int = 16,
    max_model_len: int = 4096,
    enable_prefix_caching: bool = True,
    async_scheduling: bool = False,
    scheduling_policy: str = "fcfs",
    scheduler_cls: type | None = None,
    additional_config: Mapping[str, Any] | None = None,
):
    """A program-aware (or any given) v1 scheduler over a CPU config.

    ``scheduling_policy`` is vLLM's own (``fcfs``/``priority``); it matters
    only for a plain vLLM ``scheduler_cls``, the plugin always uses the heap.

    ``additional_config`` overrides the ``{"autellix": {...}}`` built from
    ``policy`` and ``params`` (to test configuration errors).
    """
    if additional_config is None:
        additional_config = {"autellix": {"policy": policy, "params": dict(params or {})}}
    model_config = ModelConfig(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float16", seed=0, max_model_len=max_model_len
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=True,
        async_scheduling=async_scheduling,
        policy=scheduling_policy,
        is_encoder_decoder=False,
    )
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        device_config=DeviceConfig(device="cpu"),
        additional_config=dict(additional_config),
    )
    cache_config.num_gpu_blocks = num_blocks
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"], FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
            )
        ],
    )
    # Block hashes depend on this seed: set it once per scheduler, before
    # any request is made (vLLM's engine core does the same at start-up).
    init_none_hash(sha256)
    if scheduler_cls is None:
        scheduler_cls = ProgramAwareAsyncScheduler if async_scheduling else ProgramAwareScheduler
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
    )


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    max_tokens: int,
    *,
    extra_args: Mapping[str, Any] | None = None,
    block_size: int = 16,
    arrival_time: float | None = None,
    priority: int = 0,
) -> Request:
    """A request that generates exactly ``max_tokens`` tokens, tagged via ``extra_args``."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=dict(extra_args or {}) or None)
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling_params=params,
        pooling_params=None,
        arrival_time=arrival_time,
        priority=priority,
        block_hasher=get_request_block_hasher(block_size, sha256),
    )


def fake_output(scheduler, scheduler_output) -> ModelRunnerOutput:
    """What a model runner returns: one sampled token per request past its prefill."""
    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        request = scheduler.requests[rid]
        done_prefill = request.num_computed_tokens >= request.num_tokens
        sampled.append([SAMPLED_TOKEN] if done_prefill else [])
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
        sampled_token_ids=sampled,
    )


class FakeClock:
    """An injectable ``scheduler.clock`` that moves only when told to."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def step(scheduler, clock: FakeClock | None = None, seconds: float = 0.0):
    """One synchronous engine step: schedule, execute for ``seconds`` of ``clock``, update.

    Returns the SchedulerOutput.
    """
    output = scheduler.schedule()
    if clock is not None:
        clock.advance(seconds)
    scheduler.update_from_output(output, fake_output(scheduler, output))
    return output
