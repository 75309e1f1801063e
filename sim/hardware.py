"""Model and GPU specifications, loaded from the JSON files in ``sim/specs``.

The engine model sizes its paged KV cache from these numbers and the
roofline latency model derives step times from them, so both read one
source. A user adds a model or GPU by dropping a ``NAME.model.json`` or
``NAME.gpu.json`` next to the shipped ones, or by passing a file path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

SPEC_DIR = Path(__file__).parent / "specs"


class SpecError(ValueError):
    """A model or GPU spec that is missing, malformed or unknown."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: int
    dtype_bytes: int
    tensor_parallel: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, all KV heads (summed over the TP group)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


@dataclass(frozen=True)
class GPUSpec:
    name: str
    source: str
    memory_bytes: int
    peak_flops: float
    hbm_bandwidth: float  # bytes/s
    pcie_bandwidth: float  # bytes/s, host link used by swap preemption


def _load(kind: str, cls, name: str):
    path = Path(name)
    if not path.suffix == ".json":
        path = SPEC_DIR / f"{name}.{kind}.json"
    if not path.exists():
        raise SpecError(f"unknown {kind} {name!r}; valid choices: {', '.join(available(kind))}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    expected = {f.name for f in fields(cls)}
    missing = expected - raw.keys()
    unknown = raw.keys() - expected
    if missing or unknown:
        raise SpecError(
            f"{path}: {kind} spec fields wrong: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    return cls(**raw)


def available(kind: str) -> list[str]:
    return sorted(p.name[: -len(f".{kind}.json")] for p in SPEC_DIR.glob(f"*.{kind}.json"))


def load_model(name: str) -> ModelSpec:
    return _load("model", ModelSpec, name)


def load_gpu(name: str) -> GPUSpec:
    return _load("gpu", GPUSpec, name)
