"""Sweeps: a grid of experiment variations, expanded into jobs before anything runs.

The paper's results are curves (latency against arrival rate, throughput
against replicas), not single runs, so a sweep names a base experiment from
the same file and the values to vary. Each point of the grid becomes a list
of ``--set`` overrides passed to `sim.experiments.resolve`, so a sweep point
is validated exactly like ``python -m sim run NAME --set ...`` and can be
rerun alone that way.

Format (under a top-level ``sweeps:`` in the experiments file)::

    sweeps:
      NAME:
        description: one line
        experiment: BASE                  # an experiment of the same file
        set: {engine.replicas: 4}         # optional: fixed overrides for every point
        grid:                             # dotted key -> values; cartesian product
          workload.generator: [bfcl, lats]
          workload.params.rate: {start: 4, stop: 18, num: 8}     # linear, stop included
          engine.replicas: {start: 1, stop: 8, step: 1}          # stepped, stop included
        # or a list of such mappings ("cases"), concatenated in order: one
        # rate range per workload.
        policies: [fcfs, plas]            # optional: default the experiment's
        variants:                         # optional: engine variants as policy labels
          default: {}                     # rows labelled with the bare policy
          unopt:                          # rows labelled POLICY-unopt
            policies: [fcfs]
            set: {engine.enable_prefix_caching: false}

A range may carry ``times: KEY`` (another grid key with numbers): each value
is multiplied by that key's value at the point, so a rate range can scale
with ``engine.replicas``. Rows are ordered by grid order (first key slowest),
then variant, then policy; that order is the row order of ``sweep.csv``.

Layers, lowest first: the experiment's file entry, the sweep's ``set``, the
command line's ``--set``, the grid point, the variant's ``set``. Keys are
checked before anything runs (unknown keys name the file line and the valid
keys); a point whose values make an invalid experiment (e.g. a model that
does not fit its GPUs) becomes a failed row instead, so the rest still runs,
unless a whole variant or grid case is invalid (`_check_some_job_valid`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, Sequence

from sim.config import DEFAULT_POLICIES, POLICIES, EngineConfig, ExperimentConfig, LatencyConfig
from sim.core.params import PolicyParams
from sim.config_layers import has_path, parse_override
from sim.experiments import (
    EXPERIMENT_KEYS,
    WORKLOAD_KEYS,
    ConfigError,
    ExperimentsFile,
    load_file,
    resolve,
    resolve_layers,
)
from sim.yaml_io import dotted

SWEEP_KEYS = ("description", "experiment", "set", "grid", "policies", "variants")
VARIANT_KEYS = ("policies", "set")
RANGE_KEYS = ("start", "stop", "num", "step", "times")
DEFAULT_VARIANT = "default"
# Keys a grid may not vary: policies are per job (the sweep's `policies`), a
# description is not a parameter.
NOT_SWEPT = ("description", "policies")


@dataclass(frozen=True)
class Variant:
    name: str
    policies: tuple[str, ...]
    overrides: tuple[str, ...]

    def label(self, policy: str) -> str:
        return policy if self.name == DEFAULT_VARIANT else f"{policy}-{self.name}"


@dataclass(frozen=True)
class Point:
    """One grid point: its position and the value of each swept key."""

    index: int
    params: tuple[tuple[str, Any], ...]
    # Where each value is in the experiments file (``FILE:LINE: sweep 'NAME': grid.KEY``), so that a
    # point the experiment refuses is blamed on its grid entry, not on a --set never given.
    origins: tuple[str, ...] = field(default=(), compare=False)
    case: int = field(default=0, compare=False)  # the grid case (``grid[i]``) that gave it

    def overrides(self) -> list[str]:
        return [override_text(k, v) for k, v in self.params]

    def labels(self) -> dict[str, str]:
        """Each override's place in the file (`sim.experiments.resolve`'s ``labels``)."""
        return dict(zip(self.overrides(), self.origins))

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params)


@dataclass(frozen=True)
class Job:
    """One simulation: a point under one variant and policy (``cfg`` None when the point is invalid)."""

    index: int
    point: Point
    variant: str
    policy: str
    label: str
    cfg: ExperimentConfig | None
    error: str | None = None


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    experiment: str
    keys: tuple[str, ...]  # swept keys, in first-appearance order
    points: tuple[Point, ...]
    variants: tuple[Variant, ...]
    base: ExperimentConfig  # the experiment with the sweep's and the command line's set

    def labels(self) -> list[str]:
        return [v.label(p) for v in self.variants for p in v.policies]


# --- values -------------------------------------------------------------------------


def override_text(key: str, value: Any) -> str:
    """``key=value`` that `sim.config_layers.parse_override` reads back to ``value``.

    JSON is YAML, except that YAML 1.1 reads ``1e-05`` (no dot) as a string,
    so a float's mantissa always gets a dot.
    """
    if isinstance(value, float):
        if not math.isfinite(value):  # repr's "nan" and "inf" read back as strings: the error then said 'nan'
            return f"{key}={'.nan' if value != value else ('.inf' if value > 0 else '-.inf')}"
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exp = text.split("e")
            text = f"{mantissa}.0e{exp}"
        return f"{key}={text}"
    return f"{key}={_ASTRAL.sub(_astral_escape, json.dumps(value))}"


# JSON writes a character past U+FFFF as a surrogate pair of \u escapes, which
# YAML reads as two lone surrogates; YAML's own escape for it is \U. Each
# escape is matched whole, left to right, so an escaped backslash ("\\")
# before a "u" is never taken for the start of one.
_ASTRAL = re.compile(r"\\(?:u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|.)")


def _astral_escape(m: re.Match) -> str:
    if m.group(1) is None:
        return m.group(0)
    code = 0x10000 + ((int(m.group(1), 16) - 0xD800) << 10) + (int(m.group(2), 16) - 0xDC00)
    return f"\\U{code:08x}"


def _typed(x: int | float) -> Fraction:
    """A number as its author typed it: 0.1 is one tenth, not the float nearest it.

    Range values and ``times`` products are computed exactly from these and
    only then made floats, so they read as typed (0.3, not the
    0.30000000000000004 of float arithmetic) with nothing rounded away: the
    float noise was first cut by rounding to 15 significant digits, which
    also cut a 16- or 17-digit value its author typed.
    """
    return Fraction(repr(x)) if isinstance(x, float) else Fraction(x)


def _value(x: Fraction, integral: bool) -> int | float:
    """The exact value as an int (a range of integers) or the float nearest it."""
    return int(x) if integral and x.denominator == 1 else float(x)


# --- the schema of dotted keys ----------------------------------------------------------


def _fields_of(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


SECTIONS: dict[str, tuple[str, ...]] = {
    "engine": _fields_of(EngineConfig),
    "latency": _fields_of(LatencyConfig),
    "policy_params": _fields_of(PolicyParams),
    "workload": WORKLOAD_KEYS,
}


def check_key(key: str) -> str | None:
    """Why ``key`` cannot be swept, or None. ``workload.params.*`` is the generator's to check."""
    parts = key.split(".")
    if not all(parts):
        return "expected a dotted key such as workload.params.rate"
    # parse_override strips each part, so 'workload.params.rate ' set rate while the sweep
    # kept 'rate ' as a key of its own: its rows showed a value under a name that never ran.
    if any(p != p.strip() for p in parts):
        return f"{key!r}: a key part has space around it; write {'.'.join(p.strip() for p in parts)}"
    top = parts[0]
    if top in NOT_SWEPT:
        return "not a sweep parameter (set the sweep's policies, or a variant's, instead)" if top == "policies" else "not a sweep parameter"
    if top not in EXPERIMENT_KEYS:
        return f"unknown key; valid keys: {', '.join(k for k in EXPERIMENT_KEYS if k not in NOT_SWEPT)}"
    if top == "seed":
        return None if len(parts) == 1 else "seed has no sub-keys"
    valid = SECTIONS[top]
    if len(parts) == 1:
        return f"give a key inside {top}: one of {', '.join(valid)}"
    if parts[1] not in valid:
        return f"unknown key {parts[1]!r} in {top}; valid keys: {', '.join(valid)}"
    if top == "workload" and parts[1] == "params":
        return None if len(parts) == 3 else "expected workload.params.NAME"
    if len(parts) > 2:
        return f"{top}.{parts[1]} has no sub-keys"
    return None


# --- parsing ----------------------------------------------------------------------------


@dataclass
class _Where:
    """Located errors for one sweep: file line of the nearest key, sweep name, dotted key."""

    ef: ExperimentsFile
    name: str

    def located(self, path: tuple[Any, ...]) -> str:
        """``FILE:LINE: sweep 'NAME'`` and the dotted key, if any."""
        full = ("sweeps", self.name) + path
        line = next((self.ef.lines[full[:n]] for n in range(len(full), 0, -1) if full[:n] in self.ef.lines), 1)
        key = f": {dotted(path)}" if path else ""
        return f"{self.ef.path}:{line}: sweep {self.name!r}{key}"

    def fail(self, path: tuple[Any, ...], problem: str) -> typing.NoReturn:
        raise ConfigError(f"{self.located(path)}: {problem}")


def _mapping(where: _Where, value: Any, path: tuple[Any, ...], valid: Sequence[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        where.fail(path, "expected a mapping")
    for key in value:
        if not isinstance(key, str):
            where.fail(path, f"key {key!r}: expected a string")
        if valid is not None and key not in valid:
            where.fail(path + (key,), f"unknown key; valid keys: {', '.join(valid)}")
    return value


def _set_overrides(
    where: _Where, raw: Any, path: tuple[Any, ...], labels: dict[str, str] | None = None
) -> tuple[str, ...]:
    """A ``set:`` mapping as override texts; ``labels`` gets each text's place in the file."""
    if raw is None:
        return ()
    out = []
    for key, value in _mapping(where, raw, path).items():
        problem = check_key(key)
        if problem:
            where.fail(path + (key,), problem)
        _plain(where, value, path + (key,))
        text = override_text(key, value)
        out.append(text)
        if labels is not None:
            labels[text] = where.located(path + (key,))
    return tuple(out)


def _policies(where: _Where, raw: Any, path: tuple[Any, ...]) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        where.fail(path, f"expected a non-empty list from {', '.join(POLICIES)}")
    for i, pol in enumerate(raw):
        if pol not in POLICIES:
            where.fail(path + (i,), f"unknown value {pol!r}; valid choices: {', '.join(POLICIES)}")
        if pol in raw[:i]:
            where.fail(path + (i,), f"{pol!r} is listed twice")
    return tuple(raw)


def _number(where: _Where, value: Any, path: tuple[Any, ...]) -> float:
    """A finite number; an integer of any size (integer ranges are exact, a seed may be long)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        where.fail(path, f"expected a number, got {value!r}")
    return value


# The most points a sweep may have, in one range or the whole grid. Each point
# is a full simulation per policy, so past this a sweep is surely a mistake
# (a missing decimal point), and expanding it would hang before anything runs.
MAX_POINTS = 10_000


def _at_most_max_points(where: _Where, path: tuple[Any, ...], count: int, counted: str) -> None:
    if count > MAX_POINTS:
        where.fail(path, f"{counted}; at most {MAX_POINTS:,} (a sweep of that many points is surely a mistake)")


def expand_range(where: _Where, spec: dict[str, Any], path: tuple[Any, ...]) -> list[int | float]:
    """``{start, stop, num}`` (numpy.linspace) or ``{start, stop, step}``, stop included."""
    _mapping(where, spec, path, RANGE_KEYS)
    for key in ("start", "stop"):
        if key not in spec:
            where.fail(path, f"a range needs start and stop (and num or step); missing {key}")
    if ("num" in spec) == ("step" in spec):
        given = "both" if "num" in spec else "neither"
        where.fail(path, f"a range needs exactly one of num (how many values) or step, got {given}")
    start, stop = _number(where, spec["start"], path + ("start",)), _number(where, spec["stop"], path + ("stop",))
    try:
        return _expand(where, spec, path, start, stop)
    except OverflowError:  # a float and an integer past what a float holds, or a count past one
        where.fail(path, "the range's values or its count are past what a float holds; use integers for start, "
                         "stop and step, or a coarser step")


def _expand(where: _Where, spec: dict[str, Any], path: tuple[Any, ...], start: int | float,
            stop: int | float) -> list[int | float]:
    if "num" in spec:
        num = spec["num"]
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            where.fail(path + ("num",), f"expected an integer >= 1, got {num!r}")
        _at_most_max_points(where, path + ("num",), num, f"{num} values")
        if num == 1 and start != stop:
            where.fail(path + ("num",), f"1 value needs start == stop, got start {start} and stop {stop}")
        if num == 1:
            return [start]  # as typed (start == stop), 5 not 5.0 for a stop of 5.0
        integral = isinstance(start, int) and isinstance(stop, int)  # exact: a float would round a 16-digit seed
        first, last = _typed(start), _typed(stop)
        return [_value(first + (last - first) * Fraction(i, max(num - 1, 1)), integral) for i in range(num)]
    step = _number(where, spec["step"], path + ("step",))
    if step <= 0:
        where.fail(path + ("step",), f"expected a number > 0, got {step!r}")
    if stop < start:
        where.fail(path, f"stop ({stop}) is below start ({start}); a range counts up")
    integral = all(isinstance(x, int) for x in (start, stop, step))
    first, exact_step = _typed(start), _typed(step)
    count = math.floor((_typed(stop) - first) / exact_step) + 1  # exact: 0.1 to 0.3 by 0.1 is 3 values
    _at_most_max_points(where, path + ("step",), count, f"{count} values" if count < 10**40 else "too many values")
    return [_value(first + i * exact_step, integral) for i in range(count)]


def _plain(where: _Where, value: Any, path: tuple[Any, ...]) -> None:
    """Refuse what a point's ``--set`` text cannot carry: YAML dates, binary, sets (tags JSON has no form for)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _plain(where, item, path + (i,))
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for k, item in value.items():
            _plain(where, item, path + (k,))
        return
    where.fail(path, f"expected a number, string, boolean, list or mapping, got a YAML {type(value).__name__} "
                     f"({value!r:.60}); quote it to pass it as a string")


def _axis(where: _Where, key: str, raw: Any, path: tuple[Any, ...]) -> tuple[list[Any], str | None]:
    """The values of one grid key, and the key it is multiplied by (``times``), if any."""
    problem = check_key(key)
    if problem:
        where.fail(path, problem)
    if isinstance(raw, list):
        if not raw:
            where.fail(path, "expected at least one value")
        for i, value in enumerate(raw):
            _plain(where, value, path + (i,))
        return list(raw), None
    if isinstance(raw, dict):
        times = raw.get("times")
        if times is not None and not isinstance(times, str):
            where.fail(path + ("times",), f"expected a grid key, got {times!r}")
        return expand_range(where, raw, path), times
    where.fail(path, f"expected a list of values or a range {{start, stop, num|step}}, got {raw!r}")


def _case(where: _Where, raw: Any, path: tuple[Any, ...]) -> list[dict[str, Any]]:
    """One cartesian product: a list of points (key -> value), first key slowest."""
    axes = _mapping(where, raw, path)
    if not axes:
        where.fail(path, "expected at least one key to vary")
    values, scale = {}, {}
    for key, spec in axes.items():
        values[key], times = _axis(where, key, spec, path + (key,))
        if times is not None:
            scale[key] = times
    for key, times in scale.items():
        if times not in values or times == key:
            others = [k for k in values if k != key]
            valid = f"valid: {', '.join(others)}" if others else f"this grid varies no other key; add {times} to it or drop times"
            where.fail(path + (key, "times"), f"{times!r} is not another key of this grid; {valid}")
        if times in scale:  # a chain's product depended on the keys' order in the file
            where.fail(path + (key, "times"), f"{times!r} is itself multiplied (times: {scale[times]}); "
                                              f"multiply by a key with plain values")
        for v in values[times]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                where.fail(path + (times,), f"{key} is multiplied by it, so its values must be numbers, got {v!r}")
    count = math.prod(len(v) for v in values.values())
    _at_most_max_points(where, path, count, f"{count:,} points")
    points = []
    for combo in itertools.product(*values.values()):
        point = dict(zip(values, combo))
        for key, times in scale.items():
            point[key] = _value(_typed(point[key]) * _typed(point[times]),
                                isinstance(point[key], int) and isinstance(point[times], int))
        points.append(point)
    return points


def _variants(where: _Where, raw: Any, policies: tuple[str, ...]) -> tuple[Variant, ...]:
    if raw is None:
        return (Variant(DEFAULT_VARIANT, policies, ()),)
    out = []
    for name, body in _mapping(where, raw, ("variants",)).items():
        path = ("variants", name)
        if not name.replace("_", "").isalnum():
            where.fail(path, "a variant name is a word (letters, digits, '_'): it suffixes policy labels")
        body = _mapping(where, {} if body is None else body, path, VARIANT_KEYS)
        pols = _policies(where, body["policies"], path + ("policies",)) if "policies" in body else policies
        out.append(Variant(name, pols, _set_overrides(where, body.get("set"), path + ("set",))))
    if not out:
        where.fail(("variants",), "expected at least one variant")
    return tuple(out)


def load_sweep(name: str, file: Any = None, overrides: Sequence[str] = ()) -> Sweep:
    """Parse and expand sweep ``name``; raises ConfigError, located, on a malformed sweep."""
    ef = file if isinstance(file, ExperimentsFile) else load_file(file)
    if name not in ef.sweeps:
        known = ", ".join(ef.sweeps) or "none in this file"
        hint = f" ({name!r} is an experiment of this file, which python -m sim run runs)" if name in ef.experiments else ""
        raise ConfigError(f"{ef.path}: unknown sweep {name!r}{hint}; sweeps: {known}")
    where = _Where(ef, name)
    body = _mapping(where, ef.sweeps[name], (), SWEEP_KEYS)
    base_name = body.get("experiment")
    if not isinstance(base_name, str):
        where.fail(("experiment",) if "experiment" in body else (), "name the base experiment (experiment: NAME)")
    if base_name not in ef.experiments:
        where.fail(("experiment",), f"unknown experiment {base_name!r}; experiments: {', '.join(ef.names())}")
    labels: dict[str, str] = {}
    fixed = _set_overrides(where, body.get("set"), ("set",), labels)
    # --set and set: mistakes fail here, before any point; a text also on the command line is blamed there.
    # A base that only its grid makes valid (a 70B model whose grid gives it the GPUs) waits for the points.
    try:
        base, base_error = resolve(base_name, ef, [*fixed, *overrides], _file_labels(labels, overrides)), None
    except ConfigError as exc:
        base, base_error = None, exc
    if base is None and _experiment_policies(ef, base_name) is None:
        raise base_error  # its own list is bad: no point's policies may hide that
    if "policies" in body:
        policies = _policies(where, body["policies"], ("policies",))
    else:
        policies = base.policies if base is not None else _experiment_policies(ef, base_name)
    grid = body.get("grid")
    if grid is None:
        where.fail((), "missing grid: the keys to vary and their values")
    cases = grid if isinstance(grid, list) else [grid]
    if not cases:
        where.fail(("grid",), "expected at least one case (a mapping of keys to vary)")
    raw_points: list[dict[str, Any]] = []
    origins: list[tuple[str, ...]] = []
    case_of: list[int] = []
    seen: dict[tuple[str, ...], tuple[Any, ...]] = {}  # a point's overrides -> the case that first gave it
    for i, case in enumerate(cases):
        path = ("grid", i) if isinstance(grid, list) else ("grid",)
        points = _case(where, case, path)
        raw_points += points
        origins += [tuple(where.located(path + (key,)) for key in point) for point in points]
        case_of += [i] * len(points)
        _at_most_max_points(where, ("grid",), len(raw_points), f"{len(raw_points):,} points")
        for point in points:
            _once(where, seen, point, path)
    keys = tuple(dict.fromkeys(k for p in raw_points for k in p))
    variants = _variants(where, body.get("variants"), policies)
    _check_overrides_take_effect(name, overrides, raw_points, variants)
    _check_layers_take_effect(where, fixed, raw_points, variants)
    points = tuple(Point(i, tuple(p.items()), o, c) for i, (p, o, c) in enumerate(zip(raw_points, origins, case_of)))
    if base is None:
        base = _first_valid_point(ef, base_name, [*fixed, *overrides], points, variants)
        if base is None:  # no point makes it valid: a mistake of the base, set: or --set, refused as one
            raise base_error
    description = body.get("description")
    description = "" if description is None else description  # "description:" left empty
    if not isinstance(description, str):  # a list was kept as its Python repr, "['a']"
        where.fail(("description",), f"expected a string, got {description!r}")
    return Sweep(
        name=name,
        description=description,
        experiment=base_name,
        keys=keys,
        points=points,
        variants=variants,
        base=base,
    )


def _experiment_policies(ef: ExperimentsFile, name: str) -> tuple[str, ...] | None:
    """The policies the base experiment runs, read without resolving it (the sweep's points may be what
    makes it valid); None for a bad list, which the caller refuses with the experiment's own error
    (the points' ``policies=`` override would replace it and run other policies)."""
    body = ef.experiments[name]
    raw = body["policies"] if "policies" in body else ef.defaults.get("policies", list(DEFAULT_POLICIES))
    ok = isinstance(raw, list) and raw and len(set(raw)) == len(raw) and all(
        isinstance(p, str) and p in POLICIES for p in raw)
    return tuple(raw) if ok else None


def _first_valid_point(ef: ExperimentsFile, experiment: str, lower: list[str], points: Sequence[Point],
                       variants: Sequence[Variant]) -> ExperimentConfig | None:
    """The configuration of the first job that resolves: what an invalid point's row shows for the
    keys it leaves alone, when the base alone is not a valid experiment."""
    for point in points:
        for variant in variants:
            layers = [lower, point.overrides(), [*variant.overrides, override_text("policies", list(variant.policies))]]
            try:
                return resolve_layers(experiment, ef, layers)
            except ConfigError:
                continue
    return None


def _check_overrides_take_effect(name: str, overrides: Sequence[str], points: Sequence[dict[str, Any]],
                                 variants: Sequence[Variant]) -> None:
    """Refuse a ``--set`` the sweep would replace at every point: it was dropped without a word.

    The grid lies above ``--set`` (a trace point drops a generator's
    ``workload.params``, as a trace given later always does), a variant's
    ``set:`` above the grid, and a sweep runs the policies its own
    ``policies:`` (or its variants') name. A key some points leave alone is
    taken there, so it is not refused.
    """
    for text in overrides:
        path, value = parse_override(text)
        if path == ("policies",):
            raise ConfigError(f"--set {text}: a sweep runs the policies that its policies: (and its variants') "
                              f"name, so this would be ignored; edit sweep {name!r}, or run its experiment")
        by_point = [next((k for k, v in point.items() if _replaces(tuple(k.split(".")), v, path, value)), None)
                    for point in points]
        if points and all(by_point):
            raise ConfigError(f"--set {text}: sweep {name!r} sets {by_point[0]} at every point of its grid, which "
                              f"replaces this value; drop it from --set, or change the grid")
        by_variant = [next((t for t in v.overrides if _replaces(*parse_override(t), path, value)), None)
                      for v in variants]
        if variants and all(by_variant):
            raise ConfigError(f"--set {text}: every variant of sweep {name!r} sets it ({by_variant[0]}), which "
                              f"replaces this value; drop it from --set, or change the variants")


def _check_layers_take_effect(where: _Where, fixed: Sequence[str], points: Sequence[dict[str, Any]],
                              variants: Sequence[Variant]) -> None:
    """Refuse the sweep's own layers that cover each other, located in the file.

    A variant's ``set:`` lies above the grid: a swept key it also sets ran
    at the variant's value while sweep.csv showed the grid's, a rate curve
    drawn from rates that never ran. And a ``set:`` key the grid sets at
    every point was dropped, as a ``--set`` would be
    (`_check_overrides_take_effect`).
    """
    for v in variants:
        for text in v.overrides:
            upper, value = parse_override(text)
            for point in points:
                swept = next((k for k, pv in point.items() if _replaces(upper, value, tuple(k.split(".")), pv)), None)
                if swept is not None:
                    where.fail(("variants", v.name, "set", ".".join(upper)),
                               f"replaces the grid's {swept} (the rows would show the grid's value, not the one "
                               f"that ran); vary it in the grid, or drop it from this variant")
    for text in fixed:
        lower, value = parse_override(text)
        by_point = [next((k for k, pv in point.items() if _replaces(tuple(k.split(".")), pv, lower, value)), None)
                    for point in points]
        if points and all(by_point):
            where.fail(("set", ".".join(lower)), f"the grid sets {by_point[0]} at every point, which replaces "
                                                 f"this value; drop it from set:, or change the grid")
        by_variant = [next((t for t in v.overrides if _replaces(*parse_override(t), lower, value)), None)
                      for v in variants]
        if variants and all(by_variant):
            where.fail(("set", ".".join(lower)), f"every variant sets it ({by_variant[0]}), which replaces this "
                                                 f"value; drop it from set:, or change the variants")


def _replaces(upper: tuple[str, ...], upper_value: Any, lower: tuple[str, ...], lower_value: Any) -> bool:
    """Whether a layer setting ``upper`` to ``upper_value`` replaces a lower one's ``lower``."""
    if upper == lower:
        return True
    if upper[: len(lower)] == lower:  # the lower sets a mapping: replaced if it holds the upper's key
        return has_path(lower_value, upper[len(lower):])
    if lower[: len(upper)] == upper:  # the upper sets a mapping over the lower's key
        return has_path(upper_value, lower[len(upper):])
    # A trace drops a generator and its params, a generator drops a trace (sim.config_layers.prune_workload).
    source = {("workload", "trace"): ("generator", "params"), ("workload", "generator"): ("trace",)}.get(upper)
    return bool(source) and len(lower) >= 2 and lower[0] == "workload" and lower[1] in source


def _once(where: _Where, seen: dict[tuple[str, ...], tuple[Any, ...]], point: dict[str, Any], path: tuple[Any, ...]) -> None:
    """Refuse a point the grid already has: it would run again and add a
    duplicate row to sweep.csv. Key order does not make another experiment."""
    ident = tuple(sorted((k, _same_value(v)) for k, v in point.items()))
    if ident in seen:
        first = dotted(seen[ident])
        described = ", ".join(f"{k}={v}" for k, v in point.items())
        here = "this case gives it twice" if seen[ident] == path else f"{first} gives it too"
        where.fail(path, f"the point {described} is in the grid twice ({here}); each point runs once, remove one")
    seen[ident] = path


def _same_value(value: Any) -> str:
    """A value's identity for `_once`: numbers by value (a range's 2 is a list's 2.0)."""
    def canon(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: canon(x) for k, x in v.items()}
        if isinstance(v, list):
            return [canon(x) for x in v]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2 ** 53:
            return float(v)  # beyond 2**53 a float would merge distinct integers
        return v
    return json.dumps(canon(value), sort_keys=True)


def jobs(sweep: Sweep, file: Any = None, overrides: Sequence[str] = ()) -> list[Job]:
    """Every (point, variant, policy) in row order, each with its resolved config or its error.

    ``overrides`` are the command line's ``--set`` (already in ``sweep.base``).
    """
    ef = file if isinstance(file, ExperimentsFile) else load_file(file)
    fixed, labels, by_variant = _fixed(ef, sweep.name)
    labels = _file_labels(labels, overrides)
    out: list[Job] = []
    for point in sweep.points:
        for variant in sweep.variants:
            # The grid lies above the sweep's set: and --set, and a variant above the grid.
            layers = [
                [*fixed, *overrides],
                point.overrides(),
                [*variant.overrides, override_text("policies", list(variant.policies))],
            ]
            # A text given by several layers is blamed on the last, the one that takes effect.
            where = {**labels, **point.labels(), **by_variant.get(variant.name, {})}
            try:
                cfg, error = resolve_layers(sweep.experiment, ef, layers, where), None
            except ConfigError as exc:
                cfg, error = None, str(exc)
            for policy in variant.policies:
                out.append(Job(len(out), point, variant.name, policy, variant.label(policy), cfg, error))
    _check_some_job_valid(sweep, out)
    return out


def _check_some_job_valid(sweep: Sweep, todo: Sequence[Job]) -> None:
    """Refuse a sweep none of whose jobs resolves, before anything runs or is written: it made its
    output directory, started the pool and wrote a table of ``invalid`` rows. A sweep with some
    valid points runs them, its invalid points as rows (a grid may cross a model's limit).

    Likewise a variant invalid at every point, or a grid case (one mapping of a ``grid:`` list)
    invalid at each of its points under every variant: a slip there (``workload.params.rat``,
    ``engine.max_num_seqs: x`` in a variant's ``set``) ran the rest of the sweep for minutes and
    then reported a column or a block of ``invalid`` rows."""
    if not todo or any(job.error is None for job in todo):
        if todo:
            _check_each_part_valid(sweep, todo)
        return
    first = todo[0]
    raise ConfigError(f"sweep {sweep.name!r}: no point of the grid is valid, so nothing would run; "
                      f"point {first.point.index} ({first.point.describe()}), the first: {first.error}")


def _check_each_part_valid(sweep: Sweep, todo: Sequence[Job]) -> None:
    if len(sweep.variants) > 1:
        for variant in sweep.variants:
            own = [job for job in todo if job.variant == variant.name]
            if all(job.error is not None for job in own):
                first = own[0]
                raise ConfigError(f"sweep {sweep.name!r}: variant {variant.name!r} is invalid at every point of the "
                                  f"grid, so all its rows would be 'invalid'; point {first.point.index} "
                                  f"({first.point.describe()}), the first: {first.error}")
    cases = sorted({job.point.case for job in todo})
    if len(cases) > 1:
        for case in cases:
            own = [job for job in todo if job.point.case == case]
            if all(job.error is not None for job in own):
                first = own[0]
                raise ConfigError(f"sweep {sweep.name!r}: grid case {case} (grid[{case}]) is invalid at each of its "
                                  f"points, so all its rows would be 'invalid'; point {first.point.index} "
                                  f"({first.point.describe()}), the first: {first.error}")


def _fixed(ef: ExperimentsFile, name: str) -> tuple[tuple[str, ...], dict[str, str], dict[str, dict[str, str]]]:
    """The sweep's own ``set:`` overrides, where each is in the file, and where each variant's are."""
    where, body, labels = _Where(ef, name), ef.sweeps[name], {}
    fixed = _set_overrides(where, body.get("set"), ("set",), labels)
    by_variant: dict[str, dict[str, str]] = {}
    for vname, vbody in (body.get("variants") or {}).items():
        _set_overrides(where, (vbody or {}).get("set"), ("variants", vname, "set"), by_variant.setdefault(vname, {}))
    return fixed, labels, by_variant


def _file_labels(labels: dict[str, str], overrides: Sequence[str]) -> dict[str, str]:
    return {text: where for text, where in labels.items() if text not in overrides}
