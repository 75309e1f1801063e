"""SpawnPool.stop: the queued and running jobs end at once; a caller's own processes are left alone."""

from __future__ import annotations

import multiprocessing
import time

from sim.pool import SpawnPool


def test_stop_ends_the_running_jobs_but_not_the_callers_own_children():
    ctx = multiprocessing.get_context("spawn")
    own = ctx.Process(target=time.sleep, args=(60,))
    own.start()
    try:
        start = time.monotonic()
        with SpawnPool(2) as pool:
            futures = [pool.submit(time.sleep, 60) for _ in range(4)]  # two run, two wait
            while not any(f.running() for f in futures):
                time.sleep(0.05)
            later = ctx.Process(target=time.sleep, args=(60,))  # started after the pool: still the caller's
            later.start()
            workers = [c for c in multiprocessing.active_children() if c not in (own, later)]
            pool.stop()
        assert time.monotonic() - start < 30  # the jobs sleep for 60 s
        assert len(workers) == 2 and not any(_running(w.pid) for w in workers)
        assert _running(own.pid) and _running(later.pid)
        later.terminate()
        later.join()
        # None ran to its end: each was cancelled, or failed with its worker (whichever the
        # executor's manager thread, racing the terminations, got to first).
        assert all(f.done() and (f.cancelled() or f.exception() is not None) for f in futures)
    finally:
        own.terminate()
        own.join()


def _running(pid: int) -> bool:
    """Whether the OS still runs ``pid`` (a zombie has ended).

    Asked of the OS, not of multiprocessing: a SIGCHLD reaper another test
    left in this process (an event loop's child watcher) can reap a worker
    first, and ``Process.is_alive`` then never learns that it ended.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_worker_death_while_results_are_read_loses_only_its_tasks():
    """The pool was refilled after the consumer took a result, which may be long after the
    wait: a worker that died in between made submit raise BrokenProcessPool, and a sweep or
    --seeds run ended with a traceback, the task just taken from the queue lost."""
    import contextlib
    import time

    from sim.pool import WorkerLost, run_in_pools
    from sweep_worker_death import die_while_results_are_read

    got = {}
    with contextlib.closing(run_in_pools([0, 1, 2, 3], 2, die_while_results_are_read, key=lambda t: t)) as outcomes:
        for task, result, exc in outcomes:
            got[task] = result if exc is None else exc
            if task == 0:
                time.sleep(2)  # task 1's worker dies meanwhile
    assert (got[0], got[2], got[3]) == (0, 2, 3)
    assert isinstance(got[1], WorkerLost) and "BrokenProcessPool" in str(got[1])
