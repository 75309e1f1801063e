"""Run a sweep's jobs in parallel and write its tidy results table as they finish.

Each job (one grid point under one policy label) is independent, so jobs
run in a process pool (spawn: no state inherited from the parent, the same
on every platform) or as Ray tasks. Workers return a small summary, never
the per-call rows, so the parent's memory stays flat however long the
sweep.

Outputs in the sweep's directory:

* ``sweep.csv``: one row per job (`columns`), appended as jobs finish so an
  interrupted sweep keeps its finished rows, then rewritten in grid order at
  the end. Every column but ``wall_s`` is identical across runs (an
  ``error`` names the experiments file as the command did);
* ``sweep.parquet``: the same table, when pyarrow is installed;
* ``sweep.json``: what was swept (name, base experiment, keys, labels),
  and ``state``: ``running`` until the sweep ends, then ``complete`` or
  ``interrupted`` (Ctrl-C, SIGTERM), with ``finished``, the jobs that have a
  row. ``sim plot`` warns when a table's sweep is not complete, since its
  curves then lack points without any other sign;
* ``points/NNN/summary.json`` (`sim.metrics.summarize_run` of the point's
  finished labels) and ``config.yaml`` / ``config-VARIANT.yaml``, with which
  ``python -m sim run`` reruns the point.

A job that raises is a row with ``status`` ``failed`` and its ``error``; an
invalid point (its config does not resolve) is ``invalid``. Neither stops
the others.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from sim.config import ConfigError
from sim.experiments import to_file_dict
from sim.metrics import add_ratios, summarize_policy
from sim.pool import TRIES, WorkerLost, run_in_pools
from sim.sweep import DEFAULT_VARIANT, Job, Sweep
from sim.sweep_table import FIGURES, PLOTS_DIR
from sim.textout import write_atomic, writing_under
from sim.yaml_io import dump_yaml

# sweep.json's "state": a sweep killed outright (SIGKILL, power) stays RUNNING.
RUNNING, COMPLETE, INTERRUPTED, FAILED = "running", "complete", "interrupted", "failed"
# Simulator counters kept in the table (from SimResult.stats).
STATS = ("sim_time", "steps", "busy_fraction", "kv_evictions")
METRICS = tuple(summarize_policy([], []))
# Swept keys shown under a short column name; always present, from the resolved config.
DESCRIPTORS = {
    "workload.generator": "workload",
    "workload.params.rate": "rate",
    "engine.replicas": "replicas",
    "engine.balancer": "balancer",
}
# Mean calls per program (DESIGN.md section 2): the relative cost of a
# workload's job, to start the longest jobs first.
CALLS_PER_PROGRAM = {"sharegpt": 6.66, "bfcl": 10.75, "lats": 159.71, "mixed": 59.0}


@dataclass
class JobResult:
    index: int
    status: str  # ok | failed | invalid
    error: str = ""
    wall_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _WorkloadKey:
    """What determines a job's programs and block keys; ``cfg`` rides along unhashed."""

    text: str
    cfg: Any = field(compare=False, hash=False)


@functools.lru_cache(maxsize=1)
def _prepared(key: _WorkloadKey) -> tuple[list[Any], Any]:
    """The programs and their block keys, kept for the worker's next job.

    Jobs run longest first, so a point's policies tend to follow each other
    on a worker; the next of them then skips generating the trace and
    hashing its contexts (~7% of a LATS job).
    """
    from sim.run import load_workload
    from sim.simulate import BlockKeys

    return load_workload(key.cfg), BlockKeys(key.cfg.engine.block_size)


def _workload_key(cfg: Any) -> _WorkloadKey:
    w = cfg.workload
    text = json.dumps(
        {"generator": w.generator, "params": w.params, "trace": _file_identity(w.trace), "seed": cfg.seed,
         "block_size": cfg.engine.block_size},
        sort_keys=True, default=str,
    )
    return _WorkloadKey(text, cfg)


def _file_identity(path: str | None) -> Any:
    """A trace by what is there now, not its path's text: a file rewritten, or the same relative
    path from another directory, served the first file's programs to a later sweep in this process."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return path  # loading it fails, with the reason
    return [os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns]


def run_job(job: Job) -> JobResult:
    """Simulate one job; any exception becomes a failed result (module-level: picklable)."""
    if job.cfg is None:
        return JobResult(job.index, "invalid", job.error or "invalid configuration")
    from sim.simulate import simulate

    start = time.perf_counter()
    try:
        programs, block_keys = _prepared(_workload_key(job.cfg))
        res = simulate(programs, job.cfg, job.policy, block_keys=block_keys)
        metrics = summarize_policy(res.calls, res.programs)
        metrics["stats"] = {k: float(v) for k, v in sorted(res.stats.items())}
    except Exception as exc:  # noqa: BLE001  isolation is the point: report it as a row
        return JobResult(job.index, "failed", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    return JobResult(job.index, "ok", "", time.perf_counter() - start, metrics)


def job_cost(job: Job) -> float:
    if job.cfg is None or job.cfg.workload.generator is None:
        return 0.0
    w = job.cfg.workload
    return float(w.params.get("programs", 1)) * CALLS_PER_PROGRAM.get(w.generator, 10.0)


# --- backends -----------------------------------------------------------------------


class BackendError(ConfigError):
    """The chosen backend cannot run (e.g. Ray not installed); the message is for the user."""


def import_ray() -> Any:
    """Ray, imported only for ``--backend ray``: it is an optional extra and slow to import."""
    try:
        import ray
    except ImportError:
        raise BackendError("--backend ray: Ray is not installed; install the ray extra: pip install -e '.[ray]'") from None
    return ray


def run_local(jobs: Sequence[Job], workers: int | None, quiet: bool = False,
              run: Callable[[Job], JobResult] = run_job) -> Iterator[JobResult]:
    """Results in completion order; ``workers == 1`` runs in this process (no pool start-up),
    None as many as there are CPUs. ``run`` is `run_job` (a test's stand-in must be picklable).
    The pool prints nothing, so ``quiet`` has nothing to silence here."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    todo = sorted(jobs, key=lambda j: (-job_cost(j), j.index))  # longest first: less idle tail
    if workers <= 1:
        for job in todo:
            yield run(job)
        return
    # A dead worker breaks the whole pool: `run_in_pools` runs again the jobs it took down.
    with contextlib.closing(run_in_pools(todo, workers, run, key=lambda j: j.index)) as outcomes:
        for job, result, exc in outcomes:
            if exc is None:
                yield result
            elif isinstance(exc, WorkerLost):
                yield JobResult(job.index, "failed", f"its worker died on each of its {TRIES} tries, the last alone "
                                                     f"(killed, or out of memory: try fewer --workers): {exc}")
            else:  # the job could not reach its worker (pickling): `run` reports the job's own errors
                yield JobResult(job.index, "failed", f"{type(exc).__name__}: {exc}")


def run_ray(jobs: Sequence[Job], workers: int | None, quiet: bool = False) -> Iterator[JobResult]:
    """The same jobs as Ray tasks on the cluster `ray.init` finds (or a local one).

    ``workers`` caps the tasks in flight (``-w``: memory, or a share of a
    shared cluster); None leaves it to the cluster's CPUs. ``quiet`` (``-q``)
    keeps Ray's start-up lines ("Started a local Ray instance", its token
    notice) off stderr, where only errors then belong.
    """
    ray = import_ray()
    # ray.init installs its own SIGTERM handler (a stack dump and sys.exit), which made a
    # terminated sweep read "failed"; the command's own handler goes back in place.
    main_thread = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR if quiet else logging.INFO)
    if main_thread and on_term is not None:
        signal.signal(signal.SIGTERM, on_term)
    remote = ray.remote(num_cpus=1)(run_job)
    todo = sorted(jobs, key=lambda j: (-job_cost(j), j.index))
    queue = iter(todo)
    limit = len(todo) if workers is None else workers
    pending = {remote.remote(job): job for job in itertools.islice(queue, limit)}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001  a lost worker or node
                    result = JobResult(job.index, "failed", f"{type(exc).__name__}: {exc}")
                for nxt in itertools.islice(queue, 1):
                    pending[remote.remote(nxt)] = nxt
                yield result
    finally:
        # An interrupt, or the consumer stopped early: a cluster would run the
        # rest for nobody (a local one only stops when this process exits).
        for ref in pending:
            ray.cancel(ref, force=True)


BACKENDS = {"local": run_local, "ray": run_ray}


# --- the table ----------------------------------------------------------------------


def columns(sweep: Sweep) -> list[str]:
    extra = [k for k in sweep.keys if k not in DESCRIPTORS]
    return [
        "sweep",
        "point",
        *DESCRIPTORS.values(),
        *extra,
        "variant",
        "policy",
        "scheduler",
        "status",
        *METRICS,
        *(f"stats_{k}" for k in STATS),
        "error",
        "wall_s",
    ]


def row(sweep: Sweep, job: Job, result: JobResult) -> dict[str, Any]:
    params = dict(job.point.params)
    out: dict[str, Any] = {"sweep": sweep.name, "point": job.point.index}
    cfg = job.cfg or sweep.base  # an invalid point: what it did not change is the base's
    known = {
        "workload": cfg.workload.generator or Path(cfg.workload.trace or "").name,
        "rate": cfg.workload.params.get("rate"),
        "replicas": cfg.engine.replicas,
        "balancer": cfg.engine.balancer,
    }
    for key, col in DESCRIPTORS.items():
        out[col] = params.get(key, known[col])
    for key in sweep.keys:
        if key not in DESCRIPTORS:
            out[key] = params.get(key)
    out.update(variant=job.variant, policy=job.label, scheduler=job.policy, status=result.status)
    for m in METRICS:
        out[m] = result.metrics.get(m)
    stats = result.metrics.get("stats", {})
    for k in STATS:
        out[f"stats_{k}"] = stats.get(k)
    out["error"] = error_cell(result.error)
    out["wall_s"] = None if result.wall_s is None else round(result.wall_s, 3)
    return out


# An error quotes the value it refused, which may be any length: past the csv module's field
# limit (131,072 characters) no reader could open the table, `sim plot` included.
ERROR_CELL_MAX = 4000


def error_cell(error: str) -> str:
    """The error on one line, its middle cut (and the cut said) past `ERROR_CELL_MAX` characters."""
    text = " ".join(error.split())
    if len(text) <= ERROR_CELL_MAX:
        return text
    keep = ERROR_CELL_MAX // 2
    return f"{text[:keep]} [... {len(text) - 2 * keep:,} characters cut ...] {text[-keep:]}"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def csv_text(cols: Sequence[str], rows: Iterable[dict[str, Any]], header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(cols)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()


INT64 = range(-(2**63), 2**63)
EXACT_FLOAT_INT = range(-(2**53), 2**53 + 1)  # the ints a float holds exactly


def parquet_column(values: list[Any]) -> list[Any]:
    """One Arrow type per column, holding each value exactly; else the CSV's text.

    Swept columns hold whatever the grid gave: ints and floats mixed, lists,
    mappings, a seed past int64. Arrow refuses those (an OverflowError after
    every job had run), so they are stored as their ``sweep.csv`` cells.
    """
    kinds = {type(v) for v in values if v is not None}
    ints = [v for v in values if type(v) is int]
    if kinds <= {bool} or kinds == {str} or kinds == {float}:
        return values
    if kinds == {int} and all(v in INT64 for v in ints):
        return values
    if kinds == {int, float} and all(v in EXACT_FLOAT_INT for v in ints):
        return [None if v is None else float(v) for v in values]
    return [None if v is None else _cell(v) for v in values]


def write_parquet(path: Path, cols: Sequence[str], rows: Sequence[dict[str, Any]]) -> bool:
    """Write the table as Parquet if pyarrow is installed; returns whether it did."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    data = {c: parquet_column([r.get(c) for r in rows]) for c in cols}
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(data), tmp)
    os.replace(tmp, path)
    return True


def remove_points(points: Path) -> None:
    """Delete what a sweep wrote under ``points/``, and nothing else.

    Only files a sweep writes (``config*.yaml``, ``summary.json``, their
    ``.tmp``) in directories named like a point's (``NNN``) are removed, and a
    directory only once it is empty: an output directory may hold a user's
    own files, which a rerun must not delete.
    """
    if not points.is_dir():
        return
    for sub in sorted(points.iterdir()):
        if not (sub.is_dir() and not sub.is_symlink() and re.fullmatch(r"\d{3,}", sub.name)):
            continue
        for f in sub.iterdir():
            if f.is_file() and not f.is_symlink() and re.fullmatch(r"(config(-\w+)?\.yaml|summary\.json)(\.tmp)?", f.name):
                f.unlink()
        if not any(sub.iterdir()):
            sub.rmdir()


def remove_figures(plots: Path) -> None:
    """Delete the figures `sim plot` drew of a previous sweep here, and the directory if that empties it;
    anything else in it is left alone."""
    if plots.is_symlink() or not plots.is_dir():  # a link (to docs/figures, say) is the user's: left alone
        return
    for stem in FIGURES:
        for suffix in (".png", ".svg"):
            (plots / (stem + suffix)).unlink(missing_ok=True)
    if not any(plots.iterdir()):
        plots.rmdir()


@dataclass
class SweepWriter:
    """Owns the output directory: rows appended as they come, a sorted rewrite at the end."""

    sweep: Sweep
    jobs: Sequence[Job]
    out: Path
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    by_index: dict[int, Job] = field(default_factory=dict)  # jobs may be a subset of a sweep's
    point_metrics: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.by_index = {j.index: j for j in self.jobs}
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("sweep.csv", "sweep.parquet", "sweep.json"):
            (self.out / name).unlink(missing_ok=True)
        remove_points(self.out / "points")  # a previous run's points must not mix with this one's
        remove_figures(self.out / PLOTS_DIR)  # nor its figures (sim plot's default place) sit by this table
        self.meta = {
            "sweep": self.sweep.name,
            "description": self.sweep.description,
            "experiment": self.sweep.experiment,
            "keys": list(self.sweep.keys),
            "labels": self.sweep.labels(),
            "points": len(self.sweep.points),
            "jobs": len(self.jobs),
        }
        self._write_meta(RUNNING)
        seen: set[tuple[int, str]] = set()
        for job in self.jobs:
            if job.cfg is None or (job.point.index, job.variant) in seen:
                continue
            seen.add((job.point.index, job.variant))
            d = self.point_dir(job.point.index)
            d.mkdir(parents=True, exist_ok=True)
            name = "config.yaml" if job.variant == DEFAULT_VARIANT else f"config-{job.variant}.yaml"
            cfg = job.cfg
            write_atomic(d / name, dump_yaml(to_file_dict(cfg)))
        write_atomic(self.out / "sweep.csv", csv_text(columns(self.sweep), []))

    def point_dir(self, point: int) -> Path:
        return self.out / "points" / f"{point:03d}"

    def add(self, job: Job, result: JobResult) -> dict[str, Any]:
        r = row(self.sweep, job, result)
        self.rows[job.index] = r
        with open(self.out / "sweep.csv", "a", encoding="utf-8", newline="") as fh:
            fh.write(csv_text(columns(self.sweep), [r], header=False))
        if result.status == "ok":
            self.point_metrics.setdefault(job.point.index, {})[job.index] = result.metrics
            self._write_point(job.point.index)
        return r

    def _write_point(self, point: int) -> None:
        done = self.point_metrics[point]
        policies = {self.by_index[i].label: dict(done[i]) for i in sorted(done)}
        add_ratios(policies)
        doc = {
            "experiment": self.sweep.experiment,
            "sweep": self.sweep.name,
            "point": point,
            "params": dict(self.by_index[min(done)].point.params),
            "policies": policies,
        }
        d = self.point_dir(point)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "summary.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")

    def _write_meta(self, state: str) -> None:
        meta = {**self.meta, "state": state, "finished": len(self.rows)}
        write_atomic(self.out / "sweep.json", json.dumps(meta, indent=2) + "\n")

    def finish(self, state: str = COMPLETE) -> list[dict[str, Any]]:
        ordered = [self.rows[i] for i in sorted(self.rows)]
        cols = columns(self.sweep)
        write_atomic(self.out / "sweep.csv", csv_text(cols, ordered))
        write_parquet(self.out / "sweep.parquet", cols, ordered)
        self._write_meta(state)  # last: a sweep killed before this still reads "running"
        return ordered


# --- the whole sweep --------------------------------------------------------------------


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    wall_s: float


def run_sweep(
    sweep: Sweep,
    jobs: Sequence[Job],
    out: str | Path,
    workers: int | None = None,
    backend: str = "local",
    quiet: bool = False,
) -> SweepOutcome:
    """Run every job and write the outputs; failures are rows (and a line on stderr), not exceptions."""
    with writing_under(Path(out)):
        return _run_sweep(sweep, jobs, out, workers, backend, quiet)


def _run_sweep(sweep: Sweep, jobs: Sequence[Job], out: str | Path, workers: int | None, backend: str,
               quiet: bool) -> SweepOutcome:
    from tqdm import tqdm

    if backend not in BACKENDS:
        raise BackendError(f"--backend {backend}: unknown backend; valid: {', '.join(BACKENDS)}")
    if backend == "ray":
        import_ray()  # fail before touching the output directory
    writer = SweepWriter(sweep, jobs, Path(out))
    writer.start()
    start = time.perf_counter()
    failed: list[dict[str, Any]] = []
    by_index = {j.index: j for j in jobs}
    results = BACKENDS[backend](jobs, workers, quiet=quiet)
    with tqdm(total=len(jobs), unit="job", disable=quiet, dynamic_ncols=True, mininterval=0.5, desc=sweep.name) as bar:
        try:
            for result in results:
                job = by_index[result.index]
                r = writer.add(job, result)
                if result.status != "ok":
                    failed.append(r)
                    tqdm.write(
                        f"sweep {sweep.name}: point {job.point.index} ({job.point.describe()}) {job.label}: "
                        f"{result.status}: {r['error']}",
                        file=sys.stderr,
                    )
                    bar.set_postfix_str(f"{len(failed)} failed", refresh=False)
                bar.update(1)
        except BaseException as exc:  # an interrupt, or an error of the sweep's own (not a job's: those are rows)
            results.close()  # stops the workers at once, wherever the interrupt landed
            # The finished rows in grid order, as at the end of a whole sweep; a
            # sweep.json left "running" would read as one still going.
            writer.finish(INTERRUPTED if isinstance(exc, KeyboardInterrupt) else FAILED)
            raise
    rows = writer.finish()
    return SweepOutcome(rows, sorted(failed, key=lambda r: (r["point"], r["policy"])), time.perf_counter() - start)
