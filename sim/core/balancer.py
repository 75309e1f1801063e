"""Load balancers that pick an engine replica for each call.

``loads`` is one number per engine, lower meaning less used. Both the
simulator and the gateway pass the count of live calls (running plus
waiting) on each engine: the one load signal a gateway sees without asking
the engines. Ties go to the lowest engine index, so decisions are
deterministic.
"""

from __future__ import annotations

from typing import Sequence

from sim.core.state import ProgramState


def least_loaded(loads: Sequence[float]) -> int:
    if not loads:
        raise ValueError("no engines to balance over")
    return min(range(len(loads)), key=loads.__getitem__)


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, prompt_tokens: int, program: ProgramState, loads: Sequence[float]) -> int:
        engine = self._next % len(loads)
        self._next += 1
        return engine


class LeastUsed:
    name = "least_used"

    def choose(self, prompt_tokens: int, program: ProgramState, loads: Sequence[float]) -> int:
        return least_loaded(loads)


class Locality:
    """The paper's rule: short calls spread, long calls stay with their program.

    A call of at most ``threshold`` prompt tokens goes to the least-used
    engine: its prefix is mostly a shared system prompt that every engine
    has cached. A longer call goes to the engine its program is pinned to,
    where the program's history is cached. The pin is set on the first long
    call: to the engine of the program's previous call, which holds the
    history that call re-sent, or to the least-used engine for a program's
    first call. (Pinning to the least-used engine instead would re-prefill
    the whole history on the program's first long call.)
    """

    name = "locality"

    def __init__(self, threshold: int = 2048):
        self.threshold = threshold

    def choose(self, prompt_tokens: int, program: ProgramState, loads: Sequence[float]) -> int:
        if prompt_tokens <= self.threshold:
            engine = least_loaded(loads)
        else:
            if program.engine is None or program.engine >= len(loads):
                last = program.last_engine
                program.engine = last if last is not None and last < len(loads) else least_loaded(loads)
            engine = program.engine
        program.last_engine = engine
        return engine


def make_balancer(name: str, locality_threshold: int = 2048):
    if name == "round_robin":
        return RoundRobin()
    if name == "least_used":
        return LeastUsed()
    if name == "locality":
        return Locality(locality_threshold)
    raise ValueError(f"unknown balancer {name!r}; valid choices: round_robin, least_used, locality")
