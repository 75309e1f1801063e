"""Summaries of a run and the CSV format of its per-call and per-program rows.

The simulator and the real-engine replayer both write their rows with
`write_calls_csv` / `write_programs_csv` and are compared by tools that read
them back with `read_calls_csv` / `read_programs_csv`, so this module is the
one place that fixes the on-disk format:

* columns are the fields of `CallRecord` / `ProgramRecord`, in order;
* floats are written with ``repr`` (shortest text that round-trips exactly),
  so a file is byte-identical for identical records and reading it back gives
  the same numbers;
* lines end with ``\\n`` on every platform.

Percentiles use numpy's default ``method="linear"`` (Hyndman and Fan type 7):
for n sorted values x[0..n-1], the q-th percentile is at rank
h = (n - 1) * q / 100 and equals x[floor(h)] + (h - floor(h)) * (x[floor(h)+1] - x[floor(h)]).
It is the same definition pandas and numpy use by default, so numbers agree
with ad-hoc notebook analysis.

A metric over an empty set (a policy with no finished programs) is ``None``
(JSON null) rather than NaN, which JSON cannot represent.
"""

from __future__ import annotations

import csv
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO, TypeVar, get_type_hints

import numpy as np

from sim.records import CallRecord, ProgramRecord, number_of

# Metrics whose ratio to FCFS is reported as ``<metric>_vs_fcfs``. FCFS is
# vLLM's default, the baseline every headline number in the paper is against.
RATIO_METRICS = (
    "program_latency_mean",
    "program_latency_p95",
    "normalized_latency_mean",
    "normalized_latency_p50",
    "normalized_latency_p95",
    "normalized_latency_p99",
)
BASELINE = "fcfs"


class RecordFormatError(ValueError):
    """A calls/programs CSV whose header or values do not match the record type."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by numpy's 'linear' method; None when empty."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q, method="linear"))


def mean(values: Sequence[float]) -> float | None:
    if len(values) == 0:
        return None
    return float(math.fsum(values) / len(values))


def summarize_policy(
    calls: Sequence[CallRecord], programs: Sequence[ProgramRecord]
) -> dict[str, Any]:
    """Program- and call-level metrics of one policy's run (see DESIGN.md section 2).

    ``preemptions`` and ``prefix_hit_rate`` come from the call rows rather
    than simulator counters so that a replay on the real engine, which has
    only rows, is summarised identically. ``prefix_hit_rate`` is
    sum(prefix_hit_tokens) / sum(prompt_tokens), where a call's hit is the
    one at its first admission (re-hits after a preemption are not counted).
    """
    lat = [p.latency for p in programs]
    norm = [p.normalized_latency for p in programs]
    prompt = sum(c.prompt_tokens for c in calls)
    out: dict[str, Any] = {"programs": len(programs), "calls": len(calls)}
    for name, values in (("program_latency", lat), ("normalized_latency", norm)):
        out[f"{name}_mean"] = mean(values)
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
    out["waiting_share_mean"] = mean([p.waiting_share for p in programs])
    out["call_latency_mean"] = mean([c.finish - c.arrival for c in calls])
    out["ttft_mean"] = mean([c.first_token - c.arrival for c in calls])
    out["preemptions"] = sum(c.preemptions for c in calls)
    out["prefix_hit_rate"] = (sum(c.prefix_hit_tokens for c in calls) / prompt) if prompt else None
    return out


def add_ratios(policies: dict[str, dict[str, Any]]) -> None:
    """Add ``<metric>_vs_fcfs`` to every policy's summary, in place.

    A ratio below 1 means the policy beats FCFS; it is None where FCFS's
    value is zero or missing. A run without FCFS gets no ratio keys at all:
    nothing was measured to divide by, and a null would read as a failure.
    """
    base = policies.get(BASELINE)
    if base is None:
        return
    for summary in policies.values():
        for metric in RATIO_METRICS:
            num, den = summary.get(metric), base.get(metric)
            ok = num is not None and den is not None and den > 0
            summary[f"{metric}_vs_fcfs"] = num / den if ok else None


def summarize_run(
    experiment: str,
    results: Iterable[tuple[str, Sequence[CallRecord], Sequence[ProgramRecord], dict[str, float]]],
) -> dict[str, Any]:
    """The ``summary.json`` document: per-policy metrics, ratios vs FCFS and simulator stats.

    ``results`` yields ``(policy, calls, programs, stats)`` in run order;
    the order is kept in the document.
    """
    policies: dict[str, dict[str, Any]] = {}
    for policy, calls, programs, stats in results:
        summary = summarize_policy(calls, programs)
        summary["stats"] = {k: float(v) for k, v in sorted(stats.items())}
        policies[policy] = summary
    add_ratios(policies)
    return {"experiment": experiment, "policies": policies}


# --- CSV ---------------------------------------------------------------------


def _formatters(cls: type) -> list[tuple[str, Any]]:
    """(field, to-text) per column; floats go through float() first because
    ``repr(numpy.float64(x))`` is ``'np.float64(x)'`` in numpy 2."""
    hints = get_type_hints(cls)
    conv = {float: lambda v: repr(float(v)), int: lambda v: str(int(v))}
    return [(f.name, conv.get(hints[f.name], str)) for f in fields(cls)]


def _columns(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def write_header(fh: TextIO, cls: type) -> None:
    csv.writer(fh, lineterminator="\n").writerow(_columns(cls))


def write_rows(fh: TextIO, records: Iterable[Any]) -> None:
    """Append records (all of one dataclass type) without a header."""
    writer = csv.writer(fh, lineterminator="\n")
    cache: dict[type, list[tuple[str, Any]]] = {}
    for rec in records:
        cols = cache.get(type(rec)) or cache.setdefault(type(rec), _formatters(type(rec)))
        writer.writerow([fmt(getattr(rec, name)) for name, fmt in cols])


def write_calls_csv(path: str | Path, calls: Iterable[CallRecord]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        write_header(fh, CallRecord)
        write_rows(fh, calls)


def write_programs_csv(path: str | Path, programs: Iterable[ProgramRecord]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        write_header(fh, ProgramRecord)
        write_rows(fh, programs)


R = TypeVar("R")


def _read(path: str | Path, cls: type[R], lines: list[int] | None = None) -> list[R]:
    """The records of ``path``; a file this module did not write fails with its line and column.
    ``lines``, if given, gets the line each record starts on, for errors about a record's content."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return _parse(path, cls, csv.reader(fh), lines)
    except UnicodeDecodeError:  # its offset is within the decoder's chunk: find the line in the whole file
        raw = Path(path).read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise RecordFormatError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        raise  # the file changed under us: decoding it whole worked


def _parse(path: str | Path, cls: type[R], reader: Any, lines: list[int] | None) -> list[R]:
    hints = get_type_hints(cls)
    expected = _columns(cls)
    rows: list[R] = []
    line = 1  # where the record being read starts: a quoted newline spans lines
    try:
        header = next(reader, None)
        if header != expected:
            raise RecordFormatError(
                f"{path}:1: expected the {cls.__name__} columns {','.join(expected)}, got {','.join(header or [])}"
            )
        line = reader.line_num + 1
        for row in reader:
            if len(row) != len(expected):
                raise RecordFormatError(f"{path}:{line}: expected {len(expected)} values, got {len(row)}")
            values = {}
            for name, text in zip(expected, row):
                values[name] = _value(path, line, name, hints[name], text)
            rows.append(cls(**values))
            if lines is not None:
                lines.append(line)
            line = reader.line_num + 1
    except csv.Error as exc:  # a field past the csv module's size limit, a NUL byte
        raise RecordFormatError(f"{path}:{line}: not a CSV record as this module writes them ({exc})") from None
    return rows


# Columns that no run can make negative; ``first_scheduled`` may also be -1 (not known, in a
# replay). Waiting is a difference of clocks in a replay and is left free. A negative latency
# read without a word moved `engine validate`'s measured mean.
NON_NEGATIVE = {"engine", "prompt_tokens", "output_tokens", "arrival", "first_token", "finish", "service",
                "preemptions", "prefix_hit_tokens", "calls", "latency", "normalized_latency"}
INT_LIMIT = 2**63  # a count or index past it is no run's


def _value(path: str | Path, line: int, name: str, kind: type, text: str) -> Any:
    if kind not in (int, float):
        return text
    value = number_of(text, kind)
    where = f"{path}:{line}: column {name}"
    if value is None:
        shown = f"{text[:40]!r}... ({len(text)} characters)" if len(text) > 40 else repr(text)
        raise RecordFormatError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {shown}")
    if kind is int and abs(value) >= INT_LIMIT:
        raise RecordFormatError(f"{where}: expected an integer below 2**63, got one of {len(text)} digits")
    if kind is float and not math.isfinite(value):  # the writers never write one; JSON cannot hold it
        raise RecordFormatError(f"{where}: expected a finite number, got {text!r}")
    if value < 0 and name in NON_NEGATIVE or (name == "first_scheduled" and value < 0 and value != -1):
        allowed = ">= 0, or -1 (not known)" if name == "first_scheduled" else ">= 0"
        raise RecordFormatError(f"{where}: expected a number {allowed}, got {text!r}")
    return value


def read_calls_csv(path: str | Path) -> list[CallRecord]:
    return _read(path, CallRecord)


def read_programs_csv(path: str | Path, lines: list[int] | None = None) -> list[ProgramRecord]:
    return _read(path, ProgramRecord, lines)


def summarize_records(
    experiment: str, calls: Sequence[CallRecord], programs: Sequence[ProgramRecord]
) -> dict[str, Any]:
    """`summarize_run` from rows of several policies (as read back from the CSVs).

    For outputs that have rows but no simulator stats, such as a replay on
    the real engine; policies keep the order in which they first appear.
    """
    order = list(dict.fromkeys([p.policy for p in programs] + [c.policy for c in calls]))
    return summarize_run(
        experiment,
        [(pol, [c for c in calls if c.policy == pol], [p for p in programs if p.policy == pol], {}) for pol in order],
    )
