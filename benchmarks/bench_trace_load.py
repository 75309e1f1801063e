"""Benchmark: load and validate a trace of one million calls.

Writes a mixed trace (ShareGPT chains, BFCL tool loops and LATS trees, with
every kind of prefix information the generators use) of at least 1,000,000
calls to a temporary file, then measures, each in a fresh process so peak
memory is the measurement's own:

* ``validate``: ``traces.validate.scan_file`` (stream, keep nothing);
* ``load``:     iterate ``traces.io.load`` (stream, one program at a time);
* ``load_all``: ``traces.io.load_all`` (the whole trace in memory, as the
  simulator holds it).

Targets (issue #2): under 15 s and under 2 GB each on a 2-core machine. CPU
time is printed beside wall time because on a shared machine the wall time
includes waiting for a core.

    python benchmarks/bench_trace_load.py [--calls 1000000] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def peak_rss_mib() -> float:
    """This process's peak resident memory.

    ``/proc/self/status`` VmHWM belongs to the current address space, so it
    starts afresh at exec. ``getrusage``'s ``ru_maxrss`` does not: Linux
    carries the pre-exec peak over, so a child started by a parent that just
    generated a large trace would report the parent's memory.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, path: str) -> dict:
    from traces.io import load, load_all
    from traces.validate import scan_file

    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "validate":
        r = scan_file(path, limit=10)
        if r.error_count:
            raise SystemExit(f"unexpected errors: {r.errors[:3]}")
        programs, calls = r.programs, r.calls
    elif mode == "load":
        programs = calls = 0
        for p in load(path):
            programs += 1
            calls += len(p.calls)
    else:
        trace = load_all(path)
        programs, calls = len(trace), sum(len(p.calls) for p in trace)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"mode": mode, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak_rss_mib(),
            "programs": programs, "calls": calls}


def write_trace(path: str, calls: int) -> tuple[int, int]:
    from traces.generators import generate
    from traces.io import save

    # Mixed programs average ~59 calls; draw enough, then keep a prefix
    # reaching the call count (the ids stay unique, the file stays valid).
    programs = generate("mixed", int(calls / 55) + 100, rate=10.0, seed=0)
    kept, total = [], 0
    for p in programs:
        if total >= calls:
            break
        kept.append(p)
        total += len(p.calls)
    save(kept, path)
    return len(kept), total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--keep", help="write the trace here and keep it (default: a temp file, removed)")
    ap.add_argument("--trace", help="measure this existing trace instead of writing one")
    ap.add_argument("--measure", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0

    if args.trace:
        path = args.trace
    elif args.keep:
        path = args.keep
    else:
        fd, path = tempfile.mkstemp(suffix=".jsonl")
        os.close(fd)
    try:
        if not args.trace:
            t0 = time.perf_counter()
            programs, calls = write_trace(path, args.calls)
            print(f"trace: {programs} programs, {calls} calls, written in {time.perf_counter() - t0:.1f} s")
        print(f"file: {path}, {os.path.getsize(path) / 2**20:.1f} MiB; cpus: {os.cpu_count()}, "
              f"load average: {os.getloadavg()[0]:.1f}")
        ok = True
        for mode in ("validate", "load", "load_all"):
            out = subprocess.run([sys.executable, __file__, "--measure", mode, path],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            within = r["seconds"] < 15 and r["peak_rss_mib"] < 2048
            ok &= within
            print(f"{mode:9s} {r['seconds']:6.2f} s wall  {r['cpu_seconds']:6.2f} s CPU  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
                  f"({r['calls'] / r['seconds'] / 1e6:.2f} M calls/s)  {'OK' if within else 'OVER TARGET'}")
        return 0 if ok else 1
    finally:
        if not (args.keep or args.trace) and os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
