"""`run --seeds`: replications under several seeds, t intervals, paired ratios to FCFS."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import sim

from sim.cli import replication_table
from sim.confidence import Interval, t_interval
from sim.config import ConfigError, ExperimentConfig, WorkloadConfig
from sim.replications import seeds_of, summarize_replications

# Student t quantiles, two-sided 95% (tables give 4.303 and 2.776; these are
# scipy.stats.t.ppf(0.975, df) to 16 digits): df 2 and df 4.
T_975_DF2 = 4.302652729749464
T_975_DF4 = 2.7764451051977987

EXPERIMENTS = """\
experiments:
  small:
    workload:
      generator: bfcl
      params: {programs: 30, rate: 40.0}
    latency: {kind: constant, seconds: 0.005}
    engine: {max_num_seqs: 4}
    policies: [fcfs, plas]
    seed: 7
  replay:
    workload: {trace: t.jsonl}
"""


def test_t_interval_by_hand():
    # values 1, 2, 3: mean 2, sample sd 1, half-width t(0.975, 2) / sqrt(3).
    iv = t_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 / math.sqrt(3)
    assert iv.mean == 2.0
    assert iv.low == pytest.approx(2.0 - half, rel=1e-12)
    assert iv.high == pytest.approx(2.0 + half, rel=1e-12)
    assert iv.values == (1.0, 2.0, 3.0)
    # five values 0.9, 0.95, 1.0, 1.05, 1.1: sd sqrt(0.00625), so the 95% interval is
    # 1 +- 2.776 x 0.0790569 / sqrt(5) = 1 +- 0.098159; it includes 1 and excludes 0.9.
    iv = t_interval([0.9, 0.95, 1.0, 1.05, 1.1])
    assert iv.high - iv.mean == pytest.approx(T_975_DF4 * math.sqrt(0.00625 / 5), rel=1e-9)
    assert not iv.excludes(1.0) and iv.excludes(0.9)
    # a 90% interval is narrower
    assert t_interval([1.0, 2.0, 3.0], 0.90).high < t_interval([1.0, 2.0, 3.0]).high


@pytest.mark.parametrize(
    "values, confidence, message",
    [
        ([1.0], 0.95, "a confidence interval needs at least 2 values, got 1"),
        ([], 0.95, "a confidence interval needs at least 2 values, got 0"),
        ([1.0, 2.0], 1.0, "confidence must be in (0, 1), got 1.0"),
        ([1.0, 2.0], 0.0, "confidence must be in (0, 1), got 0.0"),
    ],
)
def test_t_interval_rejects(values, confidence, message):
    with pytest.raises(ValueError) as info:
        t_interval(values, confidence)
    assert str(info.value) == message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=20))
def test_t_interval_brackets_the_mean_and_is_shift_equivariant(values):
    iv = t_interval(values)
    assert iv.low <= iv.mean <= iv.high
    assert min(values) - 1e-6 <= iv.mean <= max(values) + 1e-6
    shifted = t_interval([v + 10.0 for v in values])
    assert shifted.mean == pytest.approx(iv.mean + 10.0, abs=1e-6)
    assert shifted.high - shifted.mean == pytest.approx(iv.high - iv.mean, rel=1e-6, abs=1e-6)
    if len(set(values)) == 1:
        assert iv.low == iv.high == iv.mean


def _summary(fcfs: float, plas: float | None) -> dict:
    return {
        "policies": {
            "fcfs": {"normalized_latency_mean": fcfs, "normalized_latency_mean_vs_fcfs": 1.0},
            "plas": {
                "normalized_latency_mean": plas,
                "normalized_latency_mean_vs_fcfs": None if plas is None else plas / fcfs,
            },
        }
    }


def test_ratios_are_paired_per_seed():
    # PLAS is 0.9x FCFS on every seed while FCFS itself varies 2x across
    # seeds: the paired ratio is exactly 0.9 with zero width, though the
    # unpaired means overlap.
    doc = summarize_replications("e", [0, 1, 2], [_summary(1.0, 0.9), _summary(2.0, 1.8), _summary(1.5, 1.35)])
    ratio = doc["policies"]["plas"]["normalized_latency_mean_vs_fcfs"]
    assert ratio["values"] == pytest.approx([0.9, 0.9, 0.9])
    assert ratio["mean"] == pytest.approx(0.9) and ratio["ci_high"] - ratio["ci_low"] == pytest.approx(0.0, abs=1e-12)
    fcfs, plas = doc["policies"]["fcfs"]["normalized_latency_mean"], doc["policies"]["plas"]["normalized_latency_mean"]
    assert plas["ci_high"] > fcfs["ci_low"]
    assert doc["seeds"] == [0, 1, 2] and doc["confidence"] == 0.95 and doc["experiment"] == "e"
    # metrics no seed has are null, not an interval over nothing
    assert doc["policies"]["fcfs"]["waiting_share_mean"] is None


def test_a_metric_missing_in_one_seed_is_null():
    doc = summarize_replications("e", [0, 1], [_summary(1.0, 0.9), _summary(2.0, None)])
    assert doc["policies"]["plas"]["normalized_latency_mean"] is None
    assert doc["policies"]["fcfs"]["normalized_latency_mean"]["values"] == [1.0, 2.0]


def test_seeds_of():
    cfg = ExperimentConfig(name="x", seed=3)
    assert seeds_of(cfg, 4) == [3, 4, 5, 6]
    with pytest.raises(ConfigError, match=r"--seeds 1: expected an integer from 2 to 1000 \(one seed is a plain run\)"):
        seeds_of(cfg, 1)
    traced = ExperimentConfig(name="x", workload=WorkloadConfig(generator=None, trace="t.jsonl"))
    with pytest.raises(ConfigError, match="replays the trace file t.jsonl, which the seed does not change"):
        seeds_of(traced, 2)


def test_replication_table():
    doc = summarize_replications("e", [0, 1, 2], [_summary(1.0, 0.9), _summary(2.0, 1.8), _summary(1.5, 1.35)])
    for p in doc["policies"].values():  # fill the columns the table shows
        p["normalized_latency_p95_vs_fcfs"] = None
        p["waiting_share_mean"] = Interval((0.1, 0.1), 0.1, 0.1, 0.1).to_json()
    lines = replication_table(doc).splitlines()
    assert lines[0].split()[:2] == ["policy", "norm"]
    assert lines[2].split()[0] == "plas" and "0.900 [0.900, 0.900]" in lines[2] and " - " in lines[2]
    assert lines[-1] == "mean [95% t-interval] over seeds 0..2; ratios paired per seed"


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    (tmp_path / "exp.yaml").write_text(EXPERIMENTS)
    return tmp_path


def test_seeds_end_to_end(workdir):
    res = sim("run", "small", "-e", "exp.yaml", "--seeds", "3", "--workers", "1", "--out", "r1", cwd=workdir)
    assert res.returncode == 0, res.stderr
    out = workdir / "r1"
    assert sorted(p.name for p in out.iterdir()) == ["replications.json", "seed-7", "seed-8", "seed-9"]
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["fcfs", "plas"]
    assert lines[-2] == "mean [95% t-interval] over seeds 7..9; ratios paired per seed"
    doc = json.loads((out / "replications.json").read_text())
    assert doc["seeds"] == [7, 8, 9]

    # each seed directory is exactly a plain run of the experiment with that seed
    plain = sim("run", "small", "-e", "exp.yaml", "--set", "seed=8", "-q", "--out", "plain8", cwd=workdir)
    assert plain.returncode == 0, plain.stderr
    for name in ("summary.json", "calls.csv", "programs.csv", "config.yaml"):
        assert (out / "seed-8" / name).read_bytes() == (workdir / "plain8" / name).read_bytes(), name

    # the document's values are the seeds' summaries, in seed order
    per_seed = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["policies"] for s in (7, 8, 9)]
    for policy in ("fcfs", "plas"):
        for metric in ("normalized_latency_mean", "normalized_latency_mean_vs_fcfs", "waiting_share_mean"):
            assert doc["policies"][policy][metric]["values"] == [p[policy][metric] for p in per_seed]
    assert len(set(doc["policies"]["fcfs"]["normalized_latency_mean"]["values"])) == 3  # the seeds differ

    # parallel workers give the same bytes
    par = sim("run", "small", "-e", "exp.yaml", "--seeds", "3", "--workers", "2", "-q", "--out", "r2", cwd=workdir)
    assert par.returncode == 0 and par.stdout == "" and par.stderr == "", par.stderr
    assert (workdir / "r2" / "replications.json").read_bytes() == (out / "replications.json").read_bytes()

    # fewer seeds into the same directory: the seed it no longer makes is removed, other files are not
    (out / "notes.txt").write_text("mine")
    (out / "seed-7" / "notes.txt").write_text("mine")
    fewer = sim("run", "small", "-e", "exp.yaml", "--seeds", "2", "-w", "1", "-q", "--set", "seed=8", "--out", "r1", cwd=workdir)
    assert fewer.returncode == 0, fewer.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "replications.json", "seed-7", "seed-8", "seed-9"]
    (out / "seed-7" / "notes.txt").unlink()
    fewer = sim("run", "small", "-e", "exp.yaml", "--seeds", "2", "-w", "1", "-q", "--set", "seed=8", "--out", "r1", cwd=workdir)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "replications.json", "seed-8", "seed-9"]

    # a plain run into the same directory removes the replicated run it would be mistaken for
    again = sim("run", "small", "-e", "exp.yaml", "-q", "--out", "r1", cwd=workdir)
    assert again.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["calls.csv", "config.yaml", "latency.png", "notes.txt", "programs.csv", "summary.json"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "small", "--seeds", "1"], "error: --seeds 1: expected an integer from 2 to 1000 (one seed is a plain run)"),
        (["run", "small", "--seeds", "100000000000"],
         "error: --seeds 100000000000: expected an integer from 2 to 1000 (one seed is a plain run)"),
        (["run", "small", "--seeds", "2", "--workers", "0"], "error: --workers 0: expected an integer >= 1"),
        (["run", "small", "--workers", "2"], "error: --workers 2: only with --seeds"),
        (["run", "replay", "--seeds", "2"], "error: --seeds: experiment 'replay' replays the trace file t.jsonl"),
    ],
)
def test_bad_seeds_are_one_line_and_exit_1(workdir, args, message):
    res = sim(*args, "-e", "exp.yaml", cwd=workdir)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(message), res.stderr
    assert not (workdir / "results").exists()


def test_a_seed_the_engine_cannot_hold_fails_before_anything_is_touched(workdir):
    """Seed 8 draws a 1,978-token call, past 120 blocks x 16; the rerun deleted replications.json and
    half-wrote the other seeds before, and did not say which seed failed."""
    first = sim("run", "small", "-e", "exp.yaml", "--seeds", "2", "-w", "2", "-q", "--out", "r", cwd=workdir)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in sorted((workdir / "r").rglob("*")) if p.is_file()}
    res = sim("run", "small", "-e", "exp.yaml", "--seeds", "2", "-w", "2", "-q", "--out", "r",
              "--set", "engine.num_gpu_blocks=120", cwd=workdir)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: --seeds: seed 8: --set engine.num_gpu_blocks=120: program ")
    assert "(1920 tokens)" in res.stderr
    assert {p: p.read_bytes() for p in sorted((workdir / "r").rglob("*")) if p.is_file()} == before


def test_a_killed_worker_is_one_line_and_cancels_the_rest(tmp_path, monkeypatch, capsys):
    """A seed whose worker the OS kills, even alone, ends the run with one line, not a traceback."""
    import sim.replications as replications
    from sim.cli import main

    (tmp_path / "exp.yaml").write_text(EXPERIMENTS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(replications, "_run_seed_task", _killed_seed)
    assert main(["run", "small", "-e", "exp.yaml", "--seeds", "4", "-w", "2", "-q", "--out", "k"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --seeds: seed 7: its worker died on each of its 3 tries, the last alone")
    assert err.rstrip().endswith("if memory ran out, use fewer --workers") and len(err.splitlines()) == 1
    assert not (tmp_path / "k" / "replications.json").exists()


def _killed_seed(task):
    """Stands in for a seed's run in a worker: the worker dies as under the OOM killer."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_a_seed_whose_worker_dies_once_runs_again(workdir, monkeypatch):
    """A dead worker stopped the whole run (``WorkerDied``), though the seed that was lost with
    it may well have been another's victim, or fit when run alone. Seeds now retry as sweep jobs
    do: seed 8's worker dies on its first try only, and the run gives the undisturbed bytes; a
    seed whose worker dies even alone stops the run with one line."""
    from sim.experiments import resolve
    from sim.replications import WorkerDied, run_replications
    from sweep_worker_death import DEADLY_SEEDS, ONCE_SEEDS, run_seed_or_die

    monkeypatch.chdir(workdir)
    assert ONCE_SEEDS == {8} and DEADLY_SEEDS == {20}
    cfg = resolve("small", "exp.yaml", [])
    run_replications(cfg, 3, workdir / "calm", workers=1, quiet=True)
    run_replications(cfg, 3, workdir / "stormy", workers=2, quiet=True, run=run_seed_or_die)
    assert (workdir / "stormy" / "seed-8.died").exists()  # it did die once
    calm, stormy = ((workdir / d / "replications.json").read_bytes() for d in ("calm", "stormy"))
    assert stormy == calm

    cfg = resolve("small", "exp.yaml", ["seed=19"])
    with pytest.raises(WorkerDied, match=r"^--seeds: seed 20: its worker died on each of its 3 tries, the last "
                                         r"alone \(BrokenProcessPool: .*\); if memory ran out, use fewer --workers$"):
        run_replications(cfg, 3, workdir / "doomed", workers=2, quiet=True, run=run_seed_or_die)
