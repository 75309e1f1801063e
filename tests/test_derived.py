"""Throughput at a latency target: interpolation and edge cases against hand-computed values."""

from __future__ import annotations

import math

import pytest

from sim.derived import (
    Ratio,
    Throughput,
    format_table,
    parse_target,
    ratio,
    tail_table,
    throughput_at,
    throughput_table,
)
from sim.sweep_table import curves, group_label


def test_interpolates_between_the_bracketing_rates():
    # L = 0.05 lies between 0.04 at rate 2 and 0.10 at rate 3: 2 + (0.01 / 0.06) * 1
    t = throughput_at([1, 2, 3, 4], [0.02, 0.04, 0.10, 0.5], 0.05)
    assert t.bound == "exact"
    assert t.value == pytest.approx(2 + 1 / 6)


def test_unsorted_input_and_exact_hit():
    t = throughput_at([4, 1, 3, 2], [0.5, 0.02, 0.10, 0.05], 0.05)
    assert t.value == pytest.approx(2.0) and t.bound == "exact"  # 0.05 at rate 2 is within L


def test_stays_below_means_first_crossing():
    # Above L at rate 2, back under at 3 (noise): the policy already failed at 2.
    t = throughput_at([1, 2, 3], [0.01, 0.09, 0.03], 0.05)
    assert t.value == pytest.approx(1 + (0.04 / 0.08))


def test_never_above_is_a_lower_bound_at_the_highest_rate():
    assert throughput_at([1, 2, 3], [0.01, 0.02, 0.03], 0.05) == Throughput(3, "lower")


def test_always_above_is_none():
    t = throughput_at([1, 2, 3], [0.06, 0.07, 0.08], 0.05)
    assert t.value is None and t.bound == "none"


def test_a_failed_point_before_the_crossing_ends_the_walk_as_a_lower_bound():
    # rate 2 failed (None) and rate 3 is NaN: the latency there is unknown,
    # perhaps over the target, so interpolating 1..4 (2.5) would overstate.
    assert throughput_at([1, 2, 3, 4], [0.02, None, math.nan, 0.08], 0.05) == Throughput(1, "lower")
    assert throughput_at([4, 2, 1], [0.08, math.nan, 0.02], 0.05) == Throughput(1, "lower")  # any order
    # past the crossing a failure changes nothing
    t = throughput_at([1, 2, 3, 4], [0.02, 0.08, None, 0.09], 0.05)
    assert t.bound == "exact" and t.value == pytest.approx(1.5)
    # at the top: the last finished rate is still only a lower bound
    assert throughput_at([1, 2, 3], [0.01, 0.02, None], 0.05) == Throughput(2, "lower")
    # at the bottom, or everywhere: nothing was measured as sustainable
    assert throughput_at([1, 2], [None, 0.01], 0.05) == Throughput(None, "none")
    assert throughput_at([1, 2], [None, None], 0.05).bound == "none"


def test_single_rate():
    assert throughput_at([2], [0.01], 0.05) == Throughput(2, "lower")
    assert throughput_at([2], [0.09], 0.05).value is None


def test_ratio_bounds():
    assert ratio(Throughput(4, "exact"), Throughput(2, "exact")) == Ratio(2.0, "exact")
    assert ratio(Throughput(4, "lower"), Throughput(2, "exact")) == Ratio(2.0, "lower")
    assert ratio(Throughput(4, "exact"), Throughput(2, "lower")) == Ratio(2.0, "upper")
    assert ratio(Throughput(4, "lower"), Throughput(2, "lower")) == Ratio(2.0, "unknown")
    assert ratio(Throughput(4, "exact"), Throughput(None, "none")).value is None
    assert ratio(Throughput(None, "none"), Throughput(2, "exact")).value is None


@pytest.mark.parametrize("text, expected", [(None, (2.0, True)), ("3x", (3.0, True)), ("0.05", (0.05, False)), (0.1, (0.1, False))])
def test_parse_target(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "-1x", "nan"])
def test_parse_target_rejects(text):
    with pytest.raises(ValueError, match="--target"):
        parse_target(text)


@pytest.mark.parametrize("text", ["inf", "1e400", "infx"])
def test_an_infinite_target_is_called_not_finite(text):
    """It read "must be > 0" of a value that is."""
    with pytest.raises(ValueError) as info:
        parse_target(text)
    assert str(info.value) == f"--target {text}: must be a finite number > 0"


def rows(workload, policy, rates, lats, status="ok"):
    return [
        {
            "sweep": "s", "point": i, "workload": workload, "rate": r, "replicas": 1, "balancer": "locality",
            "variant": "default", "policy": policy, "scheduler": policy.split("-")[0], "status": status,
            "normalized_latency_mean": lat, "normalized_latency_p95": 2 * lat, "normalized_latency_p99": 3 * lat,
        }
        for i, (r, lat) in enumerate(zip(rates, lats))
    ]


def test_table_ratios_per_workload_with_absolute_and_relative_targets():
    data = (
        rows("bfcl", "fcfs", [2, 4, 6], [0.02, 0.06, 0.2])
        + rows("bfcl", "plas", [2, 4, 6], [0.02, 0.03, 0.06])
        + rows("bfcl", "mlfq", [2, 4, 6], [0.02, 0.04, 0.1])
        + rows("lats", "fcfs", [1, 2], [0.5, 2.0])
        + rows("lats", "plas", [1, 2], [0.5, 0.6])
    )
    table = {(dict(t.group)["workload"], t.policy): t for t in throughput_table(data, "0.04")}
    # bfcl: fcfs 2 + 0.02/0.04*2 = 3; plas 4 + 0.01/0.03*2 = 4.667; mlfq exactly 4
    assert table["bfcl", "fcfs"].throughput.value == pytest.approx(3.0)
    assert table["bfcl", "plas"].throughput.value == pytest.approx(4 + 2 / 3)
    assert table["bfcl", "mlfq"].throughput.value == pytest.approx(4.0)
    assert table["bfcl", "plas"].ratios["fcfs"].value == pytest.approx((4 + 2 / 3) / 3)
    assert table["bfcl", "plas"].ratios["mlfq"].value == pytest.approx((4 + 2 / 3) / 4)
    assert table["lats", "fcfs"].throughput.value is None  # 0.5 > 0.04 at the lowest rate
    assert "mlfq" not in table["lats", "plas"].ratios
    # Relative 2x: lats L = 1.0 -> fcfs 1 + 0.5/1.5 = 1.333, plas >= 2
    rel = {(dict(t.group)["workload"], t.policy): t for t in throughput_table(data, "2x")}
    assert rel["lats", "fcfs"].target == pytest.approx(1.0)
    assert rel["lats", "fcfs"].throughput.value == pytest.approx(1 + 1 / 3)
    assert rel["lats", "plas"].throughput == Throughput(2, "lower")
    assert rel["lats", "plas"].ratios["fcfs"] == Ratio(pytest.approx(1.5), "lower")
    text = format_table(throughput_table(data, "2x"))
    assert ">=1.50x" in text and "vs fcfs" in text and "vs mlfq" in text


def test_failed_rows_do_not_count():
    data = rows("bfcl", "fcfs", [2, 4], [0.02, 0.03]) + rows("bfcl", "fcfs", [6], [0.01], status="failed")
    [t] = throughput_table(data, "0.05")
    assert t.throughput == Throughput(4, "lower")


def test_tail_table_against_rate():
    data = rows("bfcl", "fcfs", [4, 2], [0.03, 0.02])
    assert tail_table(data) == [("bfcl", "fcfs", 2, 0.04, pytest.approx(0.06)), ("bfcl", "fcfs", 4, 0.06, pytest.approx(0.09))]


def test_other_swept_keys_split_curves_when_read_back(tmp_path):
    from sim.sweep_table import load_rows

    header = "sweep,point,workload,rate,replicas,balancer,engine.max_num_seqs,variant,policy,scheduler,status,normalized_latency_mean,new_metric\n"
    body = "".join(
        f"s,{i},bfcl,{rate},1,locality,{seqs},default,fcfs,fcfs,ok,{lat},{i * 7}\n"
        for i, (rate, seqs, lat) in enumerate([(1, 64, 0.02), (2, 64, 0.06), (1, 256, 0.02), (2, 256, 0.03)])
    )
    (tmp_path / "sweep.csv").write_text(header + body)
    rows = load_rows(tmp_path)
    assert rows[0]["rate"] == 1 and rows[0]["workload"] == "bfcl" and rows[0]["normalized_latency_mean"] == 0.02
    table = throughput_table(rows, "0.04")
    assert [(dict(t.group)["engine.max_num_seqs"], t.throughput.text()) for t in table] == [(64, "1.5"), (256, ">=2")]


def test_curves_from_two_sweeps_at_different_rates(tmp_path):
    from sim.sweep_table import load_rows
    from sim.sweep_run import csv_text

    cols = ["sweep", "point", "workload", "rate", "replicas", "balancer", "variant", "policy", "scheduler", "status", "normalized_latency_mean"]
    opt = rows("bfcl", "fcfs", [4, 8, 12], [0.02, 0.03, 0.2])
    unopt = rows("bfcl", "fcfs-unopt", [0.5, 1, 2], [0.1, 0.15, 0.4])
    for name, data in (("a", opt), ("b", unopt)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.csv").write_text(csv_text(cols, data))
    both = load_rows([tmp_path / "a", tmp_path / "b"])
    assert len(both) == 6
    # 2x: L = 2 x 0.02 (FCFS at its own lowest rate 4/s), which unopt never reaches
    table = {t.policy: t for t in throughput_table(both, "2x")}
    assert table["fcfs"].target == pytest.approx(0.04)
    assert table["fcfs-unopt"].throughput.value is None
    # 0.2: fcfs exactly 12; unopt 1 + (0.05 / 0.25) * 1 = 1.2; ratio 10
    table = {t.policy: t for t in throughput_table(both, "0.2")}
    assert table["fcfs"].throughput.value == pytest.approx(12.0)
    assert table["fcfs-unopt"].throughput.value == pytest.approx(1.2)
    assert table["fcfs"].ratios["fcfs-unopt"].value == pytest.approx(10.0)


def test_relative_target_is_shared_by_a_workloads_groups():
    rr = [dict(r, replicas=4, balancer="round_robin") for r in rows("mixed", "atlas", [2, 4, 6], [0.034, 0.058, 0.071])]
    loc = [dict(r, replicas=4, balancer="locality") for r in rows("mixed", "atlas", [2, 4, 6], [0.030, 0.045, 0.054])]
    table = {dict(t.group)["balancer"]: t for t in throughput_table(rr + loc, "2x")}
    assert table["round_robin"].target == table["locality"].target == pytest.approx(0.06)
    # round robin: 4 + (0.002 / 0.013) * 2; locality never above 0.06
    assert table["round_robin"].throughput.value == pytest.approx(4 + 2 * 0.002 / 0.013)
    assert table["locality"].throughput == Throughput(6, "lower")


def seeded(seed, policy, lats, workload="bfcl"):
    """Rows of a sweep over ``seed``, which sits with the other swept keys before ``variant``."""
    return [
        {
            "sweep": "s", "point": i, "workload": workload, "rate": r, "replicas": 1, "balancer": "locality",
            "seed": seed, "variant": "default", "policy": policy, "scheduler": policy, "status": "ok",
            "normalized_latency_mean": lat,
        }
        for i, (r, lat) in enumerate(zip([2, 4, 6], lats))
    ]


def test_seed_table_pairs_ratios_within_seeds():
    from sim.derived import format_seed_table, seed_table

    data = (
        seeded(0, "fcfs", [0.02, 0.06, 0.2]) + seeded(0, "plas", [0.02, 0.03, 0.06])
        + seeded(1, "fcfs", [0.02, 0.04, 0.2]) + seeded(1, "plas", [0.02, 0.03, 0.05])
        + seeded(2, "fcfs", [0.02, 0.05, 0.2]) + seeded(2, "plas", [0.02, 0.035, 0.045])
    )
    # By hand at L = 0.04: FCFS 3, 4 and 2 + (0.02 / 0.03) * 2 = 3.333; PLAS 4 + (0.01 / 0.03) * 2 = 4.667,
    # 4 + (0.01 / 0.02) * 2 = 5 and 4 + (0.005 / 0.01) * 2 = 5; ratios per seed 1.556, 1.25, 1.5.
    table = throughput_table(data, "0.04")
    assert len(table) == 6  # one curve per seed and policy
    over = {t.policy: t for t in seed_table(table)}
    assert dict(over["plas"].group) == {"workload": "bfcl", "replicas": 1, "balancer": "locality"}
    assert over["plas"].seeds == (0, 1, 2) and over["plas"].inexact() == ""
    assert over["fcfs"].throughput.values == pytest.approx((3.0, 4.0, 10 / 3))
    assert over["plas"].throughput.mean == pytest.approx((14 / 3 + 5 + 5) / 3)
    r = over["plas"].ratios["fcfs"]
    assert r.values == pytest.approx((14 / 9, 1.25, 1.5))
    assert r.mean == pytest.approx((14 / 9 + 1.25 + 1.5) / 3) and r.low < r.mean < r.high
    text = format_seed_table(list(over.values()))
    assert "1.44x [" in text and "ratios paired per seed" in text

    # A seed where PLAS meets L at every rate gives a bound: no interval, and the count says so.
    data[-3:] = seeded(2, "plas", [0.02, 0.03, 0.03])
    over = {t.policy: t for t in seed_table(throughput_table(data, "0.04"))}
    assert over["plas"].throughput is None and over["plas"].inexact() == ">= in 1/3"
    assert over["plas"].ratios["fcfs"] is None and over["fcfs"].ratios["fcfs"] is not None
    text = format_seed_table(list(over.values()))
    assert ">= in 1/3" in text and "n/a" in text


def test_a_sweep_of_one_variant_compares_with_that_variants_fcfs():
    from sim.derived import baselines_of, format_seed_table, format_rate_ratio_table, rate_ratio_table, seed_table

    def relabel(data, variant):
        return [{**r, "variant": variant, "policy": f"{r['policy']}-{variant}"} for r in data]

    plain = (
        seeded(0, "fcfs", [0.02, 0.06, 0.2]) + seeded(0, "plas", [0.02, 0.03, 0.06])
        + seeded(1, "fcfs", [0.02, 0.04, 0.2]) + seeded(1, "plas", [0.02, 0.03, 0.05])
    )
    only_async = relabel(plain, "async")
    # Every ratio, interval and table equals the plain sweep's, labels apart.
    plain_tp, async_tp = throughput_table(plain, "0.04"), throughput_table(only_async, "0.04")
    assert [sorted(t.ratios) for t in async_tp] == [["fcfs-async"]] * 4
    assert [t.ratios["fcfs-async"] for t in async_tp] == [t.ratios["fcfs"] for t in plain_tp]
    over = {t.policy: t for t in seed_table(async_tp)}
    assert over["plas-async"].ratios["fcfs-async"].values == pytest.approx((14 / 9, 1.25))
    assert "vs fcfs-async" in format_seed_table(list(over.values())).splitlines()[0]
    baseline, table = rate_ratio_table(only_async)
    assert baseline == "fcfs-async"
    assert [t.ratio.values for t in table if t.policy == "plas-async"] == [
        t.ratio.values for t in rate_ratio_table(plain)[1] if t.policy == "plas"
    ]
    assert "vs fcfs-async" in format_rate_ratio_table(baseline, table).splitlines()[0]
    # Beside plain rows the plain baselines stay the reference (a variant is judged against vLLM's own FCFS).
    both = throughput_table(plain + only_async, "0.04")
    assert {b for t in both for b in t.ratios} == {"fcfs"}
    assert rate_ratio_table(plain + only_async)[0] == "fcfs"
    # Two variants and no plain rows: no common reference, so no ratio rather than a guess.
    assert baselines_of(["fcfs-a", "plas-a", "fcfs-b"]) == ()
    assert baselines_of(["plas-x", "mlfq-x", "fcfs-x"]) == ("fcfs-x", "mlfq-x")
    assert baselines_of(["plas", "srpt"]) == () and baselines_of(["fcfs-unopt", "plas"]) == ("fcfs-unopt",)


def test_seed_table_needs_a_swept_seed_with_two_values():
    from sim.derived import seed_table

    assert seed_table(throughput_table(rows("bfcl", "fcfs", [2, 4], [0.02, 0.06]), "0.04")) == []
    assert seed_table(throughput_table(seeded(0, "fcfs", [0.02, 0.06, 0.2]), "0.04")) == []


def test_rate_ratio_table_pairs_latency_within_seeds_at_each_rate():
    from sim.derived import format_rate_ratio_table, rate_ratio_table

    data = (
        seeded(0, "fcfs", [0.02, 0.06, 0.2]) + seeded(0, "plas", [0.02, 0.03, 0.06])
        + seeded(1, "fcfs", [0.02, 0.04, 0.2]) + seeded(1, "plas", [0.02, 0.03, 0.05])
        + seeded(2, "fcfs", [0.02, 0.05, 0.2]) + seeded(2, "plas", [0.02, 0.035, 0.045])
    )
    baseline, table = rate_ratio_table(data)
    assert baseline == "fcfs"
    assert [(t.rate, t.policy, t.seeds) for t in table] == [
        (r, p, (0, 1, 2)) for r in (2, 4, 6) for p in ("fcfs", "plas")
    ]
    at = {(t.rate, t.policy): t for t in table}
    assert dict(at[4, "plas"].group) == {"workload": "bfcl", "replicas": 1, "balancer": "locality"}
    # By hand at rate 4: PLAS 0.03, 0.03, 0.035 against FCFS 0.06, 0.04, 0.05, so ratios 0.5, 0.75, 0.7.
    assert at[4, "plas"].latency.mean == pytest.approx(0.095 / 3)
    assert at[4, "plas"].ratio.values == pytest.approx((0.5, 0.75, 0.7))
    assert at[4, "plas"].ratio.mean == pytest.approx(0.65) and at[4, "plas"].ratio.low < 0.65 < at[4, "plas"].ratio.high
    # At rate 2 both give 0.02 on every seed: exactly 1 with no width.
    assert (at[2, "plas"].ratio.mean, at[2, "plas"].ratio.low, at[2, "plas"].ratio.high) == (1, 1, 1)
    assert at[4, "fcfs"].ratio is None and at[4, "fcfs"].latency.values == pytest.approx((0.06, 0.04, 0.05))
    text = format_rate_ratio_table(baseline, table)
    assert "0.650x [" in text and "baseline" in text and "ratios paired per seed" in text

    # A failed run leaves its own latency and every ratio that needs it without an interval, nothing else.
    data[2]["status"] = "failed"  # seed 0, FCFS, rate 6
    at = {(t.rate, t.policy): t for t in rate_ratio_table(data)[1]}
    assert at[6, "fcfs"].latency is None and at[6, "plas"].ratio is None
    assert at[6, "plas"].latency.values == pytest.approx((0.06, 0.05, 0.045))
    data[11]["status"] = "failed"  # seed 1, PLAS, rate 6
    at = {(t.rate, t.policy): t for t in rate_ratio_table(data)[1]}
    assert at[6, "plas"].latency is None and at[6, "plas"].ratio is None
    assert at[4, "plas"].ratio.mean == pytest.approx(0.65)
    assert "n/a" in format_rate_ratio_table("fcfs", list(at.values()))


def test_rate_ratio_table_needs_seeds_and_falls_back_to_the_next_baseline():
    from sim.derived import format_rate_ratio_table, rate_ratio_table

    assert rate_ratio_table(rows("bfcl", "fcfs", [2, 4], [0.02, 0.06])) == (None, [])
    assert rate_ratio_table(seeded(0, "fcfs", [0.02, 0.06, 0.2])) == ("fcfs", [])  # one seed: no interval
    baseline, table = rate_ratio_table(seeded(0, "mlfq", [0.02, 0.06, 0.2]) + seeded(1, "mlfq", [0.02, 0.04, 0.1])
                                       + seeded(0, "plas", [0.02, 0.03, 0.1]) + seeded(1, "plas", [0.02, 0.04, 0.1]))
    assert baseline == "mlfq"
    plas = [(t.rate, *t.ratio.values) for t in table if t.policy == "plas"]
    assert [r for r, *_ in plas] == [2, 4, 6]
    assert [v for _, *vs in plas for v in vs] == pytest.approx([1, 1, 0.5, 1, 0.5, 1])
    # Without a baseline the rows keep their latency and give no ratio at all.
    baseline, table = rate_ratio_table(seeded(10, "plas", [0.02, 0.03, 0.1]) + seeded(2, "plas", [0.02, 0.04, 0.1]))
    assert baseline is None and [t.seeds for t in table] == [(2, 10)] * 3 and all(t.ratio is None for t in table)
    assert "n/a" not in format_rate_ratio_table(baseline, table).splitlines()[1]


HEADER = "sweep,point,workload,rate,replicas,balancer,variant,policy,scheduler,status,normalized_latency_mean,error\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok,0.02,\ns,1,bfcl,2,1,loc", ":3: expected 12 columns as in the header, got 6"),
        (HEADER.encode() + b"s,0,bfcl,abc,1,locality,default,fcfs,fcfs,ok,0.02,\n", ":2: column 'rate': expected a number, got 'abc'"),
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok,zz,\n", ":2: column 'normalized_latency_mean': expected a number, got 'zz'"),
        (HEADER.encode() + b"s,0,bfcl\xff,1,1,locality,default,fcfs,fcfs,ok,0.02,\n", ":2: not UTF-8 text (invalid start byte)"),
        (b"a,b\n1,2\n", ":1: not a sweep table (python -m sim sweep writes one): missing column(s) workload, rate, balancer, "
                        "variant, policy, status, normalized_latency_mean"),
        # without balancer and variant the swept keys between them cannot be found: seeds' curves merged
        (HEADER.replace("balancer,", "").encode() + b"s,0,bfcl,1,1,default,fcfs,fcfs,ok,0.02,\n",
         ":1: not a sweep table (python -m sim sweep writes one): missing column(s) balancer"),
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok,nan,\n", ":2: column 'normalized_latency_mean': expected a finite number >= 0, got 'nan'"),
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok,-1,\n", ":2: column 'normalized_latency_mean': expected a finite number >= 0, got '-1'"),
        (HEADER.encode() + b"s,0,bfcl,inf,1,locality,default,fcfs,fcfs,ok,0.02,\n", ":2: column 'rate': expected a finite number >= 0, got 'inf'"),
        # int() and float() took these: 1_0 read as 10, a padded or Arabic-Indic number as one
        (HEADER.encode() + b"s,0,bfcl,1_0,1,locality,default,fcfs,fcfs,ok,0.02,\n", ":2: column 'rate': expected a number, got '1_0'"),
        (HEADER.encode() + b"s,0,bfcl, 5 ,1,locality,default,fcfs,fcfs,ok,0.02,\n", ":2: column 'rate': expected a number, got ' 5 '"),
        (HEADER.encode() + "s,0,bfcl,\u0661,1,locality,default,fcfs,fcfs,ok,0.02,\n".encode(),
         ":2: column 'rate': expected a number, got '\u0661'"),
        # OverflowError tracebacks: math.isfinite of an integer past a float
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok," + b"9" * 4000 + b",\n",
         ":2: column 'normalized_latency_mean': expected a finite number >= 0, got '999"),
        # TypeError in the table; and _csv.Error past the field limit (a sweep wrote such an error cell)
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,,fcfs,ok,0.02,\n",
         ":2: column 'policy': empty; every row of a sweep's table names its policy"),
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,failed,," + b"x" * 200_000 + b"\n",
         ":2: not a CSV record as sim sweep writes them (field larger than field limit (131072))"),
        # anything but ok was read as a point that did not finish: the throughput moved, exit 0
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok,0.02,\ns,1,bfcl,2,1,locality,default,fcfs,fcfs,OK,0.03,\n",
         ":3: column 'status': expected one of ok, failed, invalid, got 'OK'"),
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,weird,0.02,\n",
         ":2: column 'status': expected one of ok, failed, invalid, got 'weird'"),
        (HEADER.encode() + b"s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok,,\n",
         ":2: column 'normalized_latency_mean': empty on an 'ok' row; a finished point has its latency"),
    ],
    ids=["truncated", "text-rate", "text-metric", "not-utf8", "other-csv", "no-balancer", "nan-metric", "negative-metric",
         "inf-rate", "underscore", "padded", "arabic-indic", "huge-int", "empty-policy", "huge-field",
         "status-case", "status-unknown", "ok-without-latency"],
)
def test_a_table_that_is_not_a_sweeps_is_a_located_error(tmp_path, content, message):
    from sim.sweep_table import TableError, load_rows

    (tmp_path / "sweep.csv").write_bytes(content)
    with pytest.raises(TableError) as info:
        load_rows(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'sweep.csv'}{message}")


def test_two_rows_of_one_curve_at_one_rate_are_an_error(tmp_path):
    """A table given twice, or one whose seed column was cut: the rows of several curves would be merged silently."""
    from sim.sweep_table import TableError, load_rows

    header = HEADER.replace("balancer,", "balancer,seed,")
    (tmp_path / "sweep.csv").write_text(header + "s,0,bfcl,1,1,locality,0,default,fcfs,fcfs,ok,0.02,\n"
                                                  "s,1,bfcl,1,1,locality,1,default,fcfs,fcfs,ok,0.03,\n")
    assert len(curves(load_rows(tmp_path))) == 2  # one curve per seed
    (tmp_path / "cut.csv").write_text(HEADER + "s,0,bfcl,1,1,locality,default,fcfs,fcfs,ok,0.02,\n"
                                               "s,1,bfcl,1,1,locality,default,fcfs,fcfs,ok,0.03,\n")
    # Found where the rows are read, so the message names the file and line of both.
    cut, table = tmp_path / "cut.csv", tmp_path / "sweep.csv"
    with pytest.raises(TableError) as info:
        load_rows(cut)
    assert str(info.value) == (f"{cut}:3: policy 'fcfs' at rate 1 of bfcl is already at {cut}:2: "
                               f"a table given twice, or a swept key's column removed?")
    with pytest.raises(TableError) as info:
        load_rows([table, table])
    assert str(info.value).startswith(f"{table}:2: policy 'fcfs' at rate 1 of bfcl seed=0 is already at {table}:2: ")
    # curves keeps its own check, for rows that come from elsewhere
    with pytest.raises(TableError, match=r"^sweep 's' point 0 and sweep 's' point 0 are both"):
        curves(load_rows(table) + load_rows(table))


def test_text_in_other_swept_keys_and_error_is_kept(tmp_path):
    from sim.sweep_table import load_rows

    header = "sweep,point,workload,rate,replicas,balancer,engine.model,variant,policy,scheduler,status,normalized_latency_mean,error\n"
    (tmp_path / "sweep.csv").write_text(header + "s,0,bfcl,1,1,locality,llama-3.1-8b,default,fcfs,fcfs,failed,,boom\n")
    (row,) = load_rows(tmp_path)
    assert row["engine.model"] == "llama-3.1-8b" and row["error"] == "boom" and row["normalized_latency_mean"] is None


def test_a_sweep_json_nested_too_deeply_is_a_warning_not_a_traceback(tmp_path):
    from sim.sweep_table import unfinished_sweeps

    (tmp_path / "sweep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert unfinished_sweeps(tmp_path) == [
        f"{tmp_path / 'sweep.json'}: cannot tell whether the sweep finished (JSON nested too deeply)"]


@pytest.mark.parametrize("text", ["1_0x", "\u0662x", "0.1_0", " 2x", "+2x", "02x", "x", ""])
def test_a_target_is_read_as_strictly_as_every_numeric_option(text):
    """float() took "1_0x" as 10x and an Arabic-Indic two as 2x."""
    with pytest.raises(ValueError, match="--target"):
        parse_target(text)


def test_a_baseline_against_itself_is_exactly_one_even_as_a_lower_bound():
    """Two lower bounds give an unknown ratio, but a curve over itself is 1: it printed ~1.00x."""
    data = rows("bfcl", "fcfs", [2, 4], [0.01, 0.02]) + rows("bfcl", "plas", [2, 4], [0.01, 0.015])
    table = {t.policy: t for t in throughput_table(data, "0.04")}
    assert table["fcfs"].throughput == Throughput(4, "lower")
    assert table["fcfs"].ratios["fcfs"] == Ratio(1.0, "exact")
    assert table["plas"].ratios["fcfs"] == Ratio(1.0, "unknown")  # two lower bounds: unknown
    none = {t.policy: t for t in throughput_table(data, "0.001")}  # met at no rate: no ratio at all
    assert none["fcfs"].ratios["fcfs"].value is None


def test_single_replica_groups_that_differ_in_the_balancer_alone_get_their_own_labels():
    """One replica's balancer is hidden, so two such curves printed one label twice."""
    data = rows("bfcl", "fcfs", [1, 2], [0.01, 0.02])
    other = [dict(r, balancer="round_robin") for r in data]
    text = format_table(throughput_table(data + other, "2x"))
    labels = [line.split()[0:2] for line in text.splitlines()[2:4]]
    assert labels == [["bfcl", "locality"], ["bfcl", "round_robin"]]
    # A lone balancer stays hidden at one replica; several replicas always show it.
    assert group_label((("workload", "bfcl"), ("replicas", 1), ("balancer", "locality"))) == "bfcl"
    assert group_label((("workload", "bfcl"), ("replicas", 2), ("balancer", "locality"))) == "bfcl x2 locality"
