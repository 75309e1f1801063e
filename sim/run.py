"""Run one experiment: the same workload under every policy, results to a directory.

Outputs (all byte-identical for the same experiment and seed, so runs can
be diffed and cached):

* ``config.yaml``: the fully resolved experiment, in the experiments-file
  format, so ``python -m sim run NAME --experiments OUT/config.yaml`` reruns it;
* ``calls.csv``, ``programs.csv``: every policy's rows (`sim.metrics` format);
* ``summary.json``: `sim.metrics.summarize_run`;
* ``latency.png``: `sim.plots.latency_plot`.

A plain run removes what an earlier ``--seeds`` run left in the same
directory (``replications.json`` and its ``seed-S/`` directories), so the
directory holds one run's results.

A long run must not lose finished work, so the CSVs are appended and
flushed after each policy and ``summary.json`` is rewritten (atomically)
after each policy; the plot comes last.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from sim.config import ExperimentConfig
from sim.experiments import to_file_dict
from sim.metrics import summarize_run, write_header, write_rows
from sim.plots import latency_plot
from sim.progress import progress_bar
from sim.records import CallRecord, ProgramRecord
from sim.textout import write_atomic, writing_under
from sim.yaml_io import dump_yaml

OUTPUTS = ("config.yaml", "calls.csv", "programs.csv", "summary.json", "latency.png")
# Written by `sim.replications` in the same directory; a plain run removes it
# so that it is not read as this run's.
REPLICATIONS_FILE = "replications.json"


@dataclass
class PolicyResult:
    policy: str
    calls: list[CallRecord]
    programs: list[ProgramRecord]
    stats: dict[str, float]


def load_workload(cfg: ExperimentConfig) -> list[Any]:
    """The experiment's programs: its trace file, or its generator seeded with ``cfg.seed``."""
    w = cfg.workload
    if w.trace is not None:
        from traces.io import load_all
        from traces.validate import TraceError

        programs = list(load_all(w.trace))
        if not programs:  # results over no programs would look like a run that measured nothing
            raise TraceError("no programs to simulate (the trace is empty)", file=w.trace)
        return programs
    from traces.generators import generate

    try:
        return list(generate(w.generator, seed=cfg.seed, **w.params))
    except (ValueError, OverflowError) as exc:  # what only the draw shows: e.g. arrivals past the trace format's limit
        from sim.config import ConfigError

        origin = _draw_origin(w, exc)
        where = f"{origin}: " if origin else ""
        raise ConfigError(f"{where}experiment {cfg.name!r}: workload.params: {exc}") from None


def _draw_origin(w, exc: Exception) -> str | None:
    """Where the latest-set parameter that shapes the bad draw was set, else where the params were."""
    shaping = getattr(exc, "params", ())
    return next((where for key, where in w.param_origins if key in shaping), w.origin)


def summary_text(summary: dict[str, Any]) -> str:
    # Key order is fixed by construction (policies in run order), so no sort_keys.
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Simulate ``cfg`` under each of its policies and write the outputs; returns the summary."""
    from sim.simulate import check_timing, check_workload

    check_timing(cfg)
    programs = load_workload(cfg)
    check_workload(programs, cfg)
    out = Path(out_dir)
    with writing_under(out):
        return _simulate_and_write(cfg, programs, out, quiet)


def _simulate_and_write(cfg: ExperimentConfig, programs: list[Any], out: Path, quiet: bool) -> dict[str, Any]:
    from sim.simulate import BlockKeys, simulate

    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUTS, REPLICATIONS_FILE):  # never leave a previous run's file next to this run's
        (out / name).unlink(missing_ok=True)
    remove_seed_dirs(out)  # nor a replicated run's seeds
    write_atomic(out / "config.yaml", dump_yaml(to_file_dict(cfg)))

    results: list[PolicyResult] = []
    summary: dict[str, Any] = summarize_run(cfg.name, [])
    with (
        open(out / "calls.csv", "w", newline="", encoding="utf-8") as calls_fh,
        open(out / "programs.csv", "w", newline="", encoding="utf-8") as programs_fh,
        progress_bar(len(programs) * len(cfg.policies), quiet) as bar,
    ):
        write_header(calls_fh, CallRecord)
        write_header(programs_fh, ProgramRecord)
        block_keys = BlockKeys(cfg.engine.block_size)  # shared by the policies' runs
        for i, policy in enumerate(cfg.policies):
            bar.describe(policy)
            res = simulate(programs, cfg, policy, progress=bar.advance, block_keys=block_keys)
            bar.finish_to(len(programs) * (i + 1))
            results.append(PolicyResult(policy, list(res.calls), list(res.programs), dict(res.stats)))
            summary = summarize_run(cfg.name, [(r.policy, r.calls, r.programs, r.stats) for r in results])
            _append_policy(calls_fh, programs_fh, res, out / "summary.json", summary_text(summary))
    write_plot(out / "latency.png", cfg.name, results, summary)
    return summary


def _append_policy(calls_fh: TextIO, programs_fh: TextIO, res: Any, summary_path: Path, summary: str) -> None:
    """Append one policy's rows and then write the summary naming it, all or nothing.

    An interrupt (Ctrl-C, SIGTERM) between a policy's first row and its
    summary cuts the two CSV files back to the previous policy's end, so
    an interrupted run keeps exactly the policies its summary lists: one
    interrupted while writing left 3,022 of a policy's 6,277 calls in
    ``calls.csv``, under a summary without that policy.
    """
    marks = (calls_fh.tell(), programs_fh.tell())
    try:
        write_rows(calls_fh, res.calls)
        write_rows(programs_fh, res.programs)
        calls_fh.flush()
        programs_fh.flush()
        write_atomic(summary_path, summary)
    except BaseException:
        if _holds(summary_path, summary):  # interrupted after the summary's os.replace: the policy is in
            raise
        for fh, mark in zip((calls_fh, programs_fh), marks):
            try:
                fh.truncate(mark)  # flushes what is buffered first, then cuts it off
            except OSError:  # a full disk fails the flush again: the first error is the one to report
                pass
        raise


def _holds(path: Path, text: str) -> bool:
    """Whether ``path`` already reads ``text``. Each policy's summary lists one more
    policy than the last, so this tells a summary that landed from one that did not."""
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def write_plot(path: Path, experiment: str, results: Sequence[PolicyResult], summary: dict[str, Any]) -> None:
    normalized = {r.policy: [p.normalized_latency for p in r.programs] for r in results}
    tmp = path.with_name(path.name + ".tmp")
    latency_plot(tmp, experiment, normalized, summary["policies"])
    os.replace(tmp, path)


def remove_seed_dirs(out: Path, keep: Sequence[int] = ()) -> None:
    """Delete ``out/seed-S/`` directories (S an integer) other than those of ``keep``.

    Only directories named like ours, holding only the files a run writes,
    are removed; anything else there is left alone.
    """
    if not out.is_dir():
        return
    names = {f"seed-{s}" for s in keep}
    ours = {*OUTPUTS, *(name + ".tmp" for name in OUTPUTS)}
    for d in sorted(out.iterdir()):
        if not d.is_dir() or d.name in names or not re.fullmatch(r"seed-\d+", d.name):
            continue
        files = list(d.iterdir())
        if all(f.is_file() and f.name in ours for f in files):
            for f in files:
                f.unlink()
            d.rmdir()
