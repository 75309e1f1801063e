"""Model and GPU specifications, loaded from the JSON files in ``sim/specs``.

The engine model sizes its paged KV cache from these numbers and the
roofline latency model derives step times from them, so both read one
source. A user adds a model or GPU by dropping a ``NAME.model.json`` or
``NAME.gpu.json`` next to the shipped ones, or by passing a file path.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from sim.textout import MAX_COUNT, brief
from traces.validate import TraceError, parse_json_int, unique_keys

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
    # The longest context the model takes (its config.json's), vLLM's default
    # max_model_len: a longer request is refused (`sim.capacity.max_model_len`).
    max_position_embeddings: int
    num_params: int
    dtype_bytes: int
    tensor_parallel: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, all KV heads, on one GPU or a TP group no larger than the KV heads."""
        return self.kv_bytes_per_token_on(1)

    def kv_bytes_per_token_on(self, gpus: int) -> int:
        """Summed over a tensor-parallel group of ``gpus``. vLLM gives each GPU
        num_kv_heads / gpus heads, but at least one: with more GPUs than KV
        heads each head is replicated (QKVParallelLinear), so the group stores
        ``gpus`` heads, not ``num_kv_heads``, and fewer tokens fit."""
        return 2 * self.num_layers * max(self.num_kv_heads, gpus) * self.head_dim * self.dtype_bytes

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

    def serve_batch_defaults(self) -> tuple[int, int]:
        """``vllm serve``'s default (max_num_seqs, max_num_batched_tokens) on this GPU.

        vLLM 0.26.0 (`EngineArgs.get_batch_defaults`) gives GPUs of at least
        70 GiB other than the A100 (H100, MI300x) 1,024 sequences and an
        8,192-token budget, and every other GPU 256 and 2,048: a larger
        budget lowered the A100's throughput (vLLM PR #17885).
        """
        if self.memory_bytes >= 70 * 1024**3 and "a100" not in self.name.lower():
            return 1024, 8192
        return 256, 2048


def _spec_path(kind: str, name: str) -> Path:
    """A spec name's file: a path ending in .json as given, else the shipped ``NAME.KIND.json``."""
    path = Path(name)
    return path if path.suffix == ".json" else SPEC_DIR / f"{name}.{kind}.json"


def field_where(kind: str, name: str, key: str) -> str:
    """``path:LINE`` of a field in a spec that loaded, for a problem found only with
    other settings (the swap time of a block needs the model and the block size)."""
    path = _spec_path(kind, name)
    try:
        return json_key_line(path, path.read_text(encoding="utf-8"), key)
    except (OSError, UnicodeDecodeError):  # changed since it loaded: the path still says which file
        return str(path)


def _load(kind: str, cls, name: str):
    path = _spec_path(kind, name)
    if not path.exists():
        raise SpecError(f"unknown {kind} {name!r}; valid choices: {', '.join(available(kind))}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text, object_pairs_hook=unique_keys, parse_int=parse_json_int)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    except TraceError as exc:  # unique_keys: a key given twice
        raise SpecError(f"{json_key_line(path, text, exc.field, 2)}: field {exc.field!r}: duplicate key") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise SpecError(f"{path}: malformed JSON: nested too deeply for a {kind} spec") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a JSON object with the {kind} spec fields")
    expected = {f.name for f in fields(cls)}
    missing = expected - raw.keys()
    unknown = raw.keys() - expected
    if missing or unknown:
        raise SpecError(
            f"{path}: {kind} spec fields wrong: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    for f in fields(cls):
        problem = _field_problem(f.type, raw[f.name])
        if problem:
            raise SpecError(f"{json_key_line(path, text, f.name)}: field {f.name!r}: {problem}, got {brief(raw[f.name])}")
    spec = cls(**raw)
    problem = _consistency_problem(spec)
    if problem:
        raise SpecError(f"{json_key_line(path, text, problem[0])}: field {problem[0]!r}: {problem[1]}")
    return spec


def json_key_line(path: str | Path, text: str, key: str, occurrence: int = 1) -> str:
    """``path:LINE`` of the key's ``occurrence``-th ``"key":`` in the text (cheap, and right
    for any file json.loads accepted), or just the path if it is not found. A key given
    twice is reported at its second occurrence, the one that is the duplicate."""
    matches = re.finditer(rf'"{re.escape(key)}"\s*:', text)
    match = next((m for i, m in enumerate(matches, 1) if i == occurrence), None)
    return f"{path}:{text.count(chr(10), 0, match.start()) + 1}" if match else str(path)


def _field_problem(hint: str, value: object) -> str | None:
    """What a field's value should be, if it is not. Every count and size is
    divided by or multiplied into the KV-cache and roofline arithmetic, so
    zero or a negative would crash the run or size the cache wrong."""
    if hint == "str":
        return None if isinstance(value, str) and value.strip() else "expected a non-empty string"
    if isinstance(value, bool):
        return "expected an integer >= 1" if hint == "int" else "expected a finite number > 0"
    if hint == "int":
        if isinstance(value, int) and value > MAX_COUNT:
            return "expected at most 2**53"
        return None if isinstance(value, int) and value >= 1 else "expected an integer >= 1"
    if isinstance(value, int) and value.bit_length() > 1000:  # past a float: math.isfinite raised OverflowError
        return "expected a finite number > 0"
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return None
    return "expected a finite number > 0"


def _consistency_problem(spec: object) -> tuple[str, str] | None:
    """(field, problem) for a model whose attention heads cannot be grouped:
    grouped-query attention shares each KV head among num_heads / num_kv_heads
    query heads, so the count must divide, as in every Hugging Face config."""
    if isinstance(spec, ModelSpec) and spec.num_heads % spec.num_kv_heads:
        return "num_kv_heads", (
            f"expected a divisor of num_heads ({spec.num_heads}), got {spec.num_kv_heads}"
        )
    return None


def available(kind: str) -> list[str]:
    return sorted(p.name[: -len(f".{kind}.json")] for p in SPEC_DIR.glob(f"*.{kind}.json"))


def load_model(name: str) -> ModelSpec:
    return _load("model", ModelSpec, name)


def load_gpu(name: str) -> GPUSpec:
    return _load("gpu", GPUSpec, name)
