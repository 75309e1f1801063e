"""The stand-in token ids: what sim serve generates and the replayer sends in place of a model's tokens.

Both sides must agree on them (a replayed call re-sends the ids its
ancestor received, so the engine's prefix cache hits as it would on real
text), and both are clients of the engine model rather than parts of it: the
replayer and the gateway run in front of real vLLM servers. So the ids live
here, in the standard library alone, and importing them loads no simulator.
"""

from __future__ import annotations

# Filler output token ids live in [FILLER_BASE, FILLER_BASE + FILLER_VOCAB):
# inside Llama-3's 128,256-token vocabulary and clear of its special tokens.
FILLER_BASE = 1000
FILLER_VOCAB = 100_000
_MASK = (1 << 64) - 1


def mix64(*parts: int) -> int:
    """A fixed 64-bit mixing of integers (splitmix64 steps): process-independent."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & _MASK)) & _MASK
        x = (x + 0x9E3779B97F4A7C15) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        x ^= x >> 31
    return x


def filler_ids(seed: int, request: int, n: int) -> list[int]:
    """The ``n`` output token ids of one request: deterministic, distinct per request."""
    return [FILLER_BASE + mix64(seed, request, i) % FILLER_VOCAB for i in range(n)]
