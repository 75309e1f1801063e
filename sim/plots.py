"""The run plot: how each policy's normalised program latency is distributed.

Normalised latency (s per output token, DESIGN.md section 2) is the paper's
metric, and its tail is where program-level head-of-line blocking shows, so
the plot is its CDF per policy next to the mean and p95 bars.

The PNG must be byte-identical for identical data (results are diffed across
runs), so the Agg backend is forced and the PNG metadata that would vary
(the matplotlib version string) is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

PNG_METADATA = {"Software": None}
DPI = 100


def latency_plot(
    path: str | Path,
    experiment: str,
    normalized: Mapping[str, Sequence[float]],
    summary: Mapping[str, Mapping[str, Any]],
) -> None:
    """Write the CDF of normalised latency per policy and mean/p95 bars to ``path`` (PNG).

    The mean bars are labelled with their ratio to FCFS (``x0.50`` = half FCFS's).

    ``normalized`` maps policy to its programs' normalised latencies;
    ``summary`` is summary.json's ``policies`` (for the bars, so the plot
    shows exactly the reported numbers).
    """
    with plt.rc_context({"svg.hashsalt": "autellix", "path.simplify": True}):
        fig, (cdf, bars) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=DPI)
        try:
            _cdf(cdf, normalized)
            _bars(bars, summary)
            fig.suptitle(f"{experiment}: normalised program latency")
            fig.tight_layout()
            fig.savefig(path, format="png", dpi=DPI, metadata=PNG_METADATA)
        finally:
            plt.close(fig)


def _cdf(ax: Any, normalized: Mapping[str, Sequence[float]]) -> None:
    positive = False
    for policy, values in normalized.items():
        x = np.sort(np.asarray(values, dtype=float))
        if x.size == 0:
            continue
        positive = positive or bool(x[0] > 0)
        y = np.arange(1, x.size + 1) / x.size
        ax.step(x, y, where="post", label=f"{policy} (n={x.size})")
    if positive:
        ax.set_xscale("log")
        # 1-2-5 labels in plain notation: default minor labels overlap on short ranges.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("normalised latency (s / output token)")
    ax.set_ylabel("fraction of programs")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    if normalized:
        ax.legend(loc="lower right", fontsize="small")


def _bars(ax: Any, summary: Mapping[str, Mapping[str, Any]]) -> None:
    policies = list(summary)
    pos = np.arange(len(policies))
    width = 0.38
    top = 0.0
    for offset, key, label in ((-width / 2, "normalized_latency_mean", "mean"), (width / 2, "normalized_latency_p95", "p95")):
        heights = [summary[p].get(key) or 0.0 for p in policies]
        top = max([top, *heights])
        ax.bar(pos + offset, heights, width, label=label)
    for x, p in zip(pos, policies):  # the headline number: mean vs FCFS
        ratio = summary[p].get("normalized_latency_mean_vs_fcfs")
        if ratio is not None:
            height = summary[p].get("normalized_latency_mean") or 0.0
            ax.annotate(f"x{ratio:.2f}", (x - width / 2, height), ha="center", va="bottom", fontsize="small")
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)  # room for the labels and the legend
    ax.set_xticks(pos, policies)
    ax.set_ylabel("normalised latency (s / output token)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncols=2, fontsize="small")
