"""Tunable parameters of the scheduler core, with the reasons for each default.

The paper gives none of K, the queue bounds, the quantum or beta, so every
value here is ours, chosen from the workloads' scale and set in
`experiments.yaml` (key ``policy_params``) so it can be swept. The sweep
``policy-params`` there runs queue_base against beta on BFCL and LATS at high
load; the defaults below are the best of its grid on BFCL and within 0.3% on
LATS (docs/findings.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Upper bounds, so that a typo (1e308, .inf) is an error naming the field
# rather than an overflow deep inside a run. No time here is meaningful past
# 1e9 s (about 32 years), and queue bounds double from queue_base, so 64
# queues already span queue_base * 2**62: past any program's service at any
# base, while thousands would overflow a float.
MAX_SECONDS = 1e9
MAX_QUEUES = 64


@dataclass(frozen=True)
class PolicyParams:
    # --- PLAS / ATLAS discretised queues -------------------------------------
    # K = 8 queues with upper bounds doubling from `queue_base`: 1, 2, 4, ...
    # 64 s and an unbounded last queue. A BFCL call is ~1 s of service and a
    # ShareGPT program tens of seconds, so the bins separate fresh programs
    # (Q1) from long ones (Q7/Q8) within the range real programs span.
    # Doubling keeps K small: continuous priorities degrade into round-robin
    # and KV thrashing (DESIGN.md section 1).
    num_queues: int = 8
    queue_base: float = 1.0  # seconds of attained service, Q1's upper bound
    # Service a call may receive in a queue before it is demoted one queue.
    # None means "the queue's width" (1, 1, 2, 4, ... s), a fresh quantum on
    # every entry; see policies._ProgramLevel for why not the remainder.
    quantum: float | None = None
    # Anti-starvation: a waiting call jumps to Q1 when
    # (W_program + W_call) / (T_program + T_call) >= beta. 8 means a program
    # may wait eight times its service before it is rescued, which bounds
    # its slowdown without letting long programs jump the queue often.
    beta: float = 8.0
    # Whether a better-ranked waiting call may displace a running one (the
    # paper's design). With recompute preemption (vLLM v1) each displacement
    # costs the victim's prefill again unless its prefix is still cached;
    # turning this off keeps the policy's order for admission only, which is
    # what vLLM's built-in priority mode does.
    preemption: bool = True
    # A waiting call displaces a running one only if it is this many queues
    # (rank classes) better. 1 is "strictly better", the paper's rule;
    # larger margins trade priority fidelity for fewer recomputations.
    preempt_margin: float = 1
    # A call already preempted this many times (for any reason) is not a
    # policy victim again; None means no limit. With recompute preemption a
    # victim loses its progress and, once LRU has evicted its prefix, must
    # re-prefill its whole history. Measured on BFCL at 12 programs/s, just past capacity (100,000
    # calls, one A100), an unlimited rule let a stream of new programs evict
    # the calls of the longest programs again and again (287 calls preempted
    # 5+ times) until re-prefill swamped the engine and throughput collapsed.
    # One policy preemption per call bounds that waste to one recompute.
    preempt_limit: int | None = 1

    # --- MLFQ (FastServe skip-join) ------------------------------------------
    # Quanta double from `mlfq_base_quantum`, about two decode steps of an 8B
    # model, as in FastServe where the first quantum is one iteration.
    mlfq_base_quantum: float = 0.05
    # Skip-join: a call enters the highest queue whose quantum covers its
    # estimated prefill time, prompt_tokens * this (A100, 8B: ~60 us/token).
    mlfq_prefill_s_per_token: float = 6e-5
    # A call that waited this long without service is promoted to Q1.
    mlfq_starve_after: float = 10.0

    # --- Load balancing --------------------------------------------------------
    # Calls with at most this many prompt tokens go to the least-used engine;
    # longer ones stay on their program's engine (the paper's rule, which
    # assumes a short prompt is mostly a shared system prompt). Where short
    # calls re-send their program's history, 0 (every call follows its
    # program) scales better: sweep locality-threshold, docs/paper-figures.md.
    locality_threshold: int = 2048

    # --- Process table -------------------------------------------------------
    # A program with no live call and no arrival for this long is forgotten.
    # Long enough to outlast the tool and think times of the workloads we
    # generate (seconds) and typical human turns in chat (a minute or two).
    program_ttl: float = 600.0

    def __post_init__(self) -> None:
        # Type first: the real engine builds these from JSON, where ``true`` would
        # otherwise pass as the number 1 and a string would fail a comparison.
        def number(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def seconds(v: float | None, optional: bool = False) -> bool:
            return (optional and v is None) or (number(v) and 0 < v <= MAX_SECONDS)

        def positive(v: float) -> bool:
            return number(v) and math.isfinite(v) and v > 0

        def integer(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        secs = f"> 0 and <= {MAX_SECONDS:g} seconds"
        checks = [
            ("num_queues", integer(self.num_queues) and 1 <= self.num_queues <= MAX_QUEUES,
             f"an integer from 1 to {MAX_QUEUES}"),
            ("queue_base", seconds(self.queue_base), secs),
            ("quantum", seconds(self.quantum, optional=True), f"null or {secs}"),
            ("beta", positive(self.beta), "> 0 and finite"),
            ("preemption", isinstance(self.preemption, bool), "true or false"),
            ("preempt_margin", positive(self.preempt_margin), "> 0 and finite"),
            ("preempt_limit", self.preempt_limit is None or (integer(self.preempt_limit) and self.preempt_limit >= 0),
             "null or an integer >= 0"),
            ("mlfq_base_quantum", seconds(self.mlfq_base_quantum), secs),
            ("mlfq_prefill_s_per_token",
             number(self.mlfq_prefill_s_per_token) and 0 <= self.mlfq_prefill_s_per_token <= MAX_SECONDS,
             f">= 0 and <= {MAX_SECONDS:g}"),
            ("mlfq_starve_after", seconds(self.mlfq_starve_after), secs),
            ("locality_threshold", integer(self.locality_threshold) and self.locality_threshold >= 0,
             "an integer >= 0 (tokens)"),
            ("program_ttl", seconds(self.program_ttl), secs),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"policy_params.{name}: expected {expected}, got {getattr(self, name)!r}")

    def queue_upper_bounds(self) -> list[float]:
        """Upper bound of each queue's attained-service range; the last is inf."""
        bounds = [self.queue_base * 2**i for i in range(self.num_queues - 1)]
        return bounds + [float("inf")]
