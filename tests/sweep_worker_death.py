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
