"""Sweep figures: drawn from rows alone, byte-identical for the same rows, scaling only when it varies."""

from __future__ import annotations

import matplotlib

from sim.sweep_plots import breakdown_loads, draw_all, has_scaling
from sim.derived import curves


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
