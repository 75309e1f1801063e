"""A sweep's table (``sweep.csv``): reading it back, checking it, and the curves it holds.

The table is the one input of every derived metric and figure, and it is a
file a user may copy, concatenate or edit. So it is read strictly: a row cut
short, a non-number where a metric belongs, an unknown status or one point
given twice is refused with its file and line, rather than surfacing as a
TypeError deep in the plotting or as a curve that silently lost points.

A curve is one (workload, other swept keys but the rate) group and one
policy label (`group_key`, `curves`); `sim.derived` computes the metrics
over them.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from sim.records import number_of

# The figures `sim plot` draws (`sim.sweep_plots.draw_all`), each as .png and .svg under a sweep's plots/ by
# default; a new sweep into the same directory removes them with the old table (`sim.sweep_run.SweepWriter`).
FIGURES = ("latency_vs_rate", "throughput_ratio", "wait_breakdown", "balancers_vs_replicas")
PLOTS_DIR = "plots"

LATENCY = "normalized_latency_mean"
GROUP = ("workload", "replicas", "balancer")  # always part of a curve's identity
TEXT_COLUMNS = {"sweep", "workload", "balancer", "variant", "policy", "scheduler", "status", "error"}


def finite(x: Any) -> bool:
    """A number (not a bool) that is finite: a cell a curve can use."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse(col: str, text: str) -> Any:
    """A cell: None when empty, text in a text column, else the number it holds as the writer
    writes numbers (`sim.records.number_of`: no "1_0" or padded digits), or its text."""
    if text == "":
        return None
    if col in TEXT_COLUMNS:
        return text
    value = number_of(text)
    return text if value is None else value


def _finite_at_least_zero(value: int | float) -> bool:
    try:
        return math.isfinite(value) and value >= 0
    except OverflowError:  # an integer past what a float holds: math.isfinite converts it
        return False


# Text columns every row of a sweep's table fills; an empty one was a TypeError in the table.
FILLED_COLUMNS = ("sweep", "workload", "balancer", "variant", "policy", "status")


class TableError(ValueError):
    """A file that is not a sweep's table (truncated, edited, another CSV); the message names the file and line."""


# What the table and the figures read; a CSV without them is not a sweep's.
# The swept keys that tell curves apart (a seed, a model) lie between
# ``balancer`` and ``variant`` (`group_key`), so those two are needed too.
REQUIRED_COLUMNS = ("workload", "rate", "balancer", "variant", "policy", "status", "normalized_latency_mean")


def _numeric_columns(header: Sequence[str]) -> set[str]:
    """Columns that must hold numbers: the point, rate and replicas, and every
    metric (after ``status``) but ``error``. Other swept keys may be text."""
    after = header[header.index("status") + 1 :]
    return {"point", "rate", "replicas", *after} - {"error"}


def load_rows(results: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """The rows of ``sweep.csv`` (a directory or the file; or several, concatenated), typed:
    numbers as numbers, empty as None. Several let one table compare sweeps run
    at different rates (``paper-single`` and ``paper-single-unopt``).

    Raises TableError, located, for anything but a whole sweep table: a row cut
    short or a non-number where a metric belongs would otherwise surface as a
    TypeError deep in the plotting, or as an empty table.
    """
    paths = [results] if isinstance(results, (str, Path)) else list(results)
    located = [pair for one in paths for pair in _load_one(one)]
    _check_one_row_per_point(located)
    return [row for _, row in located]


def _load_one(results: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """One table's rows, each with the ``file:line`` it came from."""
    path = Path(results)
    if path.is_dir():
        if not (path / "sweep.csv").exists() and (path / "summary.json").exists():
            raise TableError(f"{path}: a run's results (summary.json), not a sweep's: sim plot draws the sweep.csv "
                             f"that python -m sim sweep writes; a run's own figure is its latency.png")
        path = path / "sweep.csv"
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise TableError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _rows(path, reader)
    except csv.Error as exc:  # a field past the csv module's size limit, a NUL byte
        raise TableError(f"{path}:{reader.line_num}: not a CSV record as sim sweep writes them ({exc})") from None


def _rows(path: Path, reader: Any) -> list[tuple[str, dict[str, Any]]]:
    header = next(reader, None)
    if header is None:
        return []
    twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
    if twice is not None:  # a row keeps one of the two cells: curves would merge or split without a word
        raise TableError(f"{path}:1: column {twice!r} appears twice in the header")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise TableError(f"{path}:1: not a sweep table (python -m sim sweep writes one): missing column(s) {', '.join(missing)}")
    numeric = _numeric_columns(header)
    rows = []
    for fields in reader:
        if not fields:
            continue
        where = f"{path}:{reader.line_num}"
        if len(fields) != len(header):
            raise TableError(f"{where}: expected {len(header)} columns as in the header, got {len(fields)} (a truncated file?)")
        row = {col: _parse(col, cell) for col, cell in zip(header, fields)}
        # An invalid point's swept values are what the sweep refused, an empty one too.
        filled = FILLED_COLUMNS if row.get("status") != "invalid" else ("sweep", "variant", "policy", "status")
        empty = next((c for c in filled if c in row and row[c] is None), None)
        if empty is not None:
            raise TableError(f"{where}: column {empty!r}: empty; every row of a sweep's table names its {empty}")
        # An invalid point's swept value is what the sweep refused (a rate of "abc"), and it has no metrics.
        checked = numeric if row.get("status") != "invalid" else ()
        for col, cell in zip(header, fields):
            value = row[col]
            if col in checked and isinstance(value, str):
                raise TableError(f"{where}: column {col!r}: expected a number, got {cell!r}")
            if col in checked and value is not None and not _finite_at_least_zero(value):
                # Every metric, rate and count is finite and >= 0 (a failed metric is an empty cell);
                # a nan would silently drop the point, a negative latency move the target.
                raise TableError(f"{where}: column {col!r}: expected a finite number >= 0, got {cell!r}")
        _check_status(where, row)
        rows.append((where, row))
    return rows


STATUSES = ("ok", "failed", "invalid")  # what `sim.sweep_run` writes


def _check_status(where: str, row: dict[str, Any]) -> None:
    """A status the table knows, and an ``ok`` row's latency. Anything but ``ok`` is read as a
    point that did not finish, so a hand-edited ``OK`` or an emptied latency cell moved the
    throughput at the target without a word; a finished run always has its latency."""
    status = row.get("status")
    if status not in STATUSES:
        raise TableError(f"{where}: column 'status': expected one of {', '.join(STATUSES)}, got {status!r}")
    if status == "ok" and row.get(LATENCY) is None:
        raise TableError(f"{where}: column {LATENCY!r}: empty on an 'ok' row; a finished point has its latency "
                         f"(a point that did not finish is 'failed')")


def _point_of(row: dict[str, Any]) -> tuple | None:
    """The curve point a row is, (group, policy, rate), of which a table holds one row; None
    for a row without a rate (no point of any curve)."""
    if not finite(row.get("rate")):
        return None
    return group_key(row), row["policy"], row["rate"]


def _check_one_row_per_point(located: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """One row per policy, rate and curve across every table given, as `curves` needs; checked
    here, where each row's file and line are known (a table given twice, a swept key's column removed)."""
    seen: dict[tuple, str] = {}
    for where, row in located:
        key = _point_of(row)
        if key is None:
            continue
        if key in seen:
            raise TableError(
                f"{where}: policy {row['policy']!r} at rate {row['rate']} of {group_label(key[0])} "
                f"is already at {seen[key]}: a table given twice, or a swept key's column removed?"
            )
        seen[key] = where


def unfinished_sweeps(results: str | Path | Sequence[str | Path]) -> list[str]:
    """A warning for each table whose ``sweep.json`` says its sweep did not finish, or
    wrote another number of rows than the table holds.

    An interrupted sweep's table is well formed, only short of rows, so its
    curves end early or lack points with no other sign. A table without a
    ``sweep.json`` beside it (a copy, as under docs/figures) gets none.
    """
    if not isinstance(results, (str, Path)):
        return [w for one in results for w in unfinished_sweeps(one)]
    path = Path(results)
    meta_path = (path if path.is_dir() else path.parent) / "sweep.json"
    if not meta_path.is_file():
        return []
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        state, finished, jobs = meta["state"], meta["finished"], meta["jobs"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return [f"{meta_path}: cannot tell whether the sweep finished ({type(exc).__name__}: {exc})"]
    except RecursionError:
        return [f"{meta_path}: cannot tell whether the sweep finished (JSON nested too deeply)"]
    table = path if not path.is_dir() else path / "sweep.csv"
    try:  # a sweep that ended wrote its table and then sweep.json (one still running writes rows as they come)
        rows = len(_load_one(table)) if state != "running" and table.is_file() else None
    except TableError:  # `load_rows` reports it
        rows = None
    if rows is not None and rows != finished:  # cut short or added to since: nothing else would tell
        return [f"{table}: {rows} rows, where {meta_path.name} says the sweep wrote {finished} ({state}); the "
                f"table was cut or changed after the sweep, so its curves may lack points"]
    if state == "complete":
        return []
    how = {"interrupted": "was interrupted", "failed": "stopped on an error"}.get(
        state, "did not finish (killed, or still running)")
    return [f"{meta_path}: the sweep {how}: {finished} of {jobs} jobs have a row; "
            f"curves lack the rest"]


def group_key(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What a curve is over: the descriptive columns and every other swept key, not the rate.

    `sim.sweep_run.columns` puts the other swept keys between ``balancer``
    and ``variant``, so new metric columns never split a curve. A swept
    list or mapping becomes a tuple, so the key can name a group.
    """
    keys = list(row)
    extra = keys[keys.index("balancer") + 1 : keys.index("variant")] if "balancer" in keys and "variant" in keys else []
    return tuple((k, hashable(row.get(k))) for k in (*GROUP, *extra))


def hashable(value: Any) -> Any:
    """A swept list or mapping as a tuple, so it can be part of a group's key."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, hashable(v)) for k, v in value.items())
    return value


def measured(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of points that exist. An invalid point (its swept value refused: a seed of "abc",
    replicas of [2]) has no metrics, and its value would only break the curves' order."""
    return [r for r in rows if r.get("status") != "invalid"]


PROGRAMS = "workload.params.programs"


def group_label(key: Sequence[tuple[str, Any]], among: Iterable[Sequence[tuple[str, Any]]] = ()) -> str:
    """Short text for a group: its values that vary are what a reader needs.

    The program count is left out, as a scale that follows the replicas in
    the paper's sweeps, and so is the balancer of a single replica (it has
    nothing to balance), unless two groups of ``among`` differ in that key
    alone: then two curves would share one label, and every label shows it
    (decided once, so no curve loses points to another label).
    """
    among = list(among)
    d = dict(key)
    show_programs = programs_tell_apart(among)
    show_balancer = tell_apart([g for g in among if _one_replica(dict(g).get("replicas"))], "balancer")
    parts = []
    for k, v in key:
        if v is None:
            continue
        if k == "workload":
            parts.insert(0, str(v))
        elif k == "replicas" and v == 1:
            continue
        elif k == "balancer":
            if show_balancer or not _one_replica(d.get("replicas")):
                parts.append(str(v))
        elif k == "replicas":
            parts.append(f"x{v}")
        elif k == PROGRAMS:
            if show_programs:
                parts.append(f"programs={v}")
        else:
            parts.append(f"{k.split('.')[-1]}={v}")
    return " ".join(parts) or "all"


def _one_replica(replicas: Any) -> bool:
    return isinstance(replicas, int) and replicas <= 1


def tell_apart(groups: Iterable[Sequence[tuple[str, Any]]], name: str) -> bool:
    """Whether two of ``groups`` differ in the key ``name`` alone."""
    seen: dict[tuple, Any] = {}
    for g in groups:
        rest = tuple((k, v) for k, v in g if k != name)
        value = dict(g).get(name)
        if seen.setdefault(rest, value) != value:
            return True
    return False


def programs_tell_apart(groups: Iterable[Sequence[tuple[str, Any]]]) -> bool:
    """Whether two of ``groups`` differ in their program count alone."""
    return tell_apart(groups, PROGRAMS)


@dataclass
class Curve:
    """One policy's rows within a group, sorted by rate."""

    group: tuple[tuple[str, Any], ...]
    policy: str
    rates: list[float] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def metric(self, name: str) -> list[float | None]:
        return [r.get(name) if r.get("status") == "ok" else None for r in self.rows]


def curves(rows: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Curve]]:
    """group -> policy label -> curve, both in first-appearance order."""
    out: dict[tuple, dict[str, Curve]] = {}
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        point = _point_of(r)
        if point is None:
            continue
        g = point[0]
        first = seen.setdefault(point, r)
        if first is not r:  # a curve is a function of the rate; averaging or picking one would hide it
            raise TableError(
                f"{_row_name(first)} and {_row_name(r)} are both policy {r['policy']!r} at rate {r['rate']} of "
                f"{group_label(g)}: a table given twice, or a swept key's column removed?"
            )
        c = out.setdefault(g, {}).setdefault(r["policy"], Curve(g, r["policy"]))
        c.rows.append(r)
    for by_policy in out.values():
        for c in by_policy.values():
            c.rows.sort(key=lambda r: r["rate"])
            c.rates = [r["rate"] for r in c.rows]
    return out


def _row_name(row: dict[str, Any]) -> str:
    return f"sweep {row.get('sweep')!r} point {row.get('point')}"
