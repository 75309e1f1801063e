"""Simulator speed: a 100,000-call BFCL-like trace at about 80% load.

Target (issue: simulator): under 30 s on a 2-core machine. Load: on one
A100-80GB with Llama-3.1-8B (fitted latency model), FCFS on this 9,302-program
trace keeps up at 9 and 10 programs/s (last program done 58 and 59 s after the
last arrival, about one long program's own length) and at 11/s (70 s), and
collapses at 12/s: the queue grows, LRU evicts the waiting calls' histories,
re-prefill eats the engine, and the run ends 1,035 s after the last arrival.
So capacity is about 11.3/s and 9 programs/s is 80% load, the default.
``--rate 12`` is the overload case.
Prints wall and CPU seconds per policy.

    python benchmarks/bench_sim_speed.py [--calls 100000] [--rate 9] [--policies fcfs,plas] [--kv-ttl 2]
"""

from __future__ import annotations

import argparse
import time

from sim.config import EngineConfig, ExperimentConfig, LatencyConfig
from sim.simulate import simulate
from traces.generators import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=9.0)
    ap.add_argument("--policies", default="fcfs,plas,atlas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-ttl", type=float, default=0.0, help="engine.kv_ttl in seconds (Continuum's pins; 0: off)")
    args = ap.parse_args()

    programs = generate("bfcl", programs=max(1, round(args.calls / 10.75)), rate=args.rate, seed=args.seed)
    calls = sum(len(p.calls) for p in programs)
    cfg = ExperimentConfig(
        "bench", engine=EngineConfig(kv_ttl=args.kv_ttl), latency=LatencyConfig(kind="fitted", name="a100-llama-3.1-8b")
    )
    print(f"bfcl: {len(programs)} programs, {calls} calls, rate {args.rate}/s")
    for policy in args.policies.split(","):
        wall, cpu = time.perf_counter(), time.process_time()
        result = simulate(programs, cfg, policy)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"{policy:6s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  {calls / wall:8.0f} calls/s  "
            f"steps {result.stats['steps']:.0f}  simulated {result.stats['sim_time']:.0f} s"
        )


if __name__ == "__main__":
    main()
