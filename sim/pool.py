"""Ending a process pool at once, for the runs that fan out over one (sweeps, seeds).

Leaving a ``ProcessPoolExecutor``'s ``with`` block waits for every job
submitted to it, so a Ctrl-C took 525 s to end a ``paper-single`` sweep on
two workers. Queued jobs can be cancelled; the ones already handed to a
worker cannot, so the workers are terminated. They hold nothing to save:
results come back whole or not at all.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn pool (no state inherited from the parent, the same on every
    platform) whose workers leave Ctrl-C to the parent.

    A terminal's Ctrl-C reaches the whole process group; a worker waiting for
    a job would print a KeyboardInterrupt traceback, and one running a job
    would hand it back as the job's result. The parent stops them instead
    (`stop_pool`).
    """
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=signal.signal,
                               initargs=(signal.SIGINT, signal.SIG_IGN))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Drop the queued jobs and end the running ones now, and wait until they have ended.

    Every live child of this process is terminated: the commands that use a
    pool start no other children while it runs.
    """
    pool.shutdown(wait=False, cancel_futures=True)
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=10)
