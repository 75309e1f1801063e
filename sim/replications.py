"""Replications: one experiment under several seeds, with confidence intervals.

One run answers "PLAS gives 0.94x FCFS's mean normalised latency on this
trace". Whether that holds for the workload, rather than for one draw of
it, needs independent replications: the generator reseeded, the same
policies on each draw. ``python -m sim run NAME --seeds N`` runs seeds
SEED..SEED+N-1 (SEED is the experiment's) and reports, per policy and
metric, the mean over seeds and a Student-t confidence interval.

Ratios to FCFS are paired: each seed's ratio compares the policies on the
same trace (`sim.metrics.add_ratios`), and the interval is over those
per-seed ratios. Pairing removes the trace-to-trace variation that both
policies share, so a small gain can be told from noise with few seeds; an
interval that excludes 1 is a difference the replications support.

Outputs in the run's directory: ``seed-S/`` per seed (a complete run,
rerunnable from its ``config.yaml``) and ``replications.json``. The file is
byte-identical for the same experiment and seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from sim.confidence import CONFIDENCE, t_interval
from sim.config import ConfigError, ExperimentConfig
from sim.metrics import BASELINE, RATIO_METRICS
from sim.pool import TRIES, WorkerLost, run_in_pools
from sim.textout import write_atomic

# The metrics given an interval: the paper's (normalised latency, its tail,
# program latency), the waiting share that explains them, and every ratio.
METRICS = (
    "normalized_latency_mean",
    "normalized_latency_p50",
    "normalized_latency_p95",
    "normalized_latency_p99",
    "program_latency_mean",
    "program_latency_p95",
    "waiting_share_mean",
    "prefix_hit_rate",
) + tuple(f"{m}_vs_{BASELINE}" for m in RATIO_METRICS)


class WorkerDied(RuntimeError):
    """A seed's worker process ended without a result (killed by the OS)."""


def summarize_replications(
    experiment: str, seeds: Sequence[int], summaries: Sequence[dict[str, Any]], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """The ``replications.json`` document from each seed's ``summary.json``.

    A metric that is missing or null in any seed (a policy that finished no
    programs, a ratio without FCFS in the run) gets null rather than an
    interval over fewer seeds, which would not be the same quantity.
    """
    if len(seeds) != len(summaries):
        raise ValueError(f"{len(seeds)} seeds but {len(summaries)} summaries")
    policies = list(summaries[0]["policies"])
    doc: dict[str, Any] = {"experiment": experiment, "seeds": list(seeds), "confidence": confidence, "policies": {}}
    for policy in policies:
        per_metric: dict[str, Any] = {}
        for metric in METRICS:
            values = [s["policies"].get(policy, {}).get(metric) for s in summaries]
            per_metric[metric] = None if any(v is None for v in values) else t_interval(values, confidence).to_json()
        doc["policies"][policy] = per_metric
    return doc


# Each seed is a whole run; an interval over more than this many is far
# tighter than any difference the runs show, so a larger --seeds is a typo.
MAX_SEEDS = 1000


def seeds_of(cfg: ExperimentConfig, count: int) -> list[int]:
    """The seeds of ``count`` replications of ``cfg``: its own seed and the next ones."""
    if not 2 <= count <= MAX_SEEDS:
        raise ConfigError(f"--seeds {count}: expected an integer from 2 to {MAX_SEEDS} (one seed is a plain run)")
    if cfg.workload.trace is not None:
        raise ConfigError(
            f"--seeds: experiment '{cfg.name}' replays the trace file {cfg.workload.trace}, which the "
            "seed does not change; replications need a generated workload (workload.generator)"
        )
    return [cfg.seed + i for i in range(count)]


def check_seeds(configs: dict[int, ExperimentConfig]) -> None:
    """Every seed's workload drawn and checked against the engine, before any output is touched.

    A seed whose draw the engine cannot hold would otherwise fail after the
    earlier run's results were deleted, and end the other seeds mid-write.
    Costs one extra draw per seed (seconds against a run's minutes).
    """
    from sim.run import load_workload
    from sim.simulate import SimulationError, check_workload

    for s, seed_cfg in configs.items():
        try:
            check_workload(load_workload(seed_cfg), seed_cfg)
        except (ConfigError, SimulationError) as exc:
            raise type(exc)(f"--seeds: seed {s}: {exc}") from None


def _run_seed(cfg: ExperimentConfig, out_dir: str, quiet: bool) -> dict[str, Any]:
    from sim.run import run_experiment

    return run_experiment(cfg, out_dir, quiet=quiet)


def _run_seed_task(task: tuple[int, ExperimentConfig, str]) -> dict[str, Any]:
    """One seed in a pool worker (a task must pickle: a module-level function of one argument)."""
    _seed, cfg, out_dir = task
    return _run_seed(cfg, out_dir, True)


def run_replications(
    cfg: ExperimentConfig, count: int, out_dir: str | Path, workers: int | None = None, quiet: bool = False,
    run: Callable[[tuple[int, ExperimentConfig, str]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` under ``count`` seeds into ``out_dir/seed-S/`` and write ``replications.json``.

    Seeds run in a spawn process pool of ``workers`` (default: one per CPU,
    at most one per seed); with one worker they run here, each with its
    progress bar. Results do not depend on the number of workers. A seed
    whose worker dies (killed, out of memory) runs again as a sweep's job
    does (`sim.pool.run_in_pools`); only a seed that dies alone stops the
    run. ``run`` defaults to `_run_seed_task` (a test's stand-in must pickle).
    """
    from sim.progress import progress_bar
    from sim.run import OUTPUTS, REPLICATIONS_FILE, remove_seed_dirs

    seeds = seeds_of(cfg, count)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: expected an integer >= 1")
    workers = min(count, workers or os.cpu_count() or 1)
    configs = {s: replace(cfg, seed=s) for s in seeds}
    check_seeds(configs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A plain run's files, or a seed directory this run does not make, would read as this run's.
    for name in (*OUTPUTS, REPLICATIONS_FILE):
        (out / name).unlink(missing_ok=True)
    remove_seed_dirs(out, keep=seeds)
    summaries: dict[int, dict[str, Any]] = {}
    if workers == 1:
        for s in seeds:
            summaries[s] = _run_seed(configs[s], str(out / f"seed-{s}"), quiet)
    else:
        tasks = [(s, configs[s], str(out / f"seed-{s}")) for s in seeds]
        # Closed on the way out: a bad seed (a call that cannot fit) or an interrupt ends
        # the run now, its pool stopped, not after the other seeds have run for minutes.
        with progress_bar(count, quiet, unit="seed") as bar, \
                contextlib.closing(run_in_pools(tasks, workers, run or _run_seed_task, key=lambda t: t[0])) as outcomes:
            bar.describe("seeds")
            for (s, _, _), summary, exc in outcomes:
                if isinstance(exc, WorkerLost):
                    raise WorkerDied(f"--seeds: seed {s}: its worker died on each of its {TRIES} tries, the last "
                                     f"alone ({exc}); if memory ran out, use fewer --workers") from None
                if exc is not None:
                    raise exc
                summaries[s] = summary
                bar.advance(1)
    doc = summarize_replications(cfg.name, seeds, [summaries[s] for s in seeds])
    write_atomic(out / REPLICATIONS_FILE, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc

