"""Sweep wall time: the paper-reproduction sweep (4 workloads x 5 policies x 8 rates, 1,000 programs each).

Target (issue #6): the full sweep under 10 minutes on a 2-core machine.
It runs ``paper-single`` from experiments.yaml (the unoptimised FCFS is
the separate ``paper-single-unopt`` sweep, not part of the target) through the same code as
``python -m sim sweep``. A subset (``--workloads``, ``--every``, ``--programs``)
runs fewer jobs and extrapolates the full sweep from the measured job
times, labelled as an extrapolation:

    python benchmarks/bench_sweep.py                       # the full sweep
    python benchmarks/bench_sweep.py --every 4 --programs 200 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict

from sim.sweep import jobs, load_sweep
from sim.sweep_run import run_sweep

SWEEP = "paper-single"
FULL_PROGRAMS = 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=FULL_PROGRAMS, help="programs per point (default 1000)")
    ap.add_argument("--workloads", default="sharegpt,bfcl,lats,mixed")
    ap.add_argument("--every", type=int, default=1, help="run every k-th rate of each workload (default all 8)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="results directory (default: a temporary one)")
    args = ap.parse_args()

    overrides = [f"workload.params.programs={args.programs}"]
    sweep = load_sweep(SWEEP, overrides=overrides)
    every = jobs(sweep, overrides=overrides)
    full = [j for j in every if j.variant == "default"]
    wanted = set(args.workloads.split(","))
    rates: dict[str, list[float]] = defaultdict(list)
    for j in full:
        w, r = j.cfg.workload.generator, j.cfg.workload.params["rate"]
        if r not in rates[w]:
            rates[w].append(r)
    keep = {w: set(rs[:: args.every]) for w, rs in rates.items()}
    todo = [j for j in full if j.cfg.workload.generator in wanted and j.cfg.workload.params["rate"] in keep[j.cfg.workload.generator]]
    print(f"{SWEEP}: {len(todo)} of {len(full)} jobs, {args.programs} programs per point, {args.workers} workers, cpus={os.cpu_count()}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        wall = time.perf_counter()
        outcome = run_sweep(sweep, todo, out, workers=args.workers)
        wall = time.perf_counter() - wall

    by_workload: dict[str, list[float]] = defaultdict(list)
    for r in outcome.rows:
        by_workload[r["workload"]].append(r["wall_s"] or 0.0)
    print(f"measured: {len(outcome.rows)} jobs in {wall:.1f} s wall ({len(outcome.failed)} failed)")
    for w, times in by_workload.items():
        print(f"  {w:9s} {len(times):3d} jobs  mean {sum(times) / len(times):7.2f} s/job  max {max(times):7.2f} s")
    if len(todo) == len(full) and args.programs == FULL_PROGRAMS:
        print(f"full sweep: {wall:.1f} s ({wall / 60:.1f} min); target < 600 s")
        return
    # Extrapolation: per-workload mean job time x the full job count, scaled by
    # programs (simulation time grows about linearly with programs), over the workers.
    scale = FULL_PROGRAMS / args.programs
    job_seconds = 0.0
    for w in rates:
        n = sum(1 for j in full if j.cfg.workload.generator == w)
        if w in by_workload:
            job_seconds += n * scale * sum(by_workload[w]) / len(by_workload[w])
    missing = [w for w in rates if w not in by_workload]
    what = f"these workloads' share ({', '.join(by_workload)}) of the full sweep" if missing else "full sweep"
    print(
        f"EXTRAPOLATED {what} (not measured): ~{job_seconds / max(args.workers, 1):.0f} s "
        f"({job_seconds / max(args.workers, 1) / 60:.1f} min) on {args.workers} workers, "
        f"assuming linear scaling in programs and perfect packing; target < 600 s"
    )


if __name__ == "__main__":
    main()
