"""Metrics derived from a sweep's table: throughput at a latency target, its ratios, tails.

The paper's headline numbers are "throughput at equal latency" (DESIGN.md
section 2): for each policy, the highest arrival rate whose mean normalised
latency stays at or below a target L, interpolated over the swept rates.
Comparing policies at equal latency, rather than latency at one rate, is
what turns a latency curve into "PLAS serves 2x the load of FCFS".

Definition used here (`throughput_at`), over the rates of one curve sorted
ascending:

* walk up the rates until the first one whose latency exceeds L ("stays at
  or below": a later dip under L does not count, since the policy already
  failed the target at a lower load);
* interpolate linearly between that rate and the one before it;
* never above L: the highest swept rate, flagged as a lower bound (the sweep
  did not reach the policy's limit);
* a failed point (no latency) before the first rate above L ends the walk
  too: the last rate below it, flagged as a lower bound, since the failed
  rate may have been over L. Interpolating across it would claim a value
  the table does not hold, and a run that fails from overload would raise
  the policy's throughput;
* above L already at the lowest rate, or failed there: None (no
  sustainable rate was measured).

A curve is one (workload, other swept keys but the rate) group and one
policy label. The default target is relative: ``2x`` the lowest mean
normalised latency that any curve of the workload (any policy, group and
seed) reaches at its lowest finished rate, because absolute s/token targets
differ by workload (a 60-call LATS tree waits on its critical path, a chat
turn does not). One L per workload keeps balancers, replica counts and
seeds comparable; it also means L, and so every throughput, depends on
which curves the table holds: adding seeds can only lower it.

A sweep that varies ``seed`` makes one curve per seed; `seed_table` then
gives each curve's throughput and ratios across its seeds as a mean with a
Student-t interval, the ratios paired within each seed. `rate_ratio_table`
does the same for the latency at each swept rate, which a steep curve
near capacity can hide from throughput at a target.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sim.confidence import CONFIDENCE, Interval, interval_text, t_interval
from sim.sweep_table import LATENCY, Curve, curves, finite, group_key, group_label, hashable, measured
from sim.textout import aligned
from traces.argtypes import number

BASELINES = ("fcfs", "mlfq", "fcfs-unopt")


def baselines_of(labels: Iterable[str]) -> tuple[str, ...]:
    """The policy labels that ratios are taken against: those of `BASELINES` present, in that order.

    A sweep whose every row carries the same variant (labels ``POLICY-VARIANT``,
    as `sim.sweep` writes them, e.g. ``fcfs-async``) has none of them, yet
    its policies still compare with its own FCFS and MLFQ: then those are
    ``fcfs-VARIANT`` and ``mlfq-VARIANT``. Where plain baselines are present
    they stay the reference, so other variants compare with them (a cap on
    sequences is judged against vLLM's own FCFS).
    """
    labels = list(dict.fromkeys(labels))
    present = tuple(b for b in BASELINES if b in labels)
    if present:
        return present
    suffixes = {label.partition("-")[2] for label in labels}
    if len(suffixes) != 1 or "" in suffixes:
        return ()
    (variant,) = suffixes
    return tuple(f"{b}-{variant}" for b in ("fcfs", "mlfq") if f"{b}-{variant}" in labels)


def fcfs_baseline(labels: Iterable[str]) -> str | None:
    """The FCFS-family label of `baselines_of` (``fcfs``, ``fcfs-VARIANT`` or ``fcfs-unopt``), if any."""
    return next((b for b in baselines_of(labels) if b.partition("-")[0] == "fcfs"), None)


@dataclass(frozen=True)
class Throughput:
    """Throughput at a latency target; ``bound`` is ``exact``, ``lower`` or ``none``."""

    value: float | None
    bound: str

    def text(self) -> str:
        if self.value is None:
            return "-"
        return (">=" if self.bound == "lower" else "") + f"{self.value:.3g}"


# How a ratio that is only a bound is printed (``~``: neither a lower nor an upper bound).
BOUND_PREFIX = {"lower": ">=", "upper": "<=", "unknown": "~"}


@dataclass(frozen=True)
class Ratio:
    """A throughput ratio; ``bound`` is ``exact``, ``lower``, ``upper`` or ``unknown``."""

    value: float | None
    bound: str

    def text(self) -> str:
        if self.value is None:
            return "-"
        return f"{BOUND_PREFIX.get(self.bound, '')}{self.value:.2f}x"


def throughput_at(rates: Sequence[float], latencies: Sequence[float | None], target: float) -> Throughput:
    """The highest rate whose latency stays <= ``target`` (module docstring for the edge cases)."""
    pts = sorted(((r, lat if finite(lat) else None) for r, lat in zip(rates, latencies) if finite(r)),
                 key=lambda p: p[0])
    prev = None
    for rate, lat in pts:
        if lat is None:  # failed: it may have been over the target, so the rate below is only a bound
            break
        if lat > target:
            if prev is None:
                return Throughput(None, "none")
            r0, l0 = prev
            return Throughput(r0 + (target - l0) * (rate - r0) / (lat - l0), "exact")
        prev = (rate, lat)
    if prev is None:
        return Throughput(None, "none")
    return Throughput(prev[0], "lower")


def ratio(num: Throughput, den: Throughput) -> Ratio:
    """``num / den``; a lower-bound numerator over an exact denominator is itself a lower bound."""
    if num.value is None or den.value is None or den.value <= 0:
        return Ratio(None, "none")
    bound = {
        ("exact", "exact"): "exact",
        ("lower", "exact"): "lower",
        ("exact", "lower"): "upper",
    }.get((num.bound, den.bound), "unknown")
    return Ratio(num.value / den.value, bound)


def _in_order(value: Any) -> tuple[int, Any]:
    """A sort key for a column that may mix numbers and text (a hand-edited table): numbers first."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


# --- targets and the table -----------------------------------------------------------------


def parse_target(text: str | float | None) -> tuple[float, bool]:
    """``0.05`` (s/token, absolute) or ``2x`` (relative to light load): (value, relative)."""
    if text is None:
        return 2.0, True
    if isinstance(text, (int, float)):
        value, relative = float(text), False
    else:
        relative = text.endswith(("x", "X"))
        try:  # strictly, as every numeric option: float() would take "1_0x" as 10x
            value = number(text[:-1] if relative else text)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--target {text}: expected seconds per token (0.05) or a multiple of light-load "
                             f"latency (2x); {exc}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--target {text}: must be a finite number > 0")
    return value, relative


def _light_latency(c: Curve) -> float | None:
    """A curve's latency at its own lowest finished rate (curves from separate
    sweeps, e.g. fcfs-unopt at lower rates, need not share rates)."""
    return next((lat for lat in c.metric(LATENCY) if finite(lat)), None)


def targets(groups: dict[tuple, dict[str, Curve]], value: float, relative: bool,
            reference: dict[tuple, dict[str, Curve]] | None = None) -> dict[tuple, float | None]:
    """The target L of each group: absolute, or ``value`` x the best light-load
    latency of any curve of the same workload. Per workload, not per group, so
    that balancers and replica counts (separate groups) are compared at one L.

    ``reference`` gives the curves that set L when they are not ``groups``:
    a figure drawn from the mean over seeds takes the per-seed curves, so its
    L is the table's (the lowest light-load latency of any seed, not of the
    mean)."""
    if not relative:
        return {g: value for g in groups}
    best: dict[Any, float] = {}
    for g, by_policy in (groups if reference is None else reference).items():
        w = dict(g).get("workload")
        for c in by_policy.values():
            lat = _light_latency(c)
            if lat is not None:
                best[w] = min(lat, best.get(w, lat))
    return {g: (value * best[w] if (w := dict(g).get("workload")) in best else None) for g in groups}


@dataclass
class ThroughputRow:
    group: tuple[tuple[str, Any], ...]
    policy: str
    target: float | None
    throughput: Throughput
    ratios: dict[str, Ratio]


def throughput_table(rows: Iterable[dict[str, Any]], target: str | float | None = None) -> list[ThroughputRow]:
    """Throughput at the target per (group, policy) with its ratio to each baseline present."""
    value, relative = parse_target(target)
    groups = curves(rows)
    Ls = targets(groups, value, relative)
    bases = baselines_of(p for by_policy in groups.values() for p in by_policy)
    out = []
    for group, by_policy in groups.items():
        L = Ls[group]
        tp = {
            p: throughput_at(c.rates, c.metric(LATENCY), L) if L is not None else Throughput(None, "none")
            for p, c in by_policy.items()
        }
        for p in by_policy:
            # A baseline against itself is exactly 1 (two lower bounds would read ~1.00x).
            ratios = {b: Ratio(1.0, "exact") if b == p and tp[p].value else ratio(tp[p], tp[b])
                      for b in bases if b in tp}
            out.append(ThroughputRow(group, p, L, tp[p], ratios))
    return out


def tail_table(rows: Iterable[dict[str, Any]]) -> list[tuple[str, str, float, float | None, float | None]]:
    """(group, policy, rate, p95, p99 of normalised latency) per swept rate."""
    out = []
    groups = curves(rows)
    for group, by_policy in groups.items():
        for p, c in by_policy.items():
            for rate, p95, p99 in zip(c.rates, c.metric("normalized_latency_p95"), c.metric("normalized_latency_p99")):
                out.append((group_label(group, groups), p, rate, p95, p99))
    return out


def format_table(table: Sequence[ThroughputRow]) -> str:
    """The text `python -m sim plot` prints: one line per (group, policy)."""
    among = [t.group for t in table]
    baselines = baselines_of(b for t in table for b in t.ratios)
    header = ["group", "policy", "target L", "throughput", *(f"vs {b}" for b in baselines)]
    lines = [header, ["", "", "(s/tok)", "(prog/s)", *([""] * len(baselines))]]
    for t in table:
        lines.append(
            [
                group_label(t.group, among),
                t.policy,
                "-" if t.target is None else f"{t.target:.4g}",
                t.throughput.text(),
                *(t.ratios[b].text() if b in t.ratios else "" for b in baselines),
            ]
        )
    return "\n".join(aligned(lines, left=2)) + "\n(>= : the policy met the target at every swept rate; - : at none)"


# --- over seeds ----------------------------------------------------------------------------

SEED = "seed"
SEEDS_MEAN = "mean"  # the seed of a mean row beside seedless ones: "seed=mean" in a group's label


@dataclass
class SeedRow:
    """A curve's throughput and ratios over the seeds a sweep ran it under.

    An interval needs every seed's value exact: a seed where the policy met
    the target at every swept rate (``>=``) or at none (``-``) gives a bound
    or nothing, and an interval over the other seeds would not be the same
    quantity; ``per_seed`` keeps what each seed gave.
    """

    group: tuple[tuple[str, Any], ...]  # the curve's group without the seed
    policy: str
    seeds: tuple[Any, ...]
    per_seed: tuple[Throughput, ...]
    throughput: Interval | None
    ratios: dict[str, Interval | None]

    def inexact(self) -> str:
        """``>= in 2/5, - in 1/5``: how many seeds gave a bound or nothing."""
        n = len(self.per_seed)
        counts = ((">=", sum(t.bound == "lower" for t in self.per_seed)), ("-", sum(t.bound == "none" for t in self.per_seed)))
        return ", ".join(f"{sym} in {k}/{n}" for sym, k in counts if k)


def without_seed(group: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """A group's key across its seeds; a group without a seed (None: a grid
    case that does not set it) is kept as it is, apart from seeded ones."""
    if dict(group).get(SEED) is None:
        return group
    return tuple((k, v) for k, v in group if k != SEED)


def mean_over_seeds(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a sweep over ``seed`` collapsed to one per (point but the seed, label).

    For the figures that show no interval (waiting, scaling): a number
    column is the mean over the seeds, and the row is ``ok`` only if every
    seed's is (an average over the seeds that finished would be another
    quantity, so a number is None otherwise). Rows without a seed pass
    through unchanged; order is first appearance.
    """
    rows = list(rows)
    # Beside seedless rows a mean row keeps a seed, "mean", to stay apart from
    # them (same workload and rates); alone it needs none, and labels stay short.
    mark = SEEDS_MEAN if any(r.get(SEED) is None for r in rows) else None
    merged: dict[tuple, list[dict[str, Any]]] = {}
    seeds_of: dict[tuple, set[Any]] = {}  # every seed a group was run under, at any rate or label
    for r in rows:
        if r.get(SEED) is None:
            merged[("row", len(merged))] = [r]
            continue
        key = (without_seed(group_key(r)), r.get("variant"), r.get("policy"), r.get("rate"))
        merged.setdefault(key, []).append(r)
        seeds_of.setdefault(key[0], set()).add(hashable(r[SEED]))
    out = []
    for key, group in merged.items():
        if len(group) == 1 and group[0].get(SEED) is None:
            out.append(group[0])
            continue
        # A seed with no row here (an interrupted sweep, tables put together) is a seed that did not finish.
        complete = {hashable(r[SEED]) for r in group} == seeds_of[key[0]]
        ok = complete and all(r.get("status") == "ok" for r in group)
        identity = {k for k, _ in group_key(group[0])} | {"sweep", "point", "rate", "variant", "policy", "scheduler"}
        row: dict[str, Any] = {}
        for col, first in group[0].items():
            values = [r.get(col) for r in group]
            if col == SEED:
                if mark is not None:  # one seed (a grid case that fixes it) keeps its own
                    row[col] = first if len(set(values)) == 1 else mark
            elif col in identity:  # the same in every seed (``point`` is the first seed's)
                row[col] = first
            elif col == "status":
                row[col] = "ok" if ok else "failed"
            elif ok and all(finite(v) for v in values):
                row[col] = math.fsum(values) / len(values)
            else:  # text (an error), or a number some seed lacks
                row[col] = first if len(set(map(repr, values))) == 1 else None
        out.append(row)
    return out


def seed_table(table: Sequence[ThroughputRow], confidence: float = CONFIDENCE) -> list[SeedRow]:
    """Per (group but the seed, policy): throughput at L and its ratios over the seeds.

    Ratios are paired: each is taken within one seed (both policies on the
    same trace), and the interval is over those ratios. Empty unless the
    sweep varies ``seed`` with at least two values for some curve.
    """
    by_curve: dict[tuple, list[ThroughputRow]] = {}
    for t in table:
        if dict(t.group).get(SEED) is None:  # not swept, or a grid case that does not set it
            continue
        by_curve.setdefault((without_seed(t.group), t.policy), []).append(t)
    out = []
    for (rest, policy), rows in by_curve.items():
        if len(rows) < 2:
            continue
        exact = all(t.throughput.bound == "exact" for t in rows)
        tp = t_interval([t.throughput.value for t in rows], confidence) if exact else None
        ratios: dict[str, Interval | None] = {}
        for b in rows[0].ratios:
            if not all(b in t.ratios for t in rows):
                continue
            rs = [t.ratios[b] for t in rows]
            ratios[b] = t_interval([r.value for r in rs], confidence) if all(r.bound == "exact" for r in rs) else None
        seeds = tuple(dict(t.group)[SEED] for t in rows)
        out.append(SeedRow(rest, policy, seeds, tuple(t.throughput for t in rows), tp, ratios))
    return out


def format_seed_table(table: Sequence[SeedRow], confidence: float = CONFIDENCE) -> str:
    """The text `python -m sim sweep` and `plot` add for a sweep over seeds: means with intervals."""
    among = [t.group for t in table]
    baselines = baselines_of(b for t in table for b in t.ratios)
    header = ["group", "policy", "seeds", "throughput (prog/s)", *(f"vs {b}" for b in baselines)]
    lines = [header]

    def cell(iv: Interval | None, spec: str, suffix: str = "") -> str:
        return "n/a" if iv is None else interval_text(iv.mean, iv.low, iv.high, spec, suffix)

    for t in table:
        tp = cell(t.throughput, ".3g") if t.throughput else t.inexact()
        lines.append(
            [group_label(t.group, among), t.policy, str(len(t.seeds)), tp, *(cell(t.ratios[b], ".2f", "x") if b in t.ratios else "" for b in baselines)]
        )
    pct = round(confidence * 100)
    return "\n".join(aligned(lines, left=2)) + (
        f"\n(mean [{pct}% t-interval] over seeds; ratios paired per seed; "
        ">= in k/n, - in k/n: seeds that met the target at every swept rate, or at none, so no interval; "
        "n/a: a ratio with such a seed)"
    )


# --- latency at each rate over seeds -------------------------------------------------------


@dataclass(frozen=True)
class RateRatioRow:
    """A curve's mean normalised latency at one swept rate, over its seeds.

    Throughput at a target compresses a steep curve into one rate, so an 18%
    latency cut near capacity can show as a 1.01x throughput gain; this row
    keeps the latency itself. ``ratio`` is paired per seed against the
    baseline at the same point; None for the baseline itself, or where some
    seed's run of either failed (an interval over the other seeds would be
    another quantity).
    """

    group: tuple[tuple[str, Any], ...]  # without the seed
    rate: float
    policy: str
    seeds: tuple[Any, ...]
    latency: Interval | None
    ratio: Interval | None


def rate_ratio_table(rows: Iterable[dict[str, Any]], confidence: float = CONFIDENCE) -> tuple[str | None, list[RateRatioRow]]:
    """The baseline label and, per (group but the seed, rate, policy) swept under >= 2 seeds, one row.

    The baseline is the first of `baselines_of` the rows' labels. Rows are in the
    groups' first-appearance order, then by rate, then by first appearance
    of the policy. Rows without a seed are left out.
    """
    points: dict[tuple, dict[tuple, dict[str, dict[Any, float | None]]]] = {}
    labels: dict[str, None] = {}
    for r in rows:
        if r.get(SEED) is None or not finite(r.get("rate")):
            continue
        value = r.get(LATENCY) if r.get("status") == "ok" and finite(r.get(LATENCY)) else None
        labels.setdefault(r["policy"], None)
        by_rate = points.setdefault(without_seed(group_key(r)), {})
        by_rate.setdefault(r["rate"], {}).setdefault(r["policy"], {})[r[SEED]] = value
    baseline = next(iter(baselines_of(labels)), None)
    out = []
    for group, by_rate in points.items():
        for rate in sorted(by_rate):
            by_policy = by_rate[rate]
            base = by_policy.get(baseline, {}) if baseline else {}
            for policy in (p for p in labels if p in by_policy):
                values = by_policy[policy]
                if len(values) < 2:
                    continue
                seeds = tuple(sorted(values, key=_in_order))
                exact = [values[s] for s in seeds]
                latency = t_interval(exact, confidence) if all(v is not None for v in exact) else None
                ratio_iv = None
                paired = [(values[s], base.get(s)) for s in seeds]
                if policy != baseline and set(base) == set(values) and all(v is not None and b for v, b in paired):
                    ratio_iv = t_interval([v / b for v, b in paired], confidence)
                out.append(RateRatioRow(group, rate, policy, seeds, latency, ratio_iv))
    return baseline, out


def format_rate_ratio_table(baseline: str | None, table: Sequence[RateRatioRow], confidence: float = CONFIDENCE) -> str:
    """The text `python -m sim sweep` and `plot` add for a sweep over seeds: latency at each rate."""
    among = [t.group for t in table]
    header = ["group", "rate", "policy", "seeds", "norm latency (s/tok)", f"vs {baseline}" if baseline else ""]
    lines = [header]
    for t in table:
        lat = "n/a" if t.latency is None else interval_text(t.latency.mean, t.latency.low, t.latency.high, ".4g")
        if baseline is None:
            rat = ""
        elif t.policy == baseline:
            rat = "baseline"
        else:
            rat = "n/a" if t.ratio is None else interval_text(t.ratio.mean, t.ratio.low, t.ratio.high, ".3f", "x")
        lines.append([group_label(t.group, among), f"{t.rate:g}", t.policy, str(len(t.seeds)), lat, rat])
    pct = round(confidence * 100)
    return "\n".join(aligned(lines, left=3)) + (
        f"\n(mean normalised latency at each rate: mean [{pct}% t-interval] over seeds; ratios paired per seed; "
        "n/a: some seed's run failed)"
    )


WHY_NO_RATE = "a trace workload's rows, whose rate the trace fixes"
NO_RATE = (f"no row has an arrival rate ({WHY_NO_RATE}); the tables and figures are curves against the rate, "
           "so read sweep.csv itself")


def without_rate(rows: Iterable[dict[str, Any]]) -> int:
    """How many rows no curve can hold: a curve is over the arrival rate."""
    return sum(1 for r in rows if not finite(r.get("rate")))


def report(rows: Sequence[dict[str, Any]], target: str | float | None = None) -> str:
    """The tables `python -m sim sweep` and `plot` print: throughput at L, and over seeds its intervals and the latency at each rate."""
    rows = measured(rows)
    rateless = without_rate(rows)
    if rows and rateless == len(rows):
        return NO_RATE
    table = throughput_table(rows, target)
    parts = [format_table(table)]
    if rateless:
        parts.append(f"({rateless} of {len(rows)} rows have no arrival rate and are left out: {WHY_NO_RATE})")
    if over_seeds := seed_table(table):
        parts.append(format_seed_table(over_seeds))
    baseline, at_rates = rate_ratio_table(rows)
    if at_rates:
        parts.append(format_rate_ratio_table(baseline, at_rates))
    return "\n".join(parts)
