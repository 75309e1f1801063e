"""Summary statistics of a trace, as ``python -m traces stats`` prints them.

The statistics are the ones DESIGN.md section 2 states for each workload, so
a generated or imported trace can be checked against the paper's table:
calls per program, prompt tokens per call (history included, as the engine
sees them), output tokens per call. ``new_prompt_tokens_mean`` counts only
the prompt tokens that are not the re-sent context of an ancestor
(``context_of``), i.e. what a user or tool added; it is the one to compare
with the table's ShareGPT prompt mean, which cannot include a chat's
history (traces/README.md, "ShareGPT prompt lengths"). ``max_parallel_calls`` is
the exact width of each program's DAG (traces.dag).

Computed in one streaming pass, so a trace larger than memory works.
"""

from __future__ import annotations

from typing import Iterable

from traces.dag import max_parallel_calls
from traces.format import Program


def trace_stats(programs: Iterable[Program]) -> dict:
    """The statistics of a sequence of programs (see the module docstring)."""
    n = calls = prompt = new_prompt = output = width = 0
    max_calls = 0
    first = last = None
    workloads: dict[str, int] = {}
    for p in programs:
        n += 1
        k = len(p.calls)
        calls += k
        max_calls = max(max_calls, k)
        workloads[p.workload] = workloads.get(p.workload, 0) + 1
        first = p.arrival if first is None else min(first, p.arrival)
        last = p.arrival if last is None else max(last, p.arrival)
        ctx = {c.id: c.prompt_tokens + c.output_tokens for c in p.calls}
        for c in p.calls:
            prompt += c.prompt_tokens
            output += c.output_tokens
            new_prompt += c.prompt_tokens - (ctx[c.context_of] if c.context_of is not None else 0)
        width += max_parallel_calls(p)

    def mean(total: int, count: int) -> float:
        return total / count if count else 0.0

    return {
        "programs": n,
        "calls": calls,
        "calls_per_program_mean": mean(calls, n),
        "calls_per_program_max": max_calls,
        "prompt_tokens_mean": mean(prompt, calls),
        "new_prompt_tokens_mean": mean(new_prompt, calls),
        "output_tokens_mean": mean(output, calls),
        "max_parallel_calls_mean": mean(width, n),
        "duration_s": (last - first) if n else 0.0,
        "workloads": dict(sorted(workloads.items())),
    }
