"""KV-cache capacity by hand: vLLM's memory arithmetic on the shipped specs."""

from __future__ import annotations

import pytest

from sim.capacity import CapacityError, num_kv_blocks
from sim.config import EngineConfig
from sim.hardware import load_model

A100 = 85_899_345_920  # bytes, sim/specs/a100-80gb.gpu.json
WEIGHTS_8B = 8_030_261_248 * 2
RESERVE = 2 * 1024**3  # activation reserve per GPU


def free(gpus: int) -> int:
    return int(A100 * gpus * 0.9 - WEIGHTS_8B - RESERVE * gpus)


def test_one_a100_with_llama_8b():
    # K and V x 32 layers x 8 KV heads x 128 x 2 B = 131,072 B per token; blocks of 16 tokens.
    assert load_model("llama-3.1-8b").kv_bytes_per_token == 131_072
    assert num_kv_blocks(EngineConfig()) == free(1) // (131_072 * 16) == 28_181


def test_eight_gpus_split_the_eight_kv_heads():
    assert num_kv_blocks(EngineConfig(gpus_per_replica=8)) == free(8) // (131_072 * 16) == 279_061


def test_more_gpus_than_kv_heads_replicate_them():
    # 16 GPUs hold one KV head each: 16 heads' worth of KV per token, 262,144 B, not 131,072.
    assert load_model("llama-3.1-8b").kv_bytes_per_token_on(16) == 262_144
    assert num_kv_blocks(EngineConfig(gpus_per_replica=16)) == free(16) // (262_144 * 16) == 282_890


def test_a_block_that_does_not_fit_names_the_bytes_per_token_of_the_group():
    cfg = EngineConfig(gpus_per_replica=16, block_size=2**23)
    with pytest.raises(CapacityError, match=r"262144 bytes per token for llama-3.1-8b on 16 GPUs") as err:
        num_kv_blocks(cfg)
    assert err.value.key == "block_size"
