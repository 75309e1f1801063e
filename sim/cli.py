"""``python -m sim``: run and list experiments; fit latency models and serve (delegated).

Bad input (a wrong experiment, a missing trace, a model that does not fit)
is reported as one line on stderr with exit status 1, and so is an option
value that parses but does not fit (``--seeds 1``, ``--workers`` without
``--seeds``, an empty ``--out``). What argparse itself refuses (an unknown
option, a missing argument, a word where a number belongs) exits with
status 2, argparse's convention. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from sim.textout import aligned
from traces.argtypes import StrictParser, integer

RUN_EXAMPLES = """examples:
  python -m sim run quickstart
  python -m sim run bfcl-high --set workload.params.rate=2.5 --set policies=[fcfs,plas]
  python -m sim run multi-engine-locality --set engine.balancer=round_robin --out results/rr
  python -m sim run my-exp --experiments my.yaml --quiet
  python -m sim run bfcl-high --seeds 5 --workers 2     # confidence intervals over 5 seeds
"""
LIST_EXAMPLES = """examples:
  python -m sim list
  python -m sim list --experiments my.yaml
"""
FIT_EXAMPLES = """examples:
  python -m sim fit-latency --help     (options are the latency tool's own)
  python -m sim fit-latency a100.csv -o a100-measured.json
"""
SWEEP_EXAMPLES = """examples:
  python -m sim sweep paper-single                      # -> results/sweeps/paper-single/
  python -m sim sweep paper-single --set workload.params.programs=100 --workers 2
  python -m sim sweep paper-multi --backend ray --out results/multi
"""
PLOT_EXAMPLES = """examples:
  python -m sim plot results/sweeps/paper-single            # table + figures in RESULTS/plots
  python -m sim plot results/sweeps/paper-single --target 0.05
  python -m sim plot results/sweeps/paper-single --target 3x --out figs
  python -m sim plot results/sweeps/paper-single results/sweeps/paper-single-unopt --target 10x
"""
SERVE_EXAMPLES = """examples:
  python -m sim serve --help           (options are sim.serve's own)
  python -m sim serve --experiment quickstart --policy plas --port 8000
"""


def _parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="python -m sim",
        description="Simulate program-aware LLM serving (Autellix PLAS/ATLAS vs FCFS, MLFQ, SRPT).",
        epilog="examples:\n  python -m sim list\n  python -m sim run quickstart\n  python -m sim run quickstart --set engine.replicas=2 --out /tmp/q\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run one experiment under each of its policies",
        description="Run experiment NAME under each of its policies on one workload and write "
        "config.yaml, calls.csv, programs.csv, summary.json and latency.png to the output directory.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("name", metavar="NAME", help="experiment name (see `python -m sim list`)")
    _experiments_arg(run)
    _set_arg(run, "override a dotted key; VALUE is YAML (e.g. engine.replicas=4, policies=[plas,fcfs]); repeatable")
    run.add_argument("-o", "--out", metavar="DIR", help="output directory (default: results/NAME)")
    run.add_argument(
        "--seeds",
        type=integer,
        metavar="N",
        help="replicate under N seeds (the experiment's seed and the next N-1): each in DIR/seed-S/, "
        "means and 95%% confidence intervals in DIR/replications.json",
    )
    run.add_argument("-w", "--workers", type=integer, metavar="N", help="with --seeds: seeds run in parallel (default: the number of CPUs)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no result table")

    lst = sub.add_parser(
        "list",
        help="list experiments with their descriptions",
        description="List the experiments of an experiments file.",
        epilog=LIST_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _experiments_arg(lst)

    sw = sub.add_parser(
        "sweep",
        help="run a sweep (a grid of experiment variations) in parallel",
        description="Run sweep NAME from the experiments file: every grid point under every policy, "
        "in parallel; writes sweep.csv (one row per point and policy), points/*/summary.json and sweep.json. "
        "Exit status 1 if any point failed (the others still run).",
        epilog=SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sw.add_argument("name", metavar="NAME", help="sweep name (under sweeps: in the experiments file)")
    _experiments_arg(sw)
    _set_arg(sw, "override a dotted key at every point, e.g. workload.params.programs=100 (not a key the grid varies, nor policies); repeatable")
    sw.add_argument("-o", "--out", metavar="DIR", help="output directory (default: results/sweeps/NAME)")
    sw.add_argument("-w", "--workers", type=integer, metavar="N", help="parallel jobs (default: the number of CPUs; with --backend ray, the cluster's)")
    sw.add_argument("--backend", choices=("local", "ray"), default="local", help="local processes (default) or Ray tasks")
    sw.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no result table")

    pl = sub.add_parser(
        "plot",
        help="throughput at a latency target and the figures, from a sweep's results",
        description="Print throughput at a target mean normalised latency per policy (and its ratio to "
        "FCFS and MLFQ) and redraw the figures from RESULTS (a sweep directory or its sweep.csv).",
        epilog=PLOT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pl.add_argument("results", metavar="RESULTS", nargs="+", help="a sweep's output directory or its sweep.csv; several are compared as one table")
    pl.add_argument(
        "-t",
        "--target",
        default="2x",
        metavar="L",
        help="target mean normalised latency: seconds per token (0.05) or a multiple of the "
        "best light-load latency of each workload (2x, the default)",
    )
    pl.add_argument("-o", "--out", metavar="DIR", help="figure directory (default: RESULTS/plots)")

    sub.add_parser(
        "fit-latency",
        help="fit a latency model to profiles (delegated to sim.latency.fitted)",
        description="Fit a latency model; every argument is passed to sim.latency.fitted.",
        epilog=FIT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible API timed by the simulated engine (delegated to sim.serve)",
        description="Serve an OpenAI-compatible API; every argument is passed to sim.serve.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    return parser


def _set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _experiments_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-e",
        "--experiments",
        metavar="FILE",
        help="experiments file (default: experiments.yaml at the repository root)",
    )


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def result_table(summary: dict[str, Any]) -> str:
    """The short per-policy table printed after a run."""
    header = ("policy", "norm mean", "norm p95", "prog mean", "norm vs fcfs")
    rows = [header, ("", "(s/tok)", "(s/tok)", "(s)", "")]
    for policy, s in summary["policies"].items():
        rows.append(
            (
                policy,
                _fmt(s.get("normalized_latency_mean"), ".4g"),
                _fmt(s.get("normalized_latency_p95"), ".4g"),
                _fmt(s.get("program_latency_mean"), ".4g"),
                _fmt(s.get("normalized_latency_mean_vs_fcfs"), ".3f"),
            )
        )
    return "\n".join(aligned(rows))


def _interval(entry: dict[str, Any] | None, spec: str) -> str:
    from sim.confidence import interval_text

    return "-" if entry is None else interval_text(entry["mean"], entry["ci_low"], entry["ci_high"], spec)


def replication_table(doc: dict[str, Any]) -> str:
    """The per-policy table printed after ``run --seeds``: means over seeds with their intervals."""
    header = ("policy", "norm mean (s/tok)", "norm mean vs fcfs", "norm p95 vs fcfs", "waiting share")
    rows = [header]
    for policy, m in doc["policies"].items():
        rows.append(
            (
                policy,
                _interval(m["normalized_latency_mean"], ".4g"),
                _interval(m["normalized_latency_mean_vs_fcfs"], ".3f"),
                _interval(m["normalized_latency_p95_vs_fcfs"], ".3f"),
                _interval(m["waiting_share_mean"], ".3f"),
            )
        )
    seeds = doc["seeds"]
    note = f"mean [{round(doc['confidence'] * 100)}% t-interval] over seeds {seeds[0]}..{seeds[-1]}; ratios paired per seed"
    return "\n".join([*aligned(rows), note])


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug."""
    from sim.capacity import CapacityError
    from sim.sweep_table import TableError
    from sim.config import ConfigError
    from sim.hardware import SpecError

    from sim.replications import WorkerDied

    errors: list[type[BaseException]] = [ConfigError, CapacityError, SpecError, OSError, WorkerDied, TableError]
    try:
        from traces.validate import TraceError

        errors.append(TraceError)
    except ImportError:
        pass
    try:  # a trace that cannot run on the engine (e.g. a call larger than the KV cache)
        from sim.simulate import SimulationError

        errors.append(SimulationError)
    except ImportError:
        pass
    return tuple(errors)


def _out(args: argparse.Namespace, default: Path) -> Path:
    """The --out directory, or ``default``. An empty one is refused: Path('') is the
    working directory, so it would not mean what was typed (or what a script left empty)."""
    if args.out is None:
        return default
    if not args.out.strip():
        from sim.config import ConfigError

        raise ConfigError(f"--out {args.out!r}: expected a directory path")
    from traces.argtypes import path_problem

    problem = path_problem(args.out, "--out", directory=True)  # a parent that is a file, or none writable
    if problem:
        from sim.config import ConfigError

        raise ConfigError(problem)
    return Path(args.out)


def _under_out(filename: Any, out: str | None) -> bool:
    """Whether a failed path is the --out directory, one of its parents made on the way, or a file in it."""
    if not out or not isinstance(filename, (str, os.PathLike)):
        return False
    failed, top = os.path.abspath(filename), os.path.abspath(out)
    return failed == top or top.startswith(failed.rstrip(os.sep) + os.sep) or failed.startswith(top + os.sep)


def _run(args: argparse.Namespace) -> int:
    from sim.experiments import resolve
    from sim.latency import latency_notes
    from sim.run import run_experiment

    cfg = resolve(args.name, args.experiments, args.overrides)
    out = _out(args, Path("results") / cfg.name)
    for note in latency_notes(cfg):
        print(note, file=sys.stderr)
    if args.seeds is not None:
        from sim.replications import run_replications

        doc = run_replications(cfg, args.seeds, out, workers=args.workers, quiet=args.quiet)
        if not args.quiet:
            print(replication_table(doc))
            print(f"results in {out}")
        return 0
    if args.workers is not None:
        from sim.config import ConfigError

        raise ConfigError(f"--workers {args.workers}: only with --seeds (a plain run simulates its policies in turn)")
    summary = run_experiment(cfg, out, quiet=args.quiet)
    if not args.quiet:
        print(result_table(summary))
        print(f"results in {out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from sim.derived import report
    from sim.sweep import jobs, load_sweep
    from sim.sweep_run import run_sweep

    if args.workers is not None and args.workers < 1:
        from sim.config import ConfigError

        raise ConfigError(f"--workers {args.workers}: expected an integer >= 1")
    sweep = load_sweep(args.name, args.experiments, args.overrides)
    todo = jobs(sweep, args.experiments, args.overrides)
    out = _out(args, Path("results") / "sweeps" / sweep.name)
    outcome = run_sweep(sweep, todo, out, workers=args.workers, backend=args.backend, quiet=args.quiet)
    if not args.quiet:
        print(report(outcome.rows))
        print(f"{len(outcome.rows)} jobs in {outcome.wall_s:.1f} s; results in {out}")
    if outcome.failed:
        print(f"error: {len(outcome.failed)} of {len(outcome.rows)} jobs failed (status and error in {out / 'sweep.csv'})", file=sys.stderr)
        return 1
    return 0


def _plot(args: argparse.Namespace) -> int:
    from sim.derived import NO_RATE, WHY_NO_RATE, parse_target, report, without_rate
    from sim.sweep_table import PLOTS_DIR, load_rows, measured, unfinished_sweeps
    from sim.config import ConfigError
    from sim.sweep_plots import draw_all

    try:
        parse_target(args.target)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    rows = load_rows(args.results)
    for warning in unfinished_sweeps(args.results):
        print(f"warning: {warning}", file=sys.stderr)
    if not rows:
        raise ConfigError(f"{' '.join(args.results)}: no rows to plot")
    if not measured(rows):  # empty tables and figures, exit 0, read as a plot of nothing measured
        raise ConfigError(f"{' '.join(args.results)}: every point is invalid (status and error in the table); "
                          f"nothing to plot")
    rateless = without_rate(measured(rows))
    if rateless == len(measured(rows)):  # empty figures and exit 0 read as a plot of nothing measured
        raise ConfigError(f"{' '.join(args.results)}: {NO_RATE}")
    if rateless:
        print(f"warning: {rateless} of {len(measured(rows))} measured rows have no arrival rate and are left out "
              f"({WHY_NO_RATE})", file=sys.stderr)
    results = Path(args.results[0])
    out = _out(args, (results if results.is_dir() else results.parent) / PLOTS_DIR)
    print(report(rows, args.target))
    for path in draw_all(rows, out, args.target):
        print(f"wrote {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from sim.experiments import list_experiments

    items = list_experiments(args.experiments)
    width = max(len(name) for name, _ in items)
    for name, desc in items:
        print(f"{name.ljust(width)}  {desc}".rstrip())
    return 0


# Subcommands owned by other modules: (module, function taking the remaining argv).
# Imported only when used, so `run` does not pay for their dependencies.
DELEGATED = {
    "fit-latency": ("sim.latency.fitted", "fit_latency_main"),
    "serve": ("sim.serve", "main"),
}


def _delegate(command: str, argv: list[str]) -> int:
    module, func = DELEGATED[command]
    try:
        entry = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        print(f"python -m sim {command}: not available: {exc}", file=sys.stderr)
        return 1
    return int(entry(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # their options belong to their modules
        return _delegate(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    errors = _user_errors()
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        handler = {"run": _run, "sweep": _sweep, "plot": _plot}.get(args.command, _list)
        return handler(args)
    except BrokenPipeError:
        # The reader went away (`sim plot ... | head`): no "error: Broken pipe", and no second
        # complaint when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except errors as exc:
        text = str(exc)
        if isinstance(exc, OSError) and exc.filename is not None:
            text = f"{exc.filename}: {exc.strerror}"
            out = getattr(args, "out", None)
            if _under_out(exc.filename, out):  # /proc/x passed the checks, then failed
                same = os.path.abspath(exc.filename) == os.path.abspath(out)
                text = f"--out {out}: {exc.strerror if same else text}"
        print(f"error: {text}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is: Python's default ended the parent alone,
    and a sweep's or replication's pool workers ran on, orphaned, writing
    output for a command that had died. As an interrupt, the run stops its
    workers and writes what finished (`sim.pool.SpawnPool.stop`)."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()
