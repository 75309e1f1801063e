"""The program-trace data model: a program is a DAG of LLM calls.

A trace file is JSON Lines, one `Program` per line (see traces/README.md).
These dataclasses are the in-memory form shared by the generators, the
importers, the simulator and the replayer, so every field here has exactly
one meaning everywhere.

Prefix sharing is stated per call, because the engine's prefix cache and the
locality balancer need it exactly:

* ``context_of``: the id of an *ancestor* call whose full context (its prompt
  followed by its output) is the start of this call's prompt. The rest of the
  prompt is new tokens. This is how a chat turn re-sends the history.
* ``shared_prefix``: a name and a token count for a prefix shared across
  programs (a system prompt). Only for calls without ``context_of``; a call
  that continues another inherits its ancestor's shared prefix.
* ``block_hashes`` with ``hash_block_tokens``: for imported traces that carry
  hashes of fixed-size prompt blocks (Mooncake). Two prompts share exactly
  the leading blocks whose hashes are equal. Exclusive with the other two.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

# Upper bounds on a trace's numbers. Past them a value is a typo or a corrupt
# file, not a workload: 1e9 s is about 32 years, and 10**9 tokens is a
# thousand times the longest context of any model served today. Within them
# every value is an exact float and sums of them stay finite, which the
# simulator's clock and token arithmetic assume.
MAX_SECONDS = 1e9  # arrival, delay
MAX_TOKENS = 10**9  # prompt_tokens, output_tokens, shared_prefix.tokens, hash_block_tokens


def is_finite_number(value: object) -> bool:
    """An int or float a float can hold: not a bool, not nan or infinity, no integer past 1.8e308.

    ``math.isfinite`` raises OverflowError on such an integer (a YAML
    ``10**400``), which would leave a parameter check as a traceback.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -sys.float_info.max <= value <= sys.float_info.max  # exact: Python compares int and float exactly
    return math.isfinite(value)

# ``slots=True``: a trace of a million calls is held in memory by the
# simulator; slots cut each Call's footprint roughly in half and make field
# access faster. Field names and meanings are unchanged.


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """A prefix of ``tokens`` tokens shared by every call that names ``key``."""

    key: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Call:
    """One LLM call of a program."""

    id: str
    parents: tuple[str, ...]
    prompt_tokens: int
    output_tokens: int
    delay: float = 0.0  # seconds after the last parent finishes (tool/think time)
    context_of: str | None = None
    shared_prefix: SharedPrefix | None = None
    block_hashes: tuple[int, ...] | None = None
    hash_block_tokens: int | None = None

    @property
    def context_tokens(self) -> int:
        """Tokens a descendant re-sends when it continues this call."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Program:
    """An agentic program: calls in a DAG, arriving at ``arrival`` seconds."""

    id: str
    arrival: float
    workload: str
    calls: tuple[Call, ...] = field(default_factory=tuple)

    def call_index(self) -> dict[str, Call]:
        return {c.id: c for c in self.calls}


def _fast_call_constructor():
    """``Call(*all nine fields)`` without the frozen dataclass ``__init__``.

    A frozen dataclass sets each field through ``object.__setattr__``, about
    3.4 us per Call; writing the slots directly takes about 1 us. Loading a
    million calls (traces.validate) and generating them (traces.generators)
    are hot paths, and the result is an ordinary, equal ``Call`` (tests check
    ``==`` against ``Call(...)``). Arguments are not checked here: callers
    pass validated values.
    """
    (s_id, s_par, s_pt, s_ot, s_d, s_co, s_sp, s_bh, s_hb) = (
        getattr(Call, name).__set__
        for name in ("id", "parents", "prompt_tokens", "output_tokens", "delay",
                     "context_of", "shared_prefix", "block_hashes", "hash_block_tokens")
    )
    new = object.__new__

    def make(cid, parents, prompt, output, delay, context_of, prefix, hashes, hbt):
        c = new(Call)
        s_id(c, cid)
        s_par(c, parents)
        s_pt(c, prompt)
        s_ot(c, output)
        s_d(c, delay)
        s_co(c, context_of)
        s_sp(c, prefix)
        s_bh(c, hashes)
        s_hb(c, hbt)
        return c

    return make


make_call = _fast_call_constructor()
