"""The paper's figures from a sweep's table: latency curves, throughput ratios, scaling, waiting.

Each figure is a function of the rows of ``sweep.csv`` (`sim.sweep_table.load_rows`)
so it can be redrawn from saved results without rerunning anything
(``python -m sim plot RESULTS``). Files are written as PNG and SVG with the
metadata that would vary between machines dropped (matplotlib version, date)
and a fixed SVG hash salt, so the same table gives the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from sim.confidence import CONFIDENCE, t_interval  # noqa: E402
from sim.derived import (  # noqa: E402
    BOUND_PREFIX,
    SEED,
    SEEDS_MEAN,
    Throughput,
    fcfs_baseline,
    mean_over_seeds,
    targets,
    parse_target,
    seed_table,
    throughput_at,
    throughput_table,
    without_seed,
)
from sim.sweep_table import (  # noqa: E402
    FIGURES, LATENCY, PROGRAMS, Curve, curves, group_label, measured, programs_tell_apart,
)

PNG_METADATA = {"Software": None}
SVG_METADATA = {"Date": None, "Creator": None}
RC = {"svg.hashsalt": "autellix", "path.simplify": True}
DPI = 100
BOUND_HATCH = {"lower": "//", "upper": "\\\\", "unknown": ".."}


def save(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.svg and close the figure."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    try:
        with plt.rc_context(RC):
            fig.savefig(paths[0], format="png", dpi=DPI, metadata=PNG_METADATA)
            fig.savefig(paths[1], format="svg", metadata=SVG_METADATA)
    finally:
        plt.close(fig)
    return paths


def _panels(n: int, rows: int = 1, width: float = 4.2, height: float = 3.4) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(rows, max(n, 1), figsize=(width * max(n, 1), height * rows), dpi=DPI, squeeze=False)
    return fig, axes


def _yscale(ax: Any, values: Sequence[float | None]) -> None:
    """Log scale when the values span more than 4x (latency explodes past saturation), in plain numbers."""
    pos = [v for v in values if v is not None and v > 0]
    if not pos or max(pos) / min(pos) <= 4:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _over_seeds(curves_: Sequence[Curve], metric: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Rates, the mean over the curves (one per seed) and its t band at each rate.

    NaN (a gap in the line) at a rate where some seed has no finished
    value: a mean over the seeds that finished would be another quantity.
    One curve is drawn as it is, with no band.
    """
    by_rate: dict[float, list[float]] = {}
    for c in curves_:
        for rate, v in zip(c.rates, c.metric(metric)):
            by_rate.setdefault(rate, []).append(np.nan if v is None else v)
    rates, mean, low, high = [], [], [], []
    for rate in sorted(by_rate):
        vs = by_rate[rate]
        complete = len(vs) == len(curves_) and all(np.isfinite(v) for v in vs)
        iv = t_interval(vs) if complete and len(vs) >= 2 else None
        rates.append(rate)
        mean.append(iv.mean if iv else (vs[0] if complete else np.nan))
        low.append(iv.low if iv else np.nan)
        high.append(iv.high if iv else np.nan)
    return rates, mean, low, high


def _across_seeds(group: tuple[tuple[str, Any], ...]) -> tuple[tuple[tuple[str, Any], ...], bool]:
    """A group's key across its seeds, and whether it has seeds: a table without a ``seed``
    column, plotted beside a sweep over seeds, is not one more seed of that sweep."""
    return without_seed(group), dict(group).get(SEED) is not None


def latency_vs_rate(rows: Sequence[dict[str, Any]], target: str | float | None = None) -> Any:
    """Mean (top) and p99 (bottom) normalised latency against arrival rate, a panel per group.

    A sweep over ``seed`` gets one panel per group across its seeds: the
    mean over seeds at each rate with its 95% interval shaded.
    """
    value, relative = parse_target(target)
    groups = curves(rows)
    Ls = targets(groups, value, relative)
    panels: dict[tuple, dict[str, list[Curve]]] = {}
    for group, by_policy in groups.items():
        for policy, c in by_policy.items():
            panels.setdefault(_across_seeds(group), {}).setdefault(policy, []).append(c)
    with plt.rc_context(RC):
        fig, axes = _panels(len(panels), rows=2)
        for col, (panel, by_policy) in enumerate(panels.items()):
            L = next(Ls[c.group] for cs in by_policy.values() for c in cs)  # one L per workload
            seeds = max(len(cs) for cs in by_policy.values())
            for row, (metric, what) in enumerate(((LATENCY, "mean"), ("normalized_latency_p99", "p99"))):
                ax = axes[row][col]
                shown: list[float | None] = []
                for policy, cs in by_policy.items():
                    rates, mean, low, high = _over_seeds(cs, metric)
                    line = ax.plot(rates, mean, marker="o", ms=3, label=policy)[0]
                    if len(cs) > 1:
                        ax.fill_between(rates, low, high, color=line.get_color(), alpha=0.2, lw=0)
                    shown += mean + [v for v in low + high if np.isfinite(v)]
                if row == 0 and L is not None:
                    ax.axhline(L, color="grey", ls="--", lw=1, label=f"target L={L:.3g}")
                _yscale(ax, shown)
                title = group_label(panel[0], [p for p, _ in panels]) + (f" ({seeds} seeds, {round(CONFIDENCE * 100)}% band)" if seeds > 1 else "")
                ax.set_title(title if row == 0 else "")
                ax.set_xlabel("arrival rate (programs/s)")
                ax.set_ylabel(f"{what} normalised latency (s/token)")
                ax.grid(True, alpha=0.3)
            axes[0][col].legend(fontsize="small")
        fig.suptitle("Normalised program latency against load")
        fig.tight_layout()
    return fig


def throughput_ratio_bars(rows: Sequence[dict[str, Any]], target: str | float | None = None, baseline: str = "fcfs") -> Any:
    """Throughput at the target relative to ``baseline``, a bar per policy, a cluster per group.

    A bar that is not an exact ratio is hatched and labelled as the table
    prints it: ``>=`` a lower bound (the policy met the target at every
    swept rate), ``<=`` an upper bound (the baseline did), ``~`` neither
    (both did, or neither met it exactly). A sweep over ``seed`` gets a
    cluster per group across its seeds: the mean of the per-seed (paired)
    ratios with its 95% interval as an error bar; no bar where some seed
    gave only a bound (``seed_table``).
    """
    table = throughput_table(rows, target)
    over_seeds = seed_table(table)
    # (group, policy) -> (ratio, its Ratio.bound, (low, high) or None)
    # A cluster is a group across its seeds and whether it has seeds (`_across_seeds`).
    bars_of: dict[tuple, tuple[float | None, str, tuple[float, float] | None]] = {}
    if over_seeds:
        for t in over_seeds:
            if baseline in t.ratios:
                iv = t.ratios[baseline]
                bars_of[(t.group, True), t.policy] = (None, "exact", None) if iv is None else (iv.mean, "exact", (iv.low, iv.high))
        title = f"Throughput at equal latency: mean over seeds, {round(CONFIDENCE * 100)}% interval\n(n/a: some seed met the target at every swept rate or at none)"
    else:
        title = "Throughput at equal latency (hatched: a bound; >= lower, <= upper, ~ neither)"
    covered = {((t.group, True), t.policy) for t in over_seeds}
    for t in table:  # curves no seed table covers: every curve, or those of a grid case with one seed or none
        cluster = _across_seeds(t.group)
        if (cluster, t.policy) not in covered and baseline in t.ratios:
            r = t.ratios[baseline]
            bars_of[(t.group, cluster[1]), t.policy] = (r.value, r.bound, None)  # a lone seed keeps its own
    groups = list(dict.fromkeys(g for g, _ in bars_of))
    names = [group_label(g, [g for g, _ in groups]) for g, _ in groups]
    # Beside a table without seeds, the same group over seeds is told apart.
    labels = [f"{n} seed={SEEDS_MEAN}" if seeded and names.count(n) > 1 else n for n, (_, seeded) in zip(names, groups)]
    policies = list(dict.fromkeys(p for _, p in bars_of))
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(policies), 1) * 0.5 + 3), 4), dpi=DPI)
        width = 0.8 / max(len(policies), 1)
        pos = np.arange(len(groups))
        for i, policy in enumerate(policies):
            cells = [bars_of.get((g, policy), (None, "exact", None)) for g in groups]
            heights = [0.0 if v is None else v for v, _, _ in cells]
            err = np.array([[v - ci[0], ci[1] - v] if ci is not None and v is not None else [0.0, 0.0] for v, _, ci in cells]).T
            xs = pos + (i - (len(policies) - 1) / 2) * width
            bars = ax.bar(xs, heights, width, label=policy)
            if over_seeds:  # drawn apart: bar()'s own yerr converts a (2, 1) array element by element
                ax.errorbar(xs, heights, yerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
            for bar, (_, bound, ci), h in zip(bars, cells, heights):
                bar.set_hatch(BOUND_HATCH.get(bound, ""))
                x = bar.get_x() + bar.get_width() / 2
                if h > 0:  # above the error bar, if any
                    ax.annotate(f"{BOUND_PREFIX.get(bound, '')}{h:.2f}", (x, max(h, ci[1]) if ci else h),
                                ha="center", va="bottom", fontsize="x-small")
                elif over_seeds:
                    ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize="x-small")
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xticks(pos, labels)
        ax.set_ylabel(f"throughput at target latency / {baseline}'s")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncols=min(len(policies), 6) or 1)
        fig.tight_layout()
    return fig


def _scaling_series(rows: Sequence[dict[str, Any]], target: str | float | None) -> dict[tuple[str, str, str], list[tuple[int, Throughput]]]:
    """(workload, balancer, policy) -> [(replicas, throughput at the target)], replicas ascending.

    A sweep over ``seed`` is drawn from its mean curve over the seeds
    (`mean_over_seeds`), one point per replica count.
    """
    value, relative = parse_target(target)
    out: dict[tuple[str, str, str], list[tuple[int, Throughput]]] = {}
    groups = curves(mean_over_seeds(rows))
    Ls = targets(groups, value, relative, reference=curves(rows))
    for group, by_policy in groups.items():
        g = dict(group)
        L = Ls[group]
        for policy, c in by_policy.items():
            tp = throughput_at(c.rates, c.metric(LATENCY), L) if L is not None else Throughput(None, "none")
            key = (_panel_of(group, groups), str(g.get("balancer")), policy)
            out.setdefault(key, []).append((int(g.get("replicas") or 1), tp))
    # A single replica has no balancer to choose: its point belongs on every balancer's line.
    for (w, b, p), pts in out.items():
        for (w1, b1, p1), pts1 in out.items():
            if (w1, p1) == (w, p) and b1 != b:
                have = {n for n, _ in pts}
                pts += [(n, t) for n, t in pts1 if n == 1 and n not in have]
    return {k: sorted(v, key=lambda x: x[0]) for k, v in out.items()}


def _panel_of(group: tuple[tuple[str, Any], ...], groups: Iterable[tuple[tuple[str, Any], ...]]) -> str:
    """The scaling figure's panel: the group but its replica count and balancer (the
    figure's axes), so curves that differ in another swept key (a model, the seedless
    run beside a seeds' mean, a program count that does not follow the replicas) are
    not drawn as one line."""
    axes = ("replicas", "balancer")
    shown = group_label(tuple((k, v) for k, v in group if k not in axes))
    if programs_tell_apart(groups) and PROGRAMS in dict(group):
        shown += f" programs={dict(group)[PROGRAMS]}"
    return shown


def has_scaling(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether the rows vary the replica count or the balancer of a multi-replica engine."""
    replicas = {r.get("replicas") for r in rows if r.get("replicas") is not None}
    balancers = {r.get("balancer") for r in rows if (r.get("replicas") or 1) > 1}
    return len(replicas) > 1 or len(balancers) > 1


def balancers_vs_replicas(rows: Sequence[dict[str, Any]], target: str | float | None = None) -> Any:
    """Throughput at the target against replica count, a line per (balancer, policy), a panel per workload.

    The dotted line is linear scaling from the smallest count's best throughput.
    """
    series = _scaling_series(rows, target)
    workloads = list(dict.fromkeys(k[0] for k in series))
    with plt.rc_context(RC):
        fig, axes = _panels(len(workloads), width=5.0, height=3.8)
        for col, w in enumerate(workloads):
            ax = axes[0][col]
            firsts = []
            for (wl, balancer, policy), pts in series.items():
                if wl != w:
                    continue
                xs = [n for n, _ in pts]
                ys = [np.nan if t.value is None else t.value for _, t in pts]
                ax.plot(xs, ys, marker="o", ms=4, label=f"{balancer} / {policy}")
                if pts and pts[0][1].value is not None:
                    firsts.append((pts[0][0], pts[0][1].value))
            if firsts:
                n0, best = max(firsts, key=lambda x: (-x[0], x[1]))
                xs = sorted({n for (wl, _, _), pts in series.items() if wl == w for n, _ in pts})
                ax.plot(xs, [best * n / n0 for n in xs], ls=":", color="grey", label="linear")
            ax.set_title(w)
            ax.set_xlabel("replicas")
            ax.set_ylabel("throughput at target latency (programs/s)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="x-small")
        fig.suptitle("Multi-engine: balancers against replica count")
        fig.tight_layout()
    return fig


def breakdown_loads(c_fcfs: Curve, L: float | None) -> tuple[float, float]:
    """Light load (the lowest rate) and heavy load (the highest rate FCFS sustains at L, else the median)."""
    rates = c_fcfs.rates
    tp = throughput_at(rates, c_fcfs.metric(LATENCY), L) if L is not None else Throughput(None, "none")
    under = [r for r in rates if tp.value is not None and r <= tp.value]
    heavy = under[-1] if under and under[-1] != rates[0] else rates[len(rates) // 2]
    return rates[0], heavy


def wait_breakdown(rows: Sequence[dict[str, Any]], target: str | float | None = None) -> Any:
    """Mean share of time waiting vs executing per policy at a light and a heavy load, a panel per group.

    The paper's motivation: near capacity FCFS programs spend most of their
    time waiting for the engine, not in it. A sweep over ``seed`` is drawn
    from its mean over the seeds (`mean_over_seeds`), a panel per group.
    """
    value, relative = parse_target(target)
    seeded = any(r.get("seed") is not None for r in rows)
    groups = curves(mean_over_seeds(rows))
    Ls = targets(groups, value, relative, reference=curves(rows))
    with plt.rc_context(RC):
        fig, axes = _panels(len(groups), width=5.0, height=3.8)
        for col, (group, by_policy) in enumerate(groups.items()):
            ax = axes[0][col]
            fcfs = fcfs_baseline(by_policy)
            ref = by_policy[fcfs] if fcfs else next(iter(by_policy.values()))
            loads = breakdown_loads(ref, Ls[group])
            labels, wait, run = [], [], []
            for load_name, rate in zip(("light", "heavy"), loads):
                for policy, c in by_policy.items():
                    share = next((r.get("waiting_share_mean") for r in c.rows if r["rate"] == rate and r.get("status") == "ok"), None)
                    labels.append(f"{policy}\n{load_name} {rate:g}/s")
                    wait.append(np.nan if share is None else share)
                    run.append(np.nan if share is None else 1.0 - share)
            x = np.arange(len(labels))
            ax.bar(x, wait, color="tab:red", label="waiting")
            ax.bar(x, run, bottom=wait, color="tab:blue", label="executing")
            ax.set_xticks(x, labels, fontsize="x-small", rotation=90)
            ax.set_ylim(0, 1.15)  # room for the legend above the bars
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
            ax.set_ylabel("share of engine time (mean over programs)")
            ax.set_title(group_label(group, groups))
            ax.legend(fontsize="x-small", loc="upper center", ncols=2)
        fig.suptitle("Where programs spend their engine time: waiting vs executing" + (" (mean over seeds)" if seeded else ""))
        fig.tight_layout()
    return fig


def draw_all(rows: Sequence[dict[str, Any]], out_dir: str | Path, target: str | float | None = None) -> list[Path]:
    """Every figure the rows support, as PNG and SVG in ``out_dir``; returns the files written."""
    rows = measured(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = save(latency_vs_rate(rows, target), out / "latency_vs_rate")
    fcfs = fcfs_baseline(r["policy"] for r in rows)
    if fcfs is not None and fcfs != "fcfs-unopt":  # unoptimised vLLM is a baseline for others, not for FCFS
        written += save(throughput_ratio_bars(rows, target, fcfs), out / "throughput_ratio")
    written += save(wait_breakdown(rows, target), out / "wait_breakdown")
    if has_scaling(rows):
        written += save(balancers_vs_replicas(rows, target), out / "balancers_vs_replicas")
    for stem in FIGURES:  # one table's figures: none left from a table these rows do not support
        for path in (out / stem).with_suffix(".png"), (out / stem).with_suffix(".svg"):
            if path not in written:
                path.unlink(missing_ok=True)
    return written
