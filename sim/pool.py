"""Process pools for the runs that fan out over one (sweeps, seeds): ended at
once, and surviving a worker's death.

Leaving a ``ProcessPoolExecutor``'s ``with`` block waits for every job
submitted to it, so a Ctrl-C took 525 s to end a ``paper-single`` sweep on
two workers. Queued jobs can be cancelled; the ones already handed to a
worker cannot, so the workers are terminated. They hold nothing to save:
results come back whole or not at all.

A worker that dies (killed, out of memory) breaks the whole pool, and every
job in flight comes back broken, not only the one that died (`run_in_pools`).
"""

from __future__ import annotations

import collections
import multiprocessing
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Generator, Hashable, Iterator, Sequence, TypeVar

T = TypeVar("T")

TRIES = 3  # twice among others, then alone


class WorkerLost(Exception):
    """A task whose worker died on each of its `TRIES`, the last alone: its own death."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


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


def run_in_pools(tasks: Sequence[T], workers: int, fn: Callable[[T], Any],
                 key: Callable[[T], Hashable]) -> Iterator[tuple[T, Any, BaseException | None]]:
    """Run ``fn(task)`` for every task in spawn pools of ``workers``; yields
    ``(task, result, None)``, or ``(task, None, error)`` for the task's own
    exception, or ``(task, None, WorkerLost)`` for a task whose worker died
    on each of its tries. In completion order; ``key`` names a task.

    At most ``workers`` tasks are in flight, so a break loses only those: they
    go to the back of the queue and the rest carry on in a fresh pool. A task
    lost twice runs alone at the end, where a death can only be its own. (Ray
    retries a lost task the same way.) Submitting all at once lost every
    queued task too, and one task that kept killing its worker made the rest
    run one at a time. ``fn`` and the tasks must pickle (spawn).

    Close the generator (``contextlib.closing``) when leaving it early: its
    running tasks are then ended at once, not waited for.
    """
    queue = collections.deque(tasks)
    losses: dict[Hashable, int] = {}
    alone: list[T] = []
    while queue:
        for task, _ in (yield from _one_pool(queue, workers, fn, key)):
            losses[key(task)] = losses.get(key(task), 0) + 1
            (alone if losses[key(task)] >= TRIES - 1 else queue).append(task)
    for task in sorted(alone, key=key):
        for lost, exc in (yield from _one_pool(collections.deque([task]), 1, fn, key)):
            yield lost, None, WorkerLost(exc)


def _one_pool(queue: collections.deque, workers: int, fn: Callable[[T], Any], key: Callable[[T], Hashable]
              ) -> Generator[tuple[T, Any, BaseException | None], None, list[tuple[T, BaseException]]]:
    """Run tasks from ``queue`` (taken as they start) in one pool, at most ``workers`` at once,
    yielding their outcomes, until the queue is empty or the pool breaks; returns the tasks
    the break took down, each with its error (those of each wait in the order of their keys)."""
    lost: list[tuple[T, BaseException]] = []
    with SpawnPool(workers) as pool:
        futures: dict[Any, T] = {}
        submitted = 0

        def fill() -> bool:
            """Submit from the queue up to ``workers`` in flight; False if the pool broke meanwhile."""
            nonlocal submitted
            while queue and len(futures) < workers:
                task = queue.popleft()
                try:
                    futures[pool.submit(fn, task)] = task
                except BrokenProcessPool:  # a worker died after the last wait: this task never started
                    queue.appendleft(task)
                    if not submitted:  # a fresh pool that cannot start anything: retrying would loop
                        raise
                    return False
                submitted += 1
            return True

        try:  # an interrupt while submitting must stop the pool too, not wait for its tasks
            broke = not fill()
            while futures and not broke:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: key(futures[f])):
                    task, exc = futures.pop(fut), fut.exception()
                    if isinstance(exc, BrokenProcessPool):
                        lost.append((task, exc))
                        broke = True
                    else:
                        yield task, (fut.result() if exc is None else None), exc
                # Refilled after the results were taken, which may be long after the wait: a death
                # in between made submit raise, and the whole run ended with a traceback.
                broke = broke or not fill()
            if broke:  # the rest in flight come back broken too (or finished just before)
                wait(futures)
                for fut, task in sorted(futures.items(), key=lambda item: key(item[1])):
                    exc = fut.exception()
                    if isinstance(exc, BrokenProcessPool):
                        lost.append((task, exc))
                    else:
                        yield task, (fut.result() if exc is None else None), exc
                futures.clear()
        finally:
            # An interrupt here, or the consumer stopped early (it closed this generator).
            if not all(f.done() for f in futures):
                pool.stop()
    return lost
