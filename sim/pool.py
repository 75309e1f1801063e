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


class SpawnPool(ProcessPoolExecutor):
    """A spawn pool (no state inherited from the parent, the same on every
    platform) whose workers leave Ctrl-C to the parent, which can end them at once.

    A terminal's Ctrl-C reaches the whole process group; a worker waiting for
    a job would print a KeyboardInterrupt traceback, and one running a job
    would hand it back as the job's result. The parent stops them instead
    (`stop`).
    """

    def __init__(self, workers: int):
        super().__init__(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                         initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))

    def stop(self) -> None:
        """Drop the queued jobs, end the running ones now, and wait until their workers have exited.

        Only this pool's workers: the executor's own table of them (``_processes``,
        kept by every CPython since 3.2; shutdown clears it, so it is read first).
        A caller's other processes are left alone.
        """
        workers = list((self._processes or {}).values())
        self.shutdown(wait=False, cancel_futures=True)
        for child in workers:
            child.terminate()
        for child in workers:
            child.join(timeout=10)
