"""The latency-model interface: one engine step's batch in, seconds out.

Every model sees a step only through a `StepShape`, a handful of sums over
the sequences in the batch. That keeps each model's cost O(1) per step, lets
the engine model keep the sums as it builds the batch, and makes the fitted
regression (issue: latency models) and the roofline agree on what a "batch"
is. The sums are exactly the quantities whose cost differs:

* GEMMs scale with the tokens scheduled (``num_tokens``);
* prefill attention's FLOPs scale with query x key pairs (``prefill_attn_pairs``);
* attention reads the KV cache: every decode its context (``decode_kv_tokens``)
  and every prefill chunk its cached context as well (``prefill_kv_tokens``),
  which is what a short chunk on a long context spends its time on (a two-token
  chunk at 16,384 tokens of context reads as much as a decode there);
  ``kv_read_tokens`` is their sum;
* a fixed per-step overhead (scheduling, sampling, kernel launches).

``host_time`` is the part of ``step_time`` spent on the CPU (scheduling,
input preparation, output processing). A synchronous engine pays it between
GPU passes; under async scheduling vLLM does it for step N+1 while step N
runs on the GPU, so back-to-back steps take ``max(step - host, host)``
(`sim/replica.py`, "async scheduling"). A model that cannot tell the two
apart reports 0, which leaves async steps as long as synchronous ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol


@dataclass(frozen=True)
class StepShape:
    """Aggregate shape of one engine step.

    A sequence that computes exactly one token is a decode; one that
    computes more is a prefill chunk. ``context`` below is the number of
    tokens already in the KV cache before the step.
    """

    num_seqs: int = 0
    num_tokens: int = 0  # new tokens over all sequences
    num_decode: int = 0
    decode_kv_tokens: int = 0  # sum over decodes of (context + 1)
    prefill_tokens: int = 0  # new tokens over prefill chunks
    prefill_attn_pairs: int = 0  # sum over chunks of new * (context + (new + 1) / 2), rounded down
    prefill_kv_tokens: int = 0  # sum over chunks of (context + new), as decode_kv_tokens counts (context + 1)

    @property
    def kv_read_tokens(self) -> int:
        """KV tokens the step's attention reads: its decodes' and its prefill chunks'."""
        return self.decode_kv_tokens + self.prefill_kv_tokens

    @staticmethod
    def from_batch(batch: Iterable[tuple[int, int]]) -> "StepShape":
        """Build from ``(new_tokens, context)`` per sequence."""
        n = tok = nd = dkv = pt = pairs = pkv = 0
        for new, ctx in batch:
            if new <= 0 or ctx < 0:
                raise ValueError(f"bad sequence in batch: new_tokens={new}, context={ctx}")
            n += 1
            tok += new
            if new == 1:
                nd += 1
                dkv += ctx + 1
            else:
                pt += new
                pairs += attn_pairs(new, ctx)
                pkv += ctx + new
        return StepShape(n, tok, nd, dkv, pt, pairs, pkv)


def attn_pairs(new: int, ctx: int) -> int:
    """Causal query-key pairs of a chunk of ``new`` tokens after ``ctx`` cached ones."""
    return new * ctx + new * (new + 1) // 2


class LatencyModel(Protocol):
    """Maps a step to its duration in seconds. Implementations are pure."""

    name: str

    def step_time(self, shape: StepShape) -> float: ...

    def host_time(self, shape: StepShape) -> float:
        """The CPU part of ``step_time(shape)``; callers cap it at the whole step."""
        ...


@dataclass(frozen=True)
class ConstantLatency:
    """Every non-empty step takes ``seconds``: for tests and queueing-theory checks."""

    seconds: float = 0.02
    name: str = "constant"

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"constant latency must be > 0 seconds, got {self.seconds}")

    def step_time(self, shape: StepShape) -> float:
        return self.seconds if shape.num_seqs else 0.0

    def host_time(self, shape: StepShape) -> float:
        return 0.0  # a constant step has no parts: async steps stay as long
