"""Ending a process pool at once, for the runs that fan out over one (sweeps, seeds).

Leaving a ``ProcessPoolExecutor``'s ``with`` block waits for every job
submitted to it, so a Ctrl-C took 525 s to end a ``paper-single`` sweep on
two workers. Queued jobs can be cancelled; the ones already handed to a
worker cannot, so the workers are terminated. They hold nothing to save:
results come back whole or not at all.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Drop the queued jobs and end the running ones now.

    Every live child of this process is terminated: the commands that use a
    pool start no other children while it runs.
    """
    pool.shutdown(wait=False, cancel_futures=True)
    for child in multiprocessing.active_children():
        child.terminate()
