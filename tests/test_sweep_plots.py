"""Sweep figures: drawn from rows alone, byte-identical for the same rows, scaling only when it varies."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from sim.sweep_plots import breakdown_loads, draw_all, has_scaling
from sim.sweep_table import curves


def rows(replicas=1, balancer="locality", workload="bfcl"):
    out = []
    for policy, lats in (("fcfs", [0.02, 0.05, 0.3]), ("plas", [0.02, 0.03, 0.08]), ("fcfs-unopt", [0.03, 0.4, 1.0])):
        for i, (rate, lat) in enumerate(zip([2 * replicas, 4 * replicas, 6 * replicas], lats)):
            out.append(
                {
                    "sweep": "s", "point": i, "workload": workload, "rate": rate, "replicas": replicas,
                    "balancer": balancer, "variant": "default", "policy": policy, "scheduler": "fcfs",
                    "status": "ok", "normalized_latency_mean": lat, "normalized_latency_p95": 2 * lat,
                    "normalized_latency_p99": 3 * lat, "waiting_share_mean": min(0.9, lat * 3),
                }
            )
    return out


def test_figures_are_byte_identical_and_carry_no_version(tmp_path):
    data = rows() + rows(workload="lats")
    first = draw_all(data, tmp_path / "a", "2x")
    second = draw_all(data, tmp_path / "b", "2x")
    assert [p.name for p in first] == [
        "latency_vs_rate.png", "latency_vs_rate.svg", "throughput_ratio.png", "throughput_ratio.svg",
        "wait_breakdown.png", "wait_breakdown.svg",
    ]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    svg = (tmp_path / "a" / "latency_vs_rate.svg").read_text()
    assert matplotlib.__version__ not in svg and "<dc:date>" not in svg


def test_a_sweep_of_one_variant_gets_its_throughput_bars_against_its_own_fcfs(tmp_path):
    data = [{**r, "variant": "async", "policy": f"{r['policy']}-async"} for r in rows() if r["policy"] != "fcfs-unopt"]
    names = [p.name for p in draw_all(data, tmp_path, "2x")]
    assert "throughput_ratio.png" in names
    # Unoptimised vLLM alone is a baseline for the others, never a figure of ratios to itself.
    alone = [r for r in rows() if r["policy"] == "fcfs-unopt"]
    assert "throughput_ratio.png" not in [p.name for p in draw_all(alone, tmp_path / "u", "2x")]


def test_scaling_figure_only_when_replicas_or_balancers_vary(tmp_path):
    assert not has_scaling(rows())
    data = rows(1) + rows(2, "round_robin") + rows(2, "locality") + rows(4, "locality")
    assert has_scaling(data)
    names = [p.name for p in draw_all(data, tmp_path, 0.06)]
    assert "balancers_vs_replicas.png" in names


def test_breakdown_loads_light_and_heavy():
    fcfs = curves(rows())[next(iter(curves(rows())))]["fcfs"]
    # L = 0.04: FCFS sustains 2 + 2 * 0.02 / 0.03 = 3.33/s; the only swept rate under it
    # is the light one, so the median rate stands in for the heavy load.
    assert breakdown_loads(fcfs, 0.04) == (2, 4)
    assert breakdown_loads(fcfs, 0.2) == (2, 4)  # sustains up to 5.2/s: 4 is the highest rate under it
    assert breakdown_loads(fcfs, 1.0) == (2, 6)  # never above L


def seeded_rows():
    """Three seeds of the same curves, latencies scaled by 0.9, 1.0 and 1.1; ``seed`` swept."""
    out = []
    for seed, scale in ((0, 0.9), (1, 1.0), (2, 1.1)):
        for r in rows():
            if r["policy"] == "fcfs-unopt":
                continue
            lat = r["normalized_latency_mean"] * scale
            keys = list(r)
            r = {**{k: r[k] for k in keys[: keys.index("variant")]}, "seed": seed, **{k: r[k] for k in keys[keys.index("variant"):]}}
            out.append({**r, "normalized_latency_mean": lat, "normalized_latency_p99": 3 * lat})
    return out


def test_latency_figure_over_seeds_is_one_panel_with_a_band():
    from sim.confidence import t_interval
    from sim.sweep_plots import latency_vs_rate

    fig = latency_vs_rate(seeded_rows(), 0.06)
    top = fig.axes[0]
    assert len(fig.axes) == 2  # one panel (mean and p99), not one per seed
    assert top.get_title() == "bfcl (3 seeds, 95% band)"
    fcfs = next(line for line in top.get_lines() if line.get_label() == "fcfs")
    assert list(fcfs.get_ydata()) == [pytest.approx(0.02), pytest.approx(0.05), pytest.approx(0.3)]  # the mean of 0.9, 1, 1.1 x
    assert len(top.collections) == 2  # a shaded interval per policy
    band = top.collections[0].get_paths()[0].vertices[:, 1]
    iv = t_interval([0.3 * 0.9, 0.3, 0.3 * 1.1])
    assert max(band) == pytest.approx(iv.high) and min(band) == pytest.approx(t_interval([0.018, 0.02, 0.022]).low)


def test_latency_figure_leaves_a_gap_where_a_point_failed():
    from sim.sweep_plots import latency_vs_rate

    def fcfs_line(data):
        top = latency_vs_rate(data, 0.06).axes[0]
        return next(line for line in top.get_lines() if line.get_label() == "fcfs")

    plain = rows()
    plain[1] = {**plain[1], "status": "failed"}  # fcfs at rate 4
    line = fcfs_line(plain)
    assert list(line.get_xdata()) == [2, 4, 6] and np.isnan(line.get_ydata()[1])
    # over seeds: one seed failing at rate 4 leaves a gap too, not a mean of the other two
    seeded = seeded_rows()
    i = next(i for i, r in enumerate(seeded) if (r["seed"], r["policy"], r["rate"]) == (1, "fcfs", 4))
    seeded[i] = {**seeded[i], "status": "failed"}
    line = fcfs_line(seeded)
    assert list(line.get_xdata()) == [2, 4, 6] and np.isnan(line.get_ydata()[1]) and line.get_ydata()[2] == pytest.approx(0.3)


def test_ratio_figure_over_seeds_has_error_bars(tmp_path):
    from sim.confidence import t_interval
    from sim.sweep_plots import throughput_ratio_bars

    # L = 0.06: FCFS 4 + 2 x (0.06 - 0.05 s) / (0.3 s - 0.05 s) per scale s; PLAS 4 + 2 x (0.06 - 0.03 s) / (0.05 s)
    fig = throughput_ratio_bars(seeded_rows(), 0.06)
    ax = fig.axes[0]
    heights = [round(b.get_height(), 3) for b in ax.patches]
    ratios = []
    for scale in (0.9, 1.0, 1.1):
        fcfs = 4 + 2 * (0.06 - 0.05 * scale) / (0.25 * scale)
        plas = 4 + 2 * (0.06 - 0.03 * scale) / (0.05 * scale)
        ratios.append(plas / fcfs)
    assert heights == [1.0, round(sum(ratios) / 3, 3)]
    from matplotlib.container import ErrorbarContainer

    fcfs_err, plas_err = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    [segment] = plas_err.lines[2][0].get_segments()
    iv = t_interval(ratios)
    assert segment[0][1] == pytest.approx(iv.low) and segment[1][1] == pytest.approx(iv.high)
    assert "mean over seeds" in ax.get_title()


def test_mean_over_seeds_and_the_figures_that_use_it(tmp_path):
    from sim.derived import mean_over_seeds
    from sim.sweep_plots import wait_breakdown

    seeded = seeded_rows()
    merged = mean_over_seeds(seeded)
    assert len(merged) == len(seeded) // 3 and all("seed" not in r for r in merged)
    fcfs6 = next(r for r in merged if (r["policy"], r["rate"]) == ("fcfs", 6))
    assert fcfs6["normalized_latency_mean"] == pytest.approx(0.3) and fcfs6["point"] == 2 and fcfs6["status"] == "ok"
    seeded[0] = {**seeded[0], "status": "failed"}  # seed 0, fcfs, rate 2
    fcfs2 = mean_over_seeds(seeded)[0]
    assert fcfs2["status"] == "failed" and fcfs2["normalized_latency_mean"] is None
    # rows without a seed pass through
    assert mean_over_seeds(rows()) == rows()
    fig = wait_breakdown(seeded_rows(), 0.06)
    assert len(fig.axes) == 1 and fig._suptitle.get_text().endswith("(mean over seeds)")
    # scaling: one point per replica count, not one per seed
    from sim.sweep_plots import _scaling_series

    data = [{**r, "replicas": n, "rate": r["rate"] * n} for n in (1, 2) for r in seeded_rows()]
    series = _scaling_series(data, 0.06)
    assert [n for n, _ in series["bfcl", "locality", "plas"]] == [1, 2]


def test_a_seedless_table_beside_a_seeded_one_keeps_its_own_curves():
    """The seeds' mean rows lost their seed and met the seedless run's rows at the same rates (an error)."""
    from sim.derived import mean_over_seeds
    from sim.sweep_table import curves
    from sim.sweep_plots import wait_breakdown

    plain = [{k: v for k, v in r.items()} for r in rows() if r["policy"] != "fcfs-unopt"]
    both = plain + seeded_rows()
    groups = curves(mean_over_seeds(both))
    assert [dict(g).get("seed") for g in groups] == [None, "mean"]
    fig = wait_breakdown(both, 0.06)
    assert [ax.get_title() for ax in fig.axes] == ["bfcl", "bfcl seed=mean"]
    # a grid case that fixes one seed keeps it beside the seedless rows
    one = [r for r in seeded_rows() if r["seed"] == seeded_rows()[0]["seed"]]
    assert [dict(g).get("seed") for g in curves(mean_over_seeds(plain + one))] == [None, one[0]["seed"]]


def test_a_table_without_seeds_beside_a_sweep_over_seeds_is_not_one_more_seed():
    """Its group, with no seed column, equalled the seeded groups' with the seed taken out: the latency
    figure averaged it in as a fourth seed, and the ratio figure dropped its bars or mixed them in."""
    from sim.confidence import t_interval
    from sim.sweep_plots import latency_vs_rate, throughput_ratio_bars

    plain = [{**r, "normalized_latency_mean": 2 * r["normalized_latency_mean"]} for r in rows()
             if r["policy"] != "fcfs-unopt"]  # no seed column at all
    fig = latency_vs_rate(seeded_rows() + plain, 0.06)
    tops = fig.axes[:2]
    assert [ax.get_title() for ax in tops] == ["bfcl (3 seeds, 95% band)", "bfcl"]
    fcfs = next(line for line in tops[0].get_lines() if line.get_label() == "fcfs")
    assert list(fcfs.get_ydata()) == [pytest.approx(0.02), pytest.approx(0.05), pytest.approx(0.3)]
    band = tops[0].collections[0].get_paths()[0].vertices[:, 1]
    assert max(band) == pytest.approx(t_interval([0.3 * 0.9, 0.3, 0.3 * 1.1]).high)
    fcfs_plain = next(line for line in tops[1].get_lines() if line.get_label() == "fcfs")
    assert list(fcfs_plain.get_ydata()) == [pytest.approx(0.04), pytest.approx(0.1), pytest.approx(0.6)]
    ax = throughput_ratio_bars(seeded_rows() + plain, 0.06).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bfcl seed=mean", "bfcl"]
    # the seedless run: FCFS 0.04 -> 0.1 crosses 0.06 at 2 + 2 x 0.02 / 0.06 = 2.667, PLAS 0.04 -> 0.06 at 4
    fcfs_bars, plas_bars = ax.containers[0], ax.containers[2]
    over_seeds = sum((4 + 2 * (0.06 - 0.03 * k) / (0.05 * k)) / (4 + 2 * (0.06 - 0.05 * k) / (0.25 * k))
                     for k in (0.9, 1.0, 1.1)) / 3  # the three seeds alone, as without the seedless run
    assert [round(b.get_height(), 3) for b in plas_bars] == [round(over_seeds, 3), round(4 / (2 + 2 * 0.02 / 0.06), 3)]
    assert [round(b.get_height(), 3) for b in fcfs_bars] == [1.0, 1.0]
    # a grid case that fixes one seed is a curve of its own, labelled with its seed
    lone = [r for r in seeded_rows() if r["seed"] == 0]
    ax = throughput_ratio_bars(lone + plain, 0.06).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bfcl seed=0", "bfcl"]


def test_mean_over_seeds_fails_a_point_that_some_seed_lacks():
    """An interrupted sweep, or tables put together, left seed 2 without a row at rate 6: the mean over the
    other two was drawn as the mean over seeds."""
    from sim.derived import mean_over_seeds

    seeded = [r for r in seeded_rows() if not (r["seed"] == 2 and r["rate"] == 6)]
    merged = {(r["policy"], r["rate"]): r for r in mean_over_seeds(seeded)}
    assert merged["fcfs", 6]["status"] == "failed" and merged["fcfs", 6]["normalized_latency_mean"] is None
    assert merged["plas", 6]["status"] == "failed"
    assert merged["fcfs", 4]["status"] == "ok" and merged["fcfs", 4]["normalized_latency_mean"] == pytest.approx(0.05)


def test_ratio_figure_keeps_curves_without_seeds_next_to_seeded_ones():
    from sim.sweep_plots import throughput_ratio_bars

    # a grid case over seeds (bfcl) and one that sets none (lats): both get bars
    plain = [{**r, "seed": None} for r in rows(workload="lats") if r["policy"] != "fcfs-unopt"]
    ax = throughput_ratio_bars(seeded_rows() + plain, 0.06).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bfcl", "lats"]
    # lats: FCFS 4 + 2 x 0.01 / 0.25 = 4.08; PLAS 4 + 2 x 0.03 / 0.05 = 5.2, a ratio of 1.275
    assert [round(b.get_height(), 3) for b in ax.patches][3] == round(5.2 / 4.08, 3)


def test_scaling_keeps_curves_that_differ_in_another_swept_key_apart():
    """Two models' points at one replica count were drawn as one line, two points per count."""
    from sim.sweep_plots import _scaling_series

    def with_model(r, model):
        out = {}
        for k, v in r.items():
            out[k] = v
            if k == "balancer":
                out["engine.model"] = model
        return out

    data = [with_model({**r, "replicas": n, "rate": r["rate"] * n}, m)
            for m in ("a", "b") for n in (1, 2) for r in rows()]
    series = _scaling_series(data, 0.06)
    assert sorted({w for w, _, _ in series}) == ["bfcl model=a", "bfcl model=b"]
    assert all([n for n, _ in pts] == [1, 2] for pts in series.values())


def test_figures_from_the_mean_over_seeds_use_the_table_s_target():
    """L is 2x the lowest light-load latency of any seed (0.9 x 0.02), as in the
    printed table, not 2x the mean curve's (0.02): the figures used 0.04."""
    from sim.derived import throughput_table
    from sim.sweep_plots import _scaling_series

    data = seeded_rows()
    assert [t.target for t in throughput_table(data, "2x")] == pytest.approx([0.036] * 6)
    (n, tp), = _scaling_series(data, "2x")["bfcl", "locality", "plas"]
    # the mean PLAS curve: 0.03 at 4/s, 0.08 at 6/s; 0.036 is crossed at 4 + 2 x 0.006 / 0.05
    assert n == 1 and tp.value == pytest.approx(4.24)


def test_ratio_bars_are_labelled_and_hatched_as_the_table_prints_them():
    """FCFS met the target at every rate: PLAS's ratio is an upper bound (the
    table's <=0.50x), drawn solid before; FCFS over itself is exactly 1 (it was hatched ~1.00)."""
    from sim.derived import throughput_table
    from sim.sweep_plots import throughput_ratio_bars

    data = []
    for policy, lats in (("fcfs", [0.01, 0.012, 0.014]), ("plas", [0.01, 0.03, 0.05])):
        for i, (rate, lat) in enumerate(zip([1, 2, 3], lats)):
            data.append({"sweep": "s", "point": i, "workload": "bfcl", "rate": rate, "replicas": 1,
                         "balancer": "locality", "variant": "default", "policy": policy, "scheduler": "fcfs",
                         "status": "ok", "normalized_latency_mean": lat})
    assert [t.ratios["fcfs"].text() for t in throughput_table(data, 0.02)] == ["1.00x", "<=0.50x"]
    ax = throughput_ratio_bars(data, 0.02).axes[0]
    assert [b.get_hatch() for b in ax.patches] == ["", "\\\\"]
    assert [t.get_text() for t in ax.texts] == ["1.00", "<=0.50"]


def test_a_figure_the_new_table_does_not_support_is_not_left_from_the_last(tmp_path):
    """The FCFS sweep's throughput_ratio stayed beside a later table's figures, which had no FCFS."""
    draw_all(rows(), tmp_path, "2x")
    assert (tmp_path / "throughput_ratio.png").exists()
    no_fcfs = [r for r in rows() if r["policy"] == "plas"]
    written = draw_all(no_fcfs, tmp_path, "2x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert not (tmp_path / "throughput_ratio.png").exists()


def with_programs(data, programs):
    """Rows as a sweep that also varies workload.params.programs writes them (the key before "variant")."""
    out = []
    for r in data:
        keys = list(r)
        at = keys.index("variant")
        out.append({**{k: r[k] for k in keys[:at]}, "workload.params.programs": programs, **{k: r[k] for k in keys[at:]}})
    return out


def test_a_program_count_that_does_not_follow_the_replicas_keeps_its_own_curves():
    """Both counts shared one label: two table lines read alike, and one scaling line zig-zagged over both."""
    from sim.derived import format_table, throughput_table
    from sim.sweep_plots import _scaling_series

    data = [r for n in (20, 60) for reps in (1, 2) for r in with_programs(rows(reps), n)]
    series = _scaling_series(data, "2x")
    assert sorted({k[0] for k in series}) == ["bfcl programs=20", "bfcl programs=60"]
    assert all([n for n, _ in pts] == [1, 2] for pts in series.values())
    labels = [line.split("  ")[0] for line in format_table(throughput_table(data, "2x")).splitlines()[2:-1]]
    assert sorted(set(labels)) == ["bfcl programs=20", "bfcl programs=60", "bfcl x2 locality programs=20",
                                   "bfcl x2 locality programs=60"]
    # Scaled with the replicas, as in the paper's sweeps, the count is no condition: left out.
    scaled = [r for reps in (1, 2) for r in with_programs(rows(reps), 500 * reps)]
    assert sorted({k[0] for k in _scaling_series(scaled, "2x")}) == ["bfcl"]
    labels = [line.split("  ")[0] for line in format_table(throughput_table(scaled, "2x")).splitlines()[2:-1]]
    assert sorted(set(labels)) == ["bfcl", "bfcl x2 locality"]
    # Both at once (a scaled case and one more count at one replica): decided once for the whole table,
    # so every label shows the count (a per-group rule gave the scaled x2 group a bare "bfcl" label
    # beside its x1 group's "bfcl programs=500"), and lines are by count.
    both = scaled + with_programs(rows(1), 1000)
    series = _scaling_series(both, "2x")
    assert {k[0]: [n for n, _ in pts] for k, pts in series.items() if k[2] == "plas"} == {
        "bfcl programs=500": [1], "bfcl programs=1000": [1, 2]}
    labels = [line.split("  ")[0] for line in format_table(throughput_table(both, "2x")).splitlines()[2:-1]]
    assert sorted(set(labels)) == ["bfcl programs=1000", "bfcl programs=500", "bfcl x2 locality programs=1000"]


def test_plotting_a_runs_directory_says_it_is_not_a_sweeps(tmp_path, capsys):
    """It read "/tmp/o2/sweep.csv: No such file or directory" for a `sim run` directory."""
    from sim.cli import main

    (tmp_path / "summary.json").write_text("{}")
    assert main(["plot", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path}: a run's results (summary.json), not a sweep's: sim plot "
                                       "draws the sweep.csv that python -m sim sweep writes; a run's own figure is "
                                       "its latency.png\n")
    assert not (tmp_path / "plots").exists()
