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
        assert workers and not any(w.is_alive() for w in workers)
        assert own.is_alive() and later.is_alive()
        later.terminate()
        later.join()
        assert sum(f.cancelled() for f in futures) >= 1  # the queued ones never ran
    finally:
        own.terminate()
        own.join()
