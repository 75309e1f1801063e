"""Named experiments: `experiments.yaml` (plus ``--set`` overrides) to validated `ExperimentConfig`.

An experiment must fail before any simulation starts if it is wrong, and the
message must say where: the file and line (from PyYAML's node marks) or the
``--set`` that caused it, the full dotted key, and the valid choices. A
simulation that runs for minutes on a typo is the failure this module exists
to prevent.

File format::

    defaults:            # optional, deep-merged under every experiment
      engine: {model: llama-3.1-8b, ...}
    experiments:
      NAME:
        description: ...
        workload: {generator: bfcl, params: {programs: 200, rate: 1.0, ...}}
        # or      {trace: path/to/trace.jsonl}   (relative to the working directory)
        engine: {...}          # fields of sim.config.EngineConfig
        latency: {...}         # fields of sim.config.LatencyConfig
        policies: [fcfs, plas]
        policy_params: {...}   # fields of sim.core.params.PolicyParams
        seed: 0

Layers are merged in order defaults < experiment < ``--set``
(`sim.config_layers` has the rules, and keeps where each key was set). The
file and ``--set`` values are read by `sim.yaml_io` (YAML 1.2 numbers, each
key's line); this module checks the merged data against the config
dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from sim.config import (
    BALANCERS,
    DEFAULT_POLICIES,
    KV_BLOCK_MULTIPLE,
    MAX_REPLICAS,
    POLICIES,
    PREEMPTION_MODES,
    ConfigError,
    EngineConfig,
    ExperimentConfig,
    FitOrigins,
    LatencyConfig,
    WorkloadConfig,
)
from sim.config_layers import Layered, merge_layers, override_layer
from sim.core.params import MAX_SECONDS, PolicyParams
from sim.textout import MAX_COUNT, brief
from sim.yaml_io import KeyPath, dotted, parse_document

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "experiments.yaml"
TOP_KEYS = ("defaults", "experiments", "sweeps")  # sweeps: read by sim.sweep
EXPERIMENT_KEYS = ("description", "workload", "engine", "latency", "policies", "policy_params", "seed")
WORKLOAD_KEYS = ("generator", "params", "trace")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ExperimentsFile:
    """A parsed experiments file; ``lines`` maps key paths (from the top) to 1-based lines."""

    path: str  # as shown in messages
    defaults: dict[str, Any]
    experiments: dict[str, dict[str, Any]]
    lines: dict[KeyPath, int]
    # Raw ``sweeps:`` entries, checked by `sim.sweep` (which shares this file's line marks).
    sweeps: dict[str, Any] = dataclasses.field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.experiments)

    def description(self, name: str) -> str:
        desc = self.experiments[name].get("description", "")
        return desc if isinstance(desc, str) else str(desc)


def _display(path: str | Path) -> str:
    """The path relative to the working directory when it is under it: short messages."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel

def load_file(path: str | Path | None = None) -> ExperimentsFile:
    """Parse and shape-check an experiments file; experiments are validated by `resolve`."""
    path = Path(path) if path is not None else DEFAULT_FILE
    where = _display(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        hint = "; pass --experiments FILE" if path == DEFAULT_FILE else ""
        raise ConfigError(f"{where}: experiments file not found{hint}") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{where}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    node, data, lines = parse_document(text, where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"{where}:{lines.get((key,), 1)}: {key}: unknown key; valid keys: {', '.join(TOP_KEYS)}"
            )
    defaults = _section(data, "defaults", "a mapping", where, lines)
    experiments = data.get("experiments")
    if not isinstance(experiments, dict) or not experiments:
        raise ConfigError(f"{where}:{lines.get(('experiments',), 1)}: experiments: expected a non-empty mapping")
    for name, body in experiments.items():
        line = lines.get(("experiments", name), 1)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # match's "$" let "a\n" through
            raise ConfigError(
                f"{where}:{line}: experiment name {name!r}: use letters, digits, '.', '_' and '-', starting with "
                "a letter or digit (it names the output directory)"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{where}:{line}: experiments.{name}: expected a mapping")
    sweeps = _section(data, "sweeps", "a mapping of sweep names", where, lines)
    for name in sweeps:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # "../x" wrote outside results/sweeps/
            raise ConfigError(
                f"{where}:{lines.get(('sweeps', name), 1)}: sweep name {name!r}: use letters, digits, '.', '_' "
                "and '-', starting with a letter or digit (it names the output directory)"
            )
    return ExperimentsFile(where, defaults, experiments, lines, sweeps)


def _section(data: dict[str, Any], key: str, what: str, where: str, lines: dict[KeyPath, int]) -> dict[str, Any]:
    """The top-level mapping ``key``, or {} where the file has no such key.

    ``defaults: []`` (or 0, false, "") was taken for an empty mapping, and ``defaults:``
    with nothing under it too: refused as an experiment's ``engine:`` with nothing under
    it is (`_Checker.build_dataclass`), since either way keys meant to be there are not.
    """
    if key not in data:
        return {}
    value = data[key]
    if not isinstance(value, dict):
        got = "null (a section with nothing under it); remove it, or give it keys" if value is None else _show(value)
        raise ConfigError(f"{where}:{lines.get((key,), 1)}: {key}: expected {what}, got {got}")
    return value


def list_experiments(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(name, description) of every experiment in the file, in file order."""
    ef = load_file(path)
    return [(name, ef.description(name)) for name in ef.names()]

# --- validation ----------------------------------------------------------------------


@dataclass
class _Checker:
    """Raises ConfigError naming the origin, the experiment and the dotted key."""

    name: str | None  # None: a configuration no experiment named (sim serve's flags alone)
    layered: Layered

    def fail(self, path: KeyPath, problem: str, at: KeyPath | None = None) -> typing.NoReturn:
        """Raise for the key ``path``, located where ``at`` (default ``path``) was set."""
        origin = self.layered.origin(path if at is None else at)
        where = f"{origin}: " if origin else ""
        experiment = f"experiment {self.name!r}: " if self.name is not None else ""
        key = f"{dotted(path)}: " if path else ""
        raise ConfigError(f"{where}{experiment}{key}{problem}")

    def keys(self, data: Any, path: KeyPath, valid: Sequence[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.fail(path, f"expected a mapping with keys {', '.join(valid)}, got {_show(data)}")
        for key in data:
            if not isinstance(key, str):  # `3: 4` read "engine[3]: unknown key", `~: 4` "engine.None"
                self.fail(path, f"{_key_kind(key)}, not a key name; valid keys: {', '.join(valid)}",
                          at=path + (key,))
            if key not in valid:
                self.fail(path + (key,), f"unknown key; valid keys: {', '.join(valid)}")
        return data

    def choice(self, path: KeyPath, value: Any, valid: Sequence[str]) -> None:
        if value not in valid:
            self.fail(path, f"unknown value {value!r}; valid choices: {', '.join(valid)}")

    def build_dataclass(self, cls: type, data: Any, path: KeyPath) -> Any:
        names = [f.name for f in fields(cls)]
        if data is None and self.layered.rank(path) >= 0:
            # A section written with nothing under it (or --set latency=null) is null, and it replaced the
            # defaults' whole mapping: the fitted latency model became the roofline without a word.
            self.fail(path, f"expected a mapping with keys {', '.join(names)}, got null (a section with nothing "
                            f"under it); remove it, or give it keys")
        data = self.keys({} if data is None else data, path, names)
        hints = typing.get_type_hints(cls)
        kwargs = {k: self.typed(hints[k], v, path + (k,)) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ValueError as exc:  # the dataclass's own range checks (PolicyParams)
            msg = str(exc)
            bad = msg.split(":", 1)[0].rsplit(".", 1)[-1]
            sub = path + (bad,) if bad in data else path
            self.fail(sub, msg.split(": ", 1)[-1] if bad in data else msg)

    def typed(self, hint: Any, value: Any, path: KeyPath) -> Any:
        """Check ``value`` against a field's annotation; ints are accepted for floats."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.typed(inner[0], value, path)
        if hint is bool:
            if isinstance(value, bool):
                return value
            hint_11 = " (YAML 1.2 reads it as a string, not a boolean)" if (
                isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n")) else ""
            self.fail(path, f"expected true or false, got {_show(value)}{hint_11}")
        if hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            self.fail(path, f"expected an integer, got {_show(value)}")
        if hint is float:
            number = None
            # A string is not a number even when float() would take it ('1_000', ' 2'):
            # the loader reads every YAML 1.2 number, so a quoted one was quoted on purpose.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = value
            if number is None:
                self.fail(path, f"expected a number, got {_show(value)}")
            # No field means anything at nan or infinity; caught here, they
            # would pass every range check below (nan compares false).
            try:
                number = float(number)
            except OverflowError:  # an integer past float range
                number = math.inf
            if not math.isfinite(number):
                self.fail(path, f"expected a finite number, got {_show(value)}")
            return number
        if hint is str:
            if isinstance(value, str):
                return value
            self.fail(path, f"expected a string, got {_show(value)}")
        if origin is dict:
            if isinstance(value, dict):
                return dict(value)
            self.fail(path, f"expected a mapping, got {_show(value)}")
        if origin is tuple:
            if isinstance(value, (list, tuple)):
                return tuple(self.typed(args[0], v, path + (i,)) for i, v in enumerate(value))
            self.fail(path, f"expected a list, got {_show(value)}")
        if dataclasses.is_dataclass(hint):
            return self.build_dataclass(hint, value, path)
        raise TypeError(f"no type check for {hint!r} at {dotted(path)}")  # a bug, not bad input


def _key_kind(key: Any) -> str:
    """A mapping key YAML read as something other than a string, described for a message."""
    if key is None:
        return "a null key (~, null, or nothing before the colon)"
    kinds = {bool: "a boolean", int: "an integer", float: "a number"}
    text = str(key).lower() if isinstance(key, bool) else str(key)  # as written: true, 2020-01-01
    return f"key {text} is {kinds.get(type(key), 'a ' + type(key).__name__)}"


def _show(value: Any) -> str:
    """A YAML value as a message shows it: its kind for a container or null, a boolean as YAML
    writes it (false, not Python's False), else its repr."""
    kind = {dict: "a mapping", list: "a list", type(None): "null"}.get(type(value))
    if isinstance(value, bool):
        return str(value).lower()
    return kind if kind else f"{value!r}"


def _positive(ck: _Checker, path: KeyPath, value: float | None, what: str, strict: bool = True) -> None:
    """Fail unless value > 0 (strict) or >= 0, and an integer is at most `MAX_COUNT`;
    None passes (an optional field)."""
    if value is None:
        return
    if (value <= 0) if strict else (value < 0):
        ck.fail(path, f"expected {what}, got {value!r}")
    if isinstance(value, int) and value > MAX_COUNT:
        ck.fail(path, f"expected at most 2**53 ({MAX_COUNT:,}), got {brief(value)}")


def _seconds(ck: _Checker, path: KeyPath, value: float, what: str, strict: bool = True) -> None:
    """A duration: positive as `_positive`, and at most MAX_SECONDS, past which
    simulated clocks overflow instead of meaning anything."""
    _positive(ck, path, value, what, strict)
    if value > MAX_SECONDS:
        ck.fail(path, f"expected at most {MAX_SECONDS:g} seconds, got {value!r}")


def _model_tensor_parallel(ck: _Checker, e: EngineConfig) -> EngineConfig:
    """The model spec's ``tensor_parallel`` (how it is served: 4 GPUs for 70B, as in the paper)
    where no layer sets ``engine.gpus_per_replica``; the spec field was required and then never
    read, so ``engine.model: llama-3.1-70b`` alone ran on one GPU, or did not fit. An unknown
    model keeps the dataclass default; `_check_engine` refuses it."""
    from sim.hardware import SpecError, load_model

    if ck.layered.rank(("engine", "gpus_per_replica")) >= 0:
        return e
    try:
        return dataclasses.replace(e, gpus_per_replica=load_model(e.model).tensor_parallel)
    except SpecError:
        return e


def _serve_batch_defaults(ck: _Checker, e: EngineConfig) -> EngineConfig:
    """The sequence cap and token budget `vllm serve` gives the engine, where no layer sets them
    (`serve_batch_limits`)."""
    return serve_batch_limits(e, seqs_unset=ck.layered.rank(("engine", "max_num_seqs")) < 0,
                              budget_unset=ck.layered.rank(("engine", "max_num_batched_tokens")) < 0)


def serve_batch_limits(e: EngineConfig, seqs_unset: bool, budget_unset: bool) -> EngineConfig:
    """``e`` with the sequence cap and token budget `vllm serve` would start it with, for those unset.

    vLLM 0.26.0 (`EngineArgs._set_default_max_num_seqs_and_batched_tokens_args`): an H100 gets
    1,024 and 8,192, an A100 256 and 2,048 (`GPUSpec.serve_batch_defaults`), so ``--set
    engine.gpu=h100`` runs what ``vllm serve`` runs there. A default budget without chunked
    prefill is raised to the context (a whole prompt must fit one step) and kept within
    max_num_seqs x the context; a default cap is lowered to a budget smaller than it, as
    ``vllm serve --max-num-batched-tokens 128`` starts with 128 sequences where an experiment
    was refused. An unknown GPU or model keeps the dataclass defaults; `_check_engine` refuses it.
    Experiments and ``sim serve`` without one both start their engines through this.
    """
    from sim.capacity import max_model_len
    from sim.hardware import SpecError, load_gpu, load_model

    if not (seqs_unset or budget_unset):
        return e
    try:
        default_seqs, default_budget = load_gpu(e.gpu).serve_batch_defaults()
        longest = max_model_len(e, load_model(e.model))
    except SpecError:
        return e
    seqs = default_seqs if seqs_unset else e.max_num_seqs
    budget = e.max_num_batched_tokens
    if budget_unset:
        budget = default_budget
        if _is_count(longest) and _is_count(seqs):  # else `_check_engine` refuses the one at fault
            budget = min(seqs * longest, budget if e.enable_chunked_prefill else max(longest, budget))
    if seqs_unset and _is_count(budget):
        seqs = min(seqs, budget)
    return dataclasses.replace(e, max_num_seqs=seqs, max_num_batched_tokens=budget)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_engine(ck: _Checker, e: EngineConfig) -> None:
    from sim.capacity import CapacityError, context_problem, num_kv_blocks
    from sim.hardware import SpecError, available, load_gpu, load_model

    p = ("engine",)
    for key, kind, loader in (("model", "model", load_model), ("gpu", "gpu", load_gpu)):
        value = getattr(e, key)
        if not value.endswith(".json"):
            ck.choice(p + (key,), value, available(kind))
        try:
            loader(value)
        except SpecError as exc:
            ck.fail(p + (key,), str(exc))
    for key in ("gpus_per_replica", "block_size", "max_num_seqs", "max_num_batched_tokens", "replicas"):
        _positive(ck, p + (key,), getattr(e, key), "an integer >= 1")
    if e.block_size % KV_BLOCK_MULTIPLE:
        ck.fail(p + ("block_size",), f"expected a multiple of {KV_BLOCK_MULTIPLE} tokens, as vLLM 0.26.0's attention "
                f"backends for these GPUs (FlashAttention, Triton, FlexAttention) take, got {e.block_size}")
    if e.replicas > MAX_REPLICAS:
        ck.fail(p + ("replicas",), f"expected at most {MAX_REPLICAS:,} replicas, got {e.replicas}")
    _positive(ck, p + ("num_gpu_blocks",), e.num_gpu_blocks, "null or an integer >= 1")
    _positive(ck, p + ("max_model_len",), e.max_model_len, "null or an integer >= 1")
    _positive(ck, p + ("activation_reserve_bytes",), e.activation_reserve_bytes, ">= 0 bytes", strict=False)
    if not 0 < e.gpu_memory_utilization <= 1:
        ck.fail(p + ("gpu_memory_utilization",), f"expected a fraction in (0, 1], got {e.gpu_memory_utilization}")
    ck.choice(p + ("preemption_mode",), e.preemption_mode, PREEMPTION_MODES)
    ck.choice(p + ("balancer",), e.balancer, BALANCERS)
    _seconds(ck, p + ("kv_ttl",), e.kv_ttl, "seconds >= 0 (0 turns pinning off)", strict=False)
    if e.kv_ttl > 0 and not e.enable_prefix_caching:  # blamed on whichever of the two was set last
        ck.fail(ck.layered.latest([p + ("kv_ttl",), p + ("enable_prefix_caching",)]),
                f"engine.kv_ttl={e.kv_ttl!r} needs engine.enable_prefix_caching (pins keep prefix-cache "
                f"blocks); set kv_ttl to 0, or turn prefix caching on")
    if e.max_num_batched_tokens < e.max_num_seqs:
        # vLLM 0.26.0 (config/scheduler.py, verify_max_model_len) refuses this, chunked prefill or not.
        culprit = ck.layered.latest([p + ("max_num_batched_tokens",), p + ("max_num_seqs",)])
        ck.fail(culprit, f"engine.max_num_batched_tokens ({e.max_num_batched_tokens}) must be >= "
                f"engine.max_num_seqs ({e.max_num_seqs}), as vLLM requires")
    model = load_model(e.model)
    _check_unchunked_budget(ck, e, model)
    _check_tensor_parallel(ck, e, model)
    problem = context_problem(e, model)
    if problem:  # blamed on the context's keys alone, before the memory's (`num_kv_blocks` checks it too)
        ck.fail(ck.layered.latest([p + ("max_model_len",), p + ("model",)]), problem)
    memory = ("model", "gpus_per_replica", "gpu_memory_utilization", "activation_reserve_bytes", "gpu")
    try:
        num_kv_blocks(e)
    except CapacityError as exc:
        key = p + (exc.key,)
        if exc.key == "model":  # the memory as a whole is short: blame the term set last
            key = ck.layered.latest([p + (k,) for k in memory])
        elif exc.key == "max_model_len":  # the context, or the memory that cannot hold it
            key = ck.layered.latest([p + (k,) for k in ("max_model_len", "block_size", *memory)])
        ck.fail(key, exc.problem)
    _check_swap_time(ck, e)


def _check_unchunked_budget(ck: _Checker, e: EngineConfig, model) -> None:
    """Without chunked prefill a prompt must fit one step's budget, so vLLM 0.26.0
    (config/scheduler.py, verify_max_model_len) refuses to start with a budget below
    max_model_len. Unchecked, `bfcl-unopt-caps` ran an 8,192-token budget on Llama-3.1's
    131,072-token context, an engine `vllm serve` would not start; the unoptimised baselines now
    cut max_model_len to their budget, as ``vllm serve --max-model-len`` must."""
    from sim.capacity import max_model_len

    longest = max_model_len(e, model)
    if e.enable_chunked_prefill or e.max_num_batched_tokens >= longest:
        return
    p = ("engine",)
    culprit = ck.layered.latest([p + (k,) for k in (
        "max_num_batched_tokens", "max_model_len", "enable_chunked_prefill", "model")])
    given = (f"engine.max_model_len ({longest})" if e.max_model_len is not None
             else f"the context of {model.name} ({longest} tokens, engine.max_model_len unset)")
    ck.fail(culprit, f"engine.max_num_batched_tokens ({e.max_num_batched_tokens}) is smaller than {given} "
            f"with engine.enable_chunked_prefill false, which vLLM refuses to start: a longer prompt could "
            f"never be scheduled; set engine.max_model_len to at most {e.max_num_batched_tokens}, raise "
            f"engine.max_num_batched_tokens, or turn chunked prefill on")


def check_flags(cfg: ExperimentConfig, flags: Mapping[KeyPath, str], name: str | None) -> None:
    """Check an engine and latency model that command-line flags changed after (or without) an
    experiment, as an experiment's are checked, blaming the flag (its label in ``flags``) that set
    the key at fault: `sim serve --max-num-batched-tokens 4` ran, where vLLM and `sim run` refuse it."""
    ck = _Checker(name, Layered({}, dict(flags), {path: 1 for path in flags}))
    _check_engine(ck, cfg.engine)
    _check_latency(ck, cfg.latency, cfg.engine)


def _check_swap_time(ck: _Checker, e: EngineConfig) -> None:
    """A swap run's block transfer time, from the GPU spec's ``pcie_bandwidth``: a units
    slip there ran for 10**8 s or crashed mid-run. Recompute never swaps, so it never reads it."""
    from sim import latency
    from sim.hardware import field_where, load_gpu, load_model

    if e.preemption_mode != "swap":
        return
    problem = latency.swap_time_problem(load_model(e.model), load_gpu(e.gpu), e.gpus_per_replica, e.block_size)
    if problem:  # the spec is at fault, but the key that brought it into this run is what to blame
        key = ck.layered.latest([("engine", k) for k in ("gpu", "preemption_mode", "model", "block_size",
                                                         "gpus_per_replica")])
        ck.fail(key, f"{field_where('gpu', e.gpu, 'pcie_bandwidth')}: field 'pcie_bandwidth': {problem}")


def _check_tensor_parallel(ck: _Checker, e: EngineConfig, model: Any) -> None:
    """vLLM's rules for tensor parallelism: the GPUs of a replica split the
    attention heads evenly (config/model.py, verify_with_parallel_config), and
    the KV heads too, or replicate them when fewer (QKVParallelLinear)."""
    def ok(n: int) -> bool:
        kv = model.num_kv_heads
        return model.num_heads % n == 0 and (n % kv == 0 if n >= kv else kv % n == 0)

    n = e.gpus_per_replica
    if ok(n):
        return
    valid = [d for d in range(1, model.num_heads + 1) if ok(d)]
    culprit = ck.layered.latest([("engine", "gpus_per_replica"), ("engine", "model")])
    ck.fail(culprit, f"engine.gpus_per_replica={n} does not split the {model.num_heads} attention heads and "
            f"{model.num_kv_heads} KV heads of engine.model={e.model} evenly, as vLLM's tensor parallelism "
            f"requires; valid: {', '.join(map(str, valid))}")


# The LatencyConfig fields each kind reads (`sim.latency.build`); the others are reset to
# LATENCY_DEFAULTS in the resolved config, so its file reruns (and shows no name a roofline ignores).
LATENCY_DEFAULTS = {f.name: f.default for f in fields(LatencyConfig)}
LATENCY_KIND_FIELDS = {
    "constant": ("seconds",),
    "roofline": ("flops_efficiency", "bandwidth_efficiency", "step_overhead"),
    "fitted": ("name",),
}


def _check_latency(ck: _Checker, lat: LatencyConfig, e: EngineConfig) -> None:
    from sim import latency
    from sim.hardware import load_gpu, load_model

    p = ("latency",)
    ck.choice(p + ("kind",), lat.kind, latency.KINDS)
    _seconds(ck, p + ("seconds",), lat.seconds, "> 0 seconds")
    for key in ("flops_efficiency", "bandwidth_efficiency"):
        value = getattr(lat, key)
        if not 0 < value <= 1:
            ck.fail(p + (key,), f"expected a fraction in (0, 1], got {value}")
    _seconds(ck, p + ("step_overhead",), lat.step_overhead, ">= 0 seconds", strict=False)
    # A field of another kind, set in the layer that chose this kind or above it, was ignored without a
    # word (--set latency.step_overhead=0.5 under the fitted kind changed nothing). One set below it (the
    # defaults' fitted name under a --set latency.kind=roofline) is the kind being switched away from.
    kind_rank = ck.layered.rank(p + ("kind",))
    for other, keys in LATENCY_KIND_FIELDS.items():
        for key in keys:
            if (other != lat.kind and key not in LATENCY_KIND_FIELDS[lat.kind]
                    and getattr(lat, key) != LATENCY_DEFAULTS[key]  # name: null unsets the fitted name
                    and ck.layered.rank(p + (key,)) >= max(kind_rank, 0)):
                ck.fail(p + (key,), f"the {lat.kind} kind does not use it (the {other} kind does); set "
                                    f"latency.kind={other}, or drop it")
    if lat.kind == "fitted" and not lat.name:
        from sim.latency.fitted import available

        # Point at kind, unless a later layer set name to null (then that is what broke it).
        ck.fail(
            ck.layered.latest([p + ("kind",), p + ("name",)]),
            f"'fitted' needs latency.name: one of {', '.join(available())} or a path to a .json file",
        )
    # Building it now turns a missing fitted model into an error before the run.
    key = p + (("name",) if lat.kind == "fitted" else ("seconds",) if lat.kind == "constant" else ("kind",))
    try:
        model = latency.build(lat, load_model(e.model), load_gpu(e.gpu), e.gpus_per_replica)
    except latency.FittedElsewhere as exc:  # the engine or the name: whichever was set last
        engine = [("engine", k) for k in ("model", "gpu", "gpus_per_replica")]
        ck.fail(ck.layered.latest([key, *engine]), str(exc))
    except (ValueError, OSError, ImportError) as exc:
        ck.fail(key, f"cannot build the latency model: {str(exc).removeprefix(dotted(key) + ': ')}")
    problem = latency.step_time_problem(model, e.max_num_batched_tokens)
    if problem:
        if lat.kind == "roofline":  # its inputs are the specs: point at the GPU (or model) that was set last
            key = ck.layered.latest([("engine", "gpu"), ("engine", "model"), p + ("kind",)])
        ck.fail(key, problem)


def _check_workload(ck: _Checker, raw: Any) -> tuple[str | None, dict[str, Any], str | None]:
    p = ("workload",)
    if raw is None:
        ck.fail(p, "missing; give either generator (with params) or trace")
    ck.keys(raw, p, WORKLOAD_KEYS)
    gen, params, trace = raw.get("generator"), raw.get("params"), raw.get("trace")
    if gen is None and trace is None:
        # A key set to null is what left the workload without a source: blame its line or --set.
        nulled = [k for k in ("trace", "generator") if k in raw]
        key = ck.layered.latest([p + (k,) for k in nulled]) if nulled else p
        ck.fail(key, f"{'got null; ' if nulled else ''}give exactly one of generator (with params) or trace, got neither")
    if gen is not None and trace is not None:
        ck.fail(p, "give exactly one of generator (with params) or trace, got both")
    if trace is not None:
        if not isinstance(trace, str):
            ck.fail(p + ("trace",), f"expected a file path, got {_show(trace)}")
        if params is not None and params != {}:  # `params: false` or `params: 0` was as quietly ignored as a mapping
            ck.fail(p + ("params",), f"params apply to a generator, not to a trace file; got {_show(params)}")
        if os.path.isdir(trace):
            ck.fail(p + ("trace",), f"{trace} is a directory, expected a trace file (JSON Lines)")
        if os.path.exists(trace) and not os.path.isfile(trace):
            ck.fail(p + ("trace",), f"{trace} is not a regular file (a device or a pipe), expected a trace file")
        if not os.path.isfile(trace):
            ck.fail(p + ("trace",), f"no such file: {trace} (relative paths are from the working directory)")
        return None, {}, trace
    try:
        from traces.generators import MAX_PROGRAMS, WORKLOADS, generate
    except ImportError as exc:
        ck.fail(p + ("generator",), f"the workload generators are not available: {exc}")
    ck.choice(p + ("generator",), gen, sorted(WORKLOADS))
    params = {} if params is None else params
    if not isinstance(params, dict):
        ck.fail(p + ("params",), f"expected a mapping, got {_show(params)}")
    pp = p + ("params",)
    for key in params:
        if not isinstance(key, str):  # it read "keywords must be strings", Python's own words
            ck.fail(pp, f"key {_show(key)}: expected a parameter name (a string)")
    if "seed" in params:
        ck.fail(pp + ("seed",), "set the experiment's top-level seed instead")
    for key in ("programs", "rate"):
        if key not in params:
            ck.fail(pp, f"missing {key}")
    programs, rate = params["programs"], params["rate"]
    if not isinstance(programs, int) or isinstance(programs, bool) or programs < 1:
        ck.fail(pp + ("programs",), f"expected an integer >= 1, got {_show(programs)}")
    if programs > MAX_PROGRAMS:
        ck.fail(pp + ("programs",), f"expected at most {MAX_PROGRAMS:,} programs, got {programs}")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
        ck.fail(pp + ("rate",), f"expected a number > 0 (programs per second), got {_show(rate)}")
    # The generator checks the rest (arrival process, cv, its own parameters):
    # asking it for zero programs runs every check and costs nothing.
    try:
        generate(gen, **{**params, "programs": 0}, seed=0)
    except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: a number past what a float holds
        msg = str(exc)
        if msg.startswith("unknown parameter "):  # the generator lists its own; here the arrivals' are params too
            from traces.generators import ARRIVAL_PARAMS

            msg += f", and the arrivals' {', '.join(ARRIVAL_PARAMS)}"
        names = [k for k in params if isinstance(k, str)]
        # Parameters wrong only together (``calls_mean=6 ... calls_max=2``): blame the one set
        # last, a --set over a file line; the first named was blamed, the file for the --set's value.
        # LATS: 'calls_mean' must lie ... for width=3, max_steps=5.
        # The quoted one and those given as key=value are wrong together: a --set of any of them over
        # the file's others is the change that broke them (first named on a tie).
        named = sorted((msg.find(f"'{k}'"), k) for k in names if f"'{k}'" in msg)
        named += sorted((msg.find(f"{k}="), k) for k in names
                        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(k)}=", msg) and f"'{k}'" not in msg)
        # The given parameters the generator says shape the error: blame them even when one alone
        # is (output_tokens_mean=1e9 was blamed on the params line, the message naming it last).
        shaping = [k for k in getattr(exc, "params", ()) if k in params]
        together = shaping or [k for _, k in named]
        if shaping or len(together) > 1:
            ck.fail(ck.layered.latest([pp + (k,) for k in together]), msg)
        key = _named_key(msg, names)
        ck.fail(pp + (key,) if key else pp, msg)
    return gen, dict(params), None


def _named_key(message: str, keys: Sequence[str]) -> str | None:
    """The key an error message is about, to point at its line: quoted, leading, as a word, or
    the first given as ``key=value`` (``calls_mean=1e+300 must lie ... below calls_max=70``)."""
    for test in (lambda k: f"'{k}'" in message, lambda k: message.startswith(f"{k} "), lambda k: f" {k} " in message):
        for key in keys:
            if test(key):
                return key
    shown = [(message.find(f"{key}="), key) for key in keys if re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}=", message)]
    return min(shown)[1] if shown else None


def _build(name: str, layered: Layered) -> ExperimentConfig:
    ck = _Checker(name, layered)
    raw = ck.keys(layered.data, (), EXPERIMENT_KEYS)
    description = ck.typed(str, raw.get("description", ""), ("description",))
    gen, params, trace = _check_workload(ck, raw.get("workload"))
    engine = _serve_batch_defaults(ck, _model_tensor_parallel(
        ck, ck.build_dataclass(EngineConfig, raw.get("engine"), ("engine",))))
    lat = ck.build_dataclass(LatencyConfig, raw.get("latency"), ("latency",))
    policies = ck.typed(tuple[str, ...], raw.get("policies", list(DEFAULT_POLICIES)), ("policies",))
    if not policies:
        ck.fail(("policies",), f"expected at least one of {', '.join(POLICIES)}")
    for i, pol in enumerate(policies):
        ck.choice(("policies", i), pol, POLICIES)
        if pol in policies[:i]:
            ck.fail(("policies", i), f"{pol!r} is listed twice")
    params_obj = ck.build_dataclass(PolicyParams, raw.get("policy_params"), ("policy_params",))
    seed = ck.typed(int, raw.get("seed", 0), ("seed",))
    if seed < 0:
        ck.fail(("seed",), f"expected an integer >= 0, got {seed}")
    # A trace replays the same programs under every seed, so a seed set with it (or over it: a
    # sweep's seed grid) changes nothing and would pass for a replication. One set below the layer
    # that chose the trace (the defaults' seed) belongs to the generators it replaced.
    if (trace is not None and seed != 0
            and ck.layered.rank(("seed",)) >= max(ck.layered.rank(("workload", "trace")), 0)):
        ck.fail(("seed",), f"the trace file {trace} does not depend on the seed (only a generator's draw "
                           f"does); drop it, or use workload.generator")
    if trace is not None:
        seed = 0  # the resolved config.yaml then reruns (its seed would sit beside the trace)
    _check_engine(ck, engine)
    _check_latency(ck, lat, engine)
    lat = dataclasses.replace(lat, **{k: v for k, v in LATENCY_DEFAULTS.items()
                                      if k != "kind" and k not in LATENCY_KIND_FIELDS[lat.kind]})
    return ExperimentConfig(
        name=name,
        description=description,
        workload=WorkloadConfig(generator=gen, params=params, trace=trace,
                                origin=_params_origin(layered, params),
                                param_origins=_param_origins(layered, params)),
        engine=engine,
        latency=lat,
        policies=policies,
        policy_params=params_obj,
        seed=seed,
        fit_origins=_fit_origins(layered, engine, params),
    )


# What sizes one replica's KV cache (`sim.capacity.num_kv_blocks`).
KV_SIZE_KEYS = ("block_size", "model", "gpu", "gpus_per_replica", "gpu_memory_utilization", "activation_reserve_bytes")


def _fit_origins(layered: Layered, engine: EngineConfig, params: Mapping[str, Any]) -> FitOrigins:
    """Where to blame a call too large for the engine, found only once the workload is drawn:
    for each limit, of the keys that set it and the workload's, the one set last. Such an
    error named no place at all for a generated workload.

    The KV cache's keys are an explicit num_gpu_blocks, else those that size the cache; the
    token budget's (which must hold a whole prompt without chunked prefill) are
    max_num_batched_tokens and enable_chunked_prefill; the context's, max_model_len, else
    the model. A limit the message names ("raise engine.num_gpu_blocks") keeps its own line
    over a workload the same file sets (the defaults and the experiment are one file):
    ``defaults: {engine: {num_gpu_blocks: 1}}`` was blamed on the experiment's workload line.
    Only a workload key set above the file (a ``--set``, a sweep's point) outranks it."""
    workload = [("workload", k) for k in ("trace", "generator", "params")] + [("workload", "params", k) for k in params]

    def blame(keys: Sequence[str], named: str | None) -> str | None:
        latest = layered.latest([*(("engine", k) for k in keys), *workload])
        if named is not None and layered.rank(latest) < _FILE_LAYERS and layered.rank(("engine", named)) >= 0:
            latest = ("engine", named)
        return layered.origin(latest)

    explicit_blocks = engine.num_gpu_blocks is not None
    return FitOrigins(
        kv_cache=blame(("num_gpu_blocks",) if explicit_blocks else KV_SIZE_KEYS,
                       "num_gpu_blocks" if explicit_blocks else None),
        token_budget=blame(("max_num_batched_tokens", "enable_chunked_prefill"), "max_num_batched_tokens"),
        context_length=blame(("max_model_len",) if engine.max_model_len is not None else ("model",),
                             "max_model_len" if engine.max_model_len is not None else None),
    )


_FILE_LAYERS = 2  # the defaults (rank 0) and the experiment (rank 1); overrides rank above (`resolve_layers`)


def _params_origin(layered: Layered, params: Mapping[str, Any]) -> str | None:
    """Where to blame a bad draw: a later layer's parameter (a ``--set``) over the
    file's ``params:`` line, since the draw was fine before that layer."""
    here: KeyPath = ("workload", "params")
    keys = [here + (k,) for k in params]
    latest = layered.latest(keys) if keys else here
    return layered.origin(latest if layered.rank(latest) > layered.rank(here) else here)


def _param_origins(layered: Layered, params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """`_params_origin` for each parameter alone, latest-set first (file order on a tie)."""
    here: KeyPath = ("workload", "params")
    ranked = sorted(params, key=lambda k: -layered.rank(here + (k,)))  # stable: file order on a tie
    out = []
    for key in ranked:
        path = here + (key,)
        where = layered.origin(path if layered.rank(path) > layered.rank(here) else here)
        if where is not None:
            out.append((key, where))
    return tuple(out)


def _origins_from_file(ef: ExperimentsFile, prefix: KeyPath) -> dict[KeyPath, str]:
    n = len(prefix)
    # The experiment's own line too (path ()): what it lacks altogether is blamed there.
    return {p[n:]: f"{ef.path}:{line}" for p, line in ef.lines.items() if p[:n] == prefix}


def resolve(
    name: str,
    file: str | Path | ExperimentsFile | None = None,
    overrides: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
) -> ExperimentConfig:
    """The validated configuration of experiment ``name`` with ``--set`` overrides applied.

    ``labels`` names where an override came from when not the command line
    (a sweep's ``set:`` in the file), so an error points there.
    """
    return resolve_layers(name, file, [overrides], labels)


def resolve_layers(
    name: str,
    file: str | Path | ExperimentsFile | None,
    layers: Sequence[Sequence[str]],
    labels: Mapping[str, str] | None = None,
) -> ExperimentConfig:
    """`resolve` with the overrides in several layers, lowest first.

    A sweep's ``--set`` lies below its grid, so a point that names
    ``workload.trace`` drops the ``workload.params`` a ``--set`` gave the
    generator points, as a ``--set`` trace drops the file's.
    """
    ef = file if isinstance(file, ExperimentsFile) else load_file(file)
    if name not in ef.experiments:
        hint = f" ({name!r} is a sweep of this file, which python -m sim sweep runs)" if name in ef.sweeps else ""
        raise ConfigError(f"{ef.path}: unknown experiment {name!r}{hint}; experiments: {', '.join(ef.names())}")
    layered = merge_layers(
        [
            (ef.defaults, _origins_from_file(ef, ("defaults",))),
            (ef.experiments[name], _origins_from_file(ef, ("experiments", name))),
            *(override_layer(layer, labels or {}) for layer in layers),
        ]
    )
    return _build(name, layered)


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The fully resolved experiment, in the file format (an ``experiments:`` entry body).

    Every field is present, so the result does not depend on later changes
    to the dataclass defaults; `to_file_dict` wraps it into a file that
    `resolve` reads back to an equal config.
    """
    w = cfg.workload
    workload = {"trace": w.trace} if w.trace is not None else {"generator": w.generator, "params": dict(sorted(w.params.items()))}
    return {
        "description": cfg.description,
        "workload": workload,
        "engine": _fields_dict(cfg.engine),
        "latency": _fields_dict(cfg.latency),
        "policies": list(cfg.policies),
        "policy_params": _fields_dict(cfg.policy_params),
        "seed": cfg.seed,
    }


def _fields_dict(obj: Any) -> dict[str, Any]:
    """Fields in order, a float field always as a float (a default of ``1`` would
    otherwise be written as ``1`` and read back as ``1.0``, changing config.yaml)."""
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        floaty = hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint))
        out[f.name] = float(value) if floaty and isinstance(value, int) and not isinstance(value, bool) else value
    return out


def to_file_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The experiment as a file that reruns from any directory: the paths in it (a trace, a spec or
    fitted model given as a .json file), relative to the working directory when given, made absolute.
    config.yaml kept them as typed, so `--experiments results/NAME/config.yaml` failed elsewhere."""
    data = to_dict(cfg)
    if cfg.workload.trace is not None:
        data["workload"]["trace"] = os.path.abspath(cfg.workload.trace)
    for section, key in (("engine", "model"), ("engine", "gpu"), ("latency", "name")):
        value = data[section][key]  # a path as `load_model`/`load_gpu` and `load_fitted` tell one from a name
        if isinstance(value, str) and (value.endswith(".json") or (key == "name" and len(Path(value).parts) > 1)):
            data[section][key] = os.path.abspath(value)
    return {"experiments": {cfg.name: data}}
