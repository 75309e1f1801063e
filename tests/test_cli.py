"""`python -m sim`: help, list, and one-line errors with the right exit status for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.cli import main, result_table

ROOT = Path(__file__).resolve().parent.parent

EXPERIMENTS = """\
experiments:
  tiny:
    description: a tiny one
    workload: {trace: t.jsonl}
    latency: {kind: constant, seconds: 0.01}
    engine: {gpus_per_replica: 1}  # so 70B does not fit
    policies: [fcfs, plas]
  other:
    workload: {trace: t.jsonl}
"""


def sim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sim", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    (tmp_path / "exp.yaml").write_text(EXPERIMENTS)
    return tmp_path


def test_help_has_examples_for_each_subcommand(capsys):
    for args in ([], ["run"], ["list"]):
        with pytest.raises(SystemExit) as info:
            main([*args, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "python -m sim" in out


def test_list(workdir):
    res = sim("list", "--experiments", "exp.yaml", cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["tiny   a tiny one", "other"]


def test_list_default_file_is_the_shipped_one(tmp_path):
    res = sim("list", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert names[0] == "quickstart" and "constant-latency-check" in names


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nope", "-e", "exp.yaml"], "error: exp.yaml: unknown experiment 'nope'; experiments: tiny, other"),
        (["run", "tiny", "-e", "exp.yaml", "--set", "engine.replica=2"], "error: --set engine.replica=2: experiment 'tiny': engine.replica: unknown key"),
        (["run", "tiny", "-e", "exp.yaml", "--set", "policies=[fcfs,lifo]"], "error: --set policies=[fcfs,lifo]: experiment 'tiny': policies[1]: unknown value 'lifo'"),
        (["run", "tiny", "-e", "exp.yaml", "-s", "engine.model=llama-3.1-70b"], "error: --set engine.model=llama-3.1-70b: experiment 'tiny': engine.model: llama-3.1-70b does not fit"),
        (["run", "tiny", "-e", "exp.yaml", "-s", "replicas"], "error: --set replicas: expected KEY=VALUE"),
        (["run", "tiny", "-e", "exp.yaml", "-s", "latency.seconds=.inf"],
         "error: --set latency.seconds=.inf: experiment 'tiny': latency.seconds: expected a finite number, got inf"),
        (["list", "-e", "missing.yaml"], "error: missing.yaml: experiments file not found"),
        (["run", "paper-single-seeds", "-e", str(ROOT / "experiments.yaml")],
         f"error: {ROOT / 'experiments.yaml'}: unknown experiment 'paper-single-seeds' ('paper-single-seeds' is a "
         "sweep of this file, which python -m sim sweep runs); experiments: "),
        (["sweep", "quickstart", "-e", str(ROOT / "experiments.yaml")],
         f"error: {ROOT / 'experiments.yaml'}: unknown sweep 'quickstart' ('quickstart' is an experiment of this file, "
         "which python -m sim run runs); sweeps: "),
        (["run", "tiny", "-e", "exp.yaml", "--out", ""], "error: --out '': expected a directory path"),
        (["run", "tiny", "-e", "exp.yaml", "--out", "exp.yaml"], "error: --out exp.yaml: exists and is not a directory"),
        # It read "error: exp.yaml/sub: Not a directory", naming no option.
        (["run", "tiny", "-e", "exp.yaml", "--out", "exp.yaml/sub"], "error: --out exp.yaml/sub: "),
        (["run", "tiny", "-e", "exp.yaml", "-s", "latency.seconds='1_000'"],
         "error: --set latency.seconds='1_000': experiment 'tiny': latency.seconds: expected a number, got '1_000'"),
        (["run", "tiny", "-e", "exp.yaml", "-s", "workload.trace=."],
         "error: --set workload.trace=.: experiment 'tiny': workload.trace: . is a directory, expected a trace file"),
        (["run", "tiny", "-e", "exp.yaml", "-q"], "error: t.jsonl: no programs to simulate (the trace is empty)"),
        (["run", "tiny", "-e", "exp.yaml", "-q", "-s", "workload.generator=bfcl", "-s", "workload.params={programs: 600, rate: 1.0e-8}"],
         "error: --set workload.params={programs: 600, rate: 1.0e-8}: experiment 'tiny': workload.params: rate 1e-08 "
         "is too low for 600 programs: the last would arrive at"),
        # Only the draw shows it: blamed on the --set that made the file's params draw it.
        (["run", "tiny", "-e", "exp.yaml", "-q", "-s", "workload.generator=bfcl",
          "-s", "workload.params={programs: 2, rate: 1, tool_delay_mean: 1.0e+300}"],
         "error: --set workload.params={programs: 2, rate: 1, tool_delay_mean: 1.0e+300}: experiment 'tiny': "
         "workload.params: bfcl parameters draw delay="),
        (["run", "tiny", "-e", "exp.yaml", "-s", "workload.generator=bfcl", "-s", "workload.params={programs: 100000000000, rate: 1}"],
         "error: --set workload.params={programs: 100000000000, rate: 1}: experiment 'tiny': workload.params.programs: "
         "expected at most 10,000,000 programs"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(workdir, args, message):
    res = sim(*args, cwd=workdir)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith(message), res.stderr


def test_a_draw_past_the_trace_format_is_blamed_on_the_params_line(workdir):
    # The parameter checks pass a finite mean; only its draws show it is no workload.
    (workdir / "big.yaml").write_text(
        "experiments:\n"
        "  big:\n"
        "    workload:\n"
        "      generator: bfcl\n"
        "      params: {programs: 2, rate: 1, tool_delay_mean: 1.0e+300}\n"
        "    latency: {kind: constant, seconds: 0.01}\n"
    )
    res = sim("run", "big", "-e", "big.yaml", "-q", cwd=workdir)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: big.yaml:5: experiment 'big': workload.params: bfcl parameters draw delay="), res.stderr
    assert res.stderr.endswith("past the trace format's limit of 1e+09 seconds; lower the means that set it\n")


def test_a_draw_error_is_blamed_on_a_parameter_that_shapes_the_draw_not_the_latest_set(workdir):
    """An innocent --set (a token mean) was blamed for the file's tool delay, being the latest set."""
    (workdir / "big.yaml").write_text(
        "experiments:\n"
        "  big:\n"
        "    workload:\n"
        "      generator: bfcl\n"
        "      params:\n"
        "        programs: 600\n"
        "        rate: 1\n"
        "        tool_delay_mean: 1.0e+300\n"
        "    latency: {kind: constant, seconds: 0.01}\n"
    )
    res = sim("run", "big", "-e", "big.yaml", "-q", "-s", "workload.params.output_tokens_mean=20", cwd=workdir)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: big.yaml:5: experiment 'big': workload.params: bfcl parameters draw delay="), res.stderr
    # The --set that does shape the bad draw is blamed, as before.
    res = sim("run", "big", "-e", "big.yaml", "-q", "-s", "workload.params.output_tokens_mean=20",
              "-s", "workload.params.tool_delay_sigma=2", cwd=workdir)
    assert res.stderr.startswith("error: --set workload.params.tool_delay_sigma=2: experiment 'big': "
                                 "workload.params: bfcl parameters draw delay="), res.stderr
    # An arrival past the limit is blamed on the rate, not on a later token mean.
    res = sim("run", "big", "-e", "big.yaml", "-q", "-s", "workload.params.tool_delay_mean=1",
              "-s", "workload.params.rate=1.0e-8", "-s", "workload.params.output_tokens_mean=20", cwd=workdir)
    assert res.stderr.startswith("error: --set workload.params.rate=1.0e-8: experiment 'big': workload.params: "
                                 "rate 1e-08 is too low for 600 programs"), res.stderr


def test_a_fitted_latency_file_that_is_not_text_or_a_directory_is_one_line(workdir):
    (workdir / "bin.json").write_bytes(b"\xff\xfe{}")
    res = sim("run", "tiny", "-e", "exp.yaml", "-s", "latency.kind=fitted", "-s", "latency.name=bin.json", cwd=workdir)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.endswith("latency.name: cannot build the latency model: bin.json: not UTF-8 text (invalid start "
                               "byte at byte 0); expected a fitted model JSON (python -m sim fit-latency writes one)\n")
    (workdir / "d.json").mkdir()
    res = sim("run", "tiny", "-e", "exp.yaml", "-s", "latency.kind=fitted", "-s", "latency.name=d.json", cwd=workdir)
    assert res.returncode == 1 and res.stderr.endswith("'d.json' is a directory, expected a fitted model .json file\n")


@pytest.mark.parametrize("args", [[], ["run"], ["frobnicate"], ["run", "tiny", "--bogus"]])
def test_usage_errors_exit_2(workdir, args):
    res = sim(*args, cwd=workdir)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "usage:" in res.stderr


@pytest.mark.parametrize("command", [["list"], ["run", "tiny"]])
def test_unreadable_experiments_file_is_one_line(workdir, command):
    (workdir / "bad.yaml").write_bytes(b"experiments:\n  tiny:\n    description: \"x\x07\"\n")
    res = sim(*command, "-e", "bad.yaml", cwd=workdir)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr == "error: bad.yaml:3: invalid YAML: unacceptable character #x0007\n"


def test_fit_latency_is_delegated(workdir):
    res = sim("fit-latency", "--help", cwd=workdir)
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert "usage:" in res.stdout and "profile" in res.stdout
    res = sim("fit-latency", "profile.csv", "-o", "f.json", "--seed", "-1", cwd=workdir)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.endswith("error: argument --seed: expected an integer >= 0, got -1\n")


def test_result_table():
    summary = {
        "policies": {
            "fcfs": {"normalized_latency_mean": 0.5, "normalized_latency_p95": 1.25, "program_latency_mean": 30.0,
                     "normalized_latency_mean_vs_fcfs": 1.0},
            "plas": {"normalized_latency_mean": 0.25, "normalized_latency_p95": None, "program_latency_mean": 15.0,
                     "normalized_latency_mean_vs_fcfs": 0.5},
        }
    }
    lines = result_table(summary).splitlines()
    assert lines[0].split() == ["policy", "norm", "mean", "norm", "p95", "prog", "mean", "norm", "vs", "fcfs"]
    assert lines[2].split() == ["fcfs", "0.5", "1.25", "30", "1.000"]
    assert lines[3].split() == ["plas", "0.25", "-", "15", "0.500"]


def test_run_end_to_end(workdir):
    from test_experiments import tiny_trace

    tiny_trace(workdir / "t.jsonl", programs=8)
    res = sim("run", "tiny", "-e", "exp.yaml", "--set", "policies=[fcfs, atlas]", cwd=workdir)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[0] == "policy"
    assert [line.split()[0] for line in lines[2:4]] == ["fcfs", "atlas"]
    assert lines[2].split()[-1] == "1.000"
    assert lines[-1] == f"results in {Path('results') / 'tiny'}"
    out = workdir / "results" / "tiny"
    assert sorted(p.name for p in out.iterdir()) == ["calls.csv", "config.yaml", "latency.png", "programs.csv", "summary.json"]
    assert "prog" in res.stderr  # the progress bar

    quiet = sim("run", "tiny", "-e", "exp.yaml", "--quiet", "--out", "q", cwd=workdir)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (workdir / "q" / "summary.json").read_bytes() != b""


def test_a_call_the_engine_cannot_hold_fails_before_any_output_is_written(workdir):
    """It left config.yaml and header-only CSVs, which read like a run that measured nothing; a previous run's stay."""
    from test_experiments import tiny_trace

    tiny_trace(workdir / "t.jsonl", programs=2)
    assert sim("run", "tiny", "-e", "exp.yaml", "-q", "--out", "old", cwd=workdir).returncode == 0
    before = {p.name: p.read_bytes() for p in (workdir / "old").iterdir()}
    for out in ("old", "new"):
        res = sim("run", "tiny", "-e", "exp.yaml", "-q", "--out", out, "-s", "engine.num_gpu_blocks=1", cwd=workdir)
        assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
        assert "exceeds the KV cache of one replica (16 tokens)" in res.stderr
    assert not (workdir / "new").exists()
    assert {p.name: p.read_bytes() for p in (workdir / "old").iterdir()} == before


def test_bad_trace_is_one_line(workdir):
    (workdir / "bad.jsonl").write_text('{"id": "x"}\n')
    res = sim("run", "tiny", "-e", "exp.yaml", "-s", "workload.trace=bad.jsonl", "-q", cwd=workdir)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: bad.jsonl:1: program 'x'")


def test_serve_is_delegated(workdir):
    res = sim("serve", "--help", cwd=workdir)
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert res.stdout.startswith("usage: python -m sim serve")


def test_an_async_run_whose_latency_model_has_no_host_time_says_so(workdir):
    """Async hides only host time; a model without any would silently make async look no faster than sync."""
    from test_experiments import tiny_trace

    tiny_trace(workdir / "t.jsonl", programs=2)
    res = sim("run", "tiny", "-e", "exp.yaml", "-q", "-s", "engine.async_scheduling=true", cwd=workdir)
    assert res.returncode == 0
    assert res.stderr == ("note: engine.async_scheduling is on, but latency model 'constant' has no host time, so "
                          "async steps are as long as synchronous ones (docs/design-decisions.md, async scheduling)\n")
    sync = sim("run", "tiny", "-e", "exp.yaml", "-q", cwd=workdir)
    with_host = sim("run", "tiny", "-e", "exp.yaml", "-q", "-s", "engine.async_scheduling=true",
                    "-s", "latency.kind=fitted", "-s", "latency.name=a100-llama-3.1-8b", cwd=workdir)
    for res in (sync, with_host):
        assert res.returncode == 0 and res.stderr == "", res.stderr


def test_a_fitted_model_that_names_no_engine_is_run_with_a_note_that_it_is_unchecked(workdir):
    """A hand-made fitted file naming neither model nor GPU cannot be checked against the engine
    (`sim.latency.build` refuses one that names another); it ran without a word."""
    from test_experiments import tiny_trace

    tiny_trace(workdir / "t.jsonl", programs=2)
    shipped = json.loads((Path(__file__).resolve().parents[1] / "sim/latency/models/a100-llama-3.1-8b.json").read_text())
    (workdir / "mine.json").write_text(json.dumps({**shipped, "provenance": {"note": "hand-made"}}))
    (workdir / "named.json").write_text(json.dumps({**shipped, "provenance": {"gpu": "a100-80gb"}}))
    res = sim("run", "tiny", "-e", "exp.yaml", "-q", "-s", "latency.kind=fitted", "-s", "latency.name=mine.json",
              cwd=workdir)
    assert res.returncode == 0
    assert res.stderr == ("note: fitted latency model 'a100-llama-3.1-8b' names neither a model nor a GPU in its "
                          "provenance, so nothing checks that it times this engine (llama-3.1-8b on 1 x a100-80gb); "
                          "add \"model\" and \"gpu\" to its \"provenance\" to have it checked\n")
    named = sim("run", "tiny", "-e", "exp.yaml", "-q", "-s", "latency.kind=fitted", "-s", "latency.name=named.json",
                cwd=workdir)
    assert named.returncode == 0 and named.stderr == "", named.stderr


def test_a_full_disk_names_the_output_directory(tmp_path, monkeypatch, capsys):
    """A failed write on an open file carries no file name: the error read "[Errno 28] No space left on device"."""
    import errno

    import sim.run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sim.run, "write_rows", full)
    out = tmp_path / "o"
    rc = main(["run", "quickstart", "--quiet", "--out", str(out), "--set", "workload.params.programs=3",
               "--set", "policies=[fcfs]"])
    assert rc == 1 and capsys.readouterr().err == f"error: --out {out}: No space left on device\n"


@pytest.mark.parametrize("after_rows", [0, 3, 1000])
def test_an_interrupt_while_a_policy_is_written_keeps_exactly_the_policies_its_summary_lists(
        workdir, monkeypatch, after_rows):
    """Ctrl-C while plas's rows were being written left part of them in calls.csv, under a summary
    without plas. The interrupt comes after ``after_rows`` of plas's call rows (1000: after all of
    them and the programs' rows too, before the summary is written)."""
    import sim.run as run
    from sim.experiments import resolve
    from test_experiments import tiny_trace

    tiny_trace(workdir / "t.jsonl", programs=4)
    monkeypatch.chdir(workdir)
    cfg = resolve("tiny", "exp.yaml")
    run.run_experiment(cfg, workdir / "whole", quiet=True)
    whole_calls = (workdir / "whole" / "calls.csv").read_text().splitlines()
    fcfs_calls = [r for r in whole_calls if r.startswith("fcfs,") or r == whole_calls[0]]
    assert 1 < len(fcfs_calls) < len(whole_calls)

    real_rows, real_atomic, calls = run.write_rows, run.write_atomic, []

    def rows(fh, records):
        records = list(records)
        calls.append(fh)
        if len(calls) == 3:  # plas's calls (fcfs wrote its calls, then its programs)
            real_rows(fh, records[:after_rows])
            if after_rows < len(records):
                raise KeyboardInterrupt
            records = records[after_rows:]
        real_rows(fh, records)

    def atomic(path, text):
        if len(calls) >= 3 and path.name == "summary.json":
            raise KeyboardInterrupt
        real_atomic(path, text)

    monkeypatch.setattr(run, "write_rows", rows)
    monkeypatch.setattr(run, "write_atomic", atomic)
    with pytest.raises(KeyboardInterrupt):
        run.run_experiment(cfg, workdir / "cut", quiet=True)
    cut = workdir / "cut"
    assert list(json.loads((cut / "summary.json").read_text())["policies"]) == ["fcfs"]
    assert (cut / "calls.csv").read_text().splitlines() == fcfs_calls
    whole_programs = (workdir / "whole" / "programs.csv").read_text().splitlines()
    assert (cut / "programs.csv").read_text().splitlines() == [
        r for r in whole_programs if r.startswith("fcfs,") or r == whole_programs[0]]


def test_an_interrupt_just_after_the_summary_landed_keeps_that_policys_rows(workdir, monkeypatch):
    """Between the summary's os.replace and the end of the write, an interrupt cut the CSVs back
    to the previous policy under a summary that already listed this one."""
    import sim.run as run
    from sim.experiments import resolve
    from test_experiments import tiny_trace

    tiny_trace(workdir / "t.jsonl", programs=4)
    monkeypatch.chdir(workdir)
    cfg = resolve("tiny", "exp.yaml")
    run.run_experiment(cfg, workdir / "whole", quiet=True)
    real_atomic, summaries = run.write_atomic, []

    def atomic(path, text):
        real_atomic(path, text)
        if path.name == "summary.json":
            summaries.append(text)
            if len(summaries) == 2:  # plas's summary is on disk
                raise KeyboardInterrupt

    monkeypatch.setattr(run, "write_atomic", atomic)
    with pytest.raises(KeyboardInterrupt):
        run.run_experiment(cfg, workdir / "cut", quiet=True)
    cut, whole = workdir / "cut", workdir / "whole"
    listed = list(json.loads((cut / "summary.json").read_text())["policies"])
    assert len(listed) == 2
    for name in ("calls.csv", "programs.csv"):
        rows = whole.joinpath(name).read_text().splitlines()
        assert cut.joinpath(name).read_text().splitlines() == [
            r for r in rows if r.split(",", 1)[0] in listed or r == rows[0]]


def test_an_out_directory_that_cannot_be_made_names_out(workdir, monkeypatch, capsys):
    """access() passes /proc/x (root may write /proc), and the run failed later with
    "error: /proc/x: No such file or directory", not naming --out."""
    import errno

    from test_experiments import tiny_trace

    tiny_trace(workdir / "t.jsonl", programs=2)
    real = os.mkdir

    def mkdir(path, *a, **kw):
        if "nowhere" in str(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real(path, *a, **kw)

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for out, said in (("nowhere", ""), ("nowhere/x", "nowhere: ")):  # the directory, or a parent made on the way
        assert main(["run", "tiny", "-e", "exp.yaml", "-q", "--out", out]) == 1
        assert capsys.readouterr().err == f"error: --out {out}: {said}No such file or directory\n"
    assert main(["run", "tiny", "-e", "exp.yaml", "-q", "--out", "a/b", "-s", "engine.num_gpu_blocks=1"]) == 1
    assert "exceeds the KV cache of one replica" in capsys.readouterr().err
    assert not (workdir / "a").exists()  # a run that fails its checks makes no directory
