"""A stand-in for `sim.sweep_run.run_job` whose worker dies on chosen jobs, for
tests/test_sweep_run.py. In a module of its own so that spawned workers can
import it by name (a spawn pool pickles functions by reference)."""

from __future__ import annotations

import os

from sim.sweep_run import JobResult, run_job

# Job indices whose worker process dies, as an out-of-memory kill would take it.
DEADLY = {1}


def run_or_die(job) -> JobResult:
    if job.index in DEADLY:
        os._exit(9)
    return run_job(job)


def run_slowly(job) -> JobResult:
    """A job that outlasts any test: a pool that waits for it instead of stopping it shows as a 60 s stall."""
    import time

    time.sleep(60)
    return run_job(job)


def run_seed_or_die(task):
    """A seed task (`sim.replications._run_seed_task`) whose worker dies: seeds in ``DEADLY_SEEDS``
    on every try, and each seed in ``ONCE_SEEDS`` on its first try only (a marker file remembers)."""
    from pathlib import Path

    from sim.replications import _run_seed_task

    seed, _cfg, out_dir = task
    if seed in DEADLY_SEEDS:
        os._exit(9)
    marker = Path(out_dir + ".died")
    if seed in ONCE_SEEDS and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
        os._exit(9)
    return _run_seed_task(task)


DEADLY_SEEDS = {20}
ONCE_SEEDS = {8}


def die_while_results_are_read(task):
    """For `run_in_pools`: task 0 answers at once, task 1's worker dies half a second later
    (while the consumer still holds task 0's result), the rest take a moment."""
    import time

    if task == 1:
        time.sleep(0.5)
        os._exit(9)
    if task != 0:
        time.sleep(0.1)
    return task
