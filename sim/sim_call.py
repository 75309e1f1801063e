"""A call as a simulated engine replica holds it: the scheduler core's state plus
the token and KV bookkeeping of vLLM's ``Request``.

Kept apart from `sim.replica` because the replica's helpers (`sim.decode_cohort`,
`sim.draining`, `sim.lazy_decode`) and its callers (`sim.simulate`,
`sim.realtime`) all handle calls without needing the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from sim.core.state import CallState
from sim.kvcache import BlockTable


@dataclass(eq=False, slots=True)
class SimCall:
    """A call on an engine: the core's state plus token and KV bookkeeping."""

    program_id: str
    call_id: str
    prompt_tokens: int
    output_tokens: int
    keys: tuple[int, ...]  # content keys of the full blocks of prompt+output
    done: simpy.Event | None  # succeeded at finish, for callers that wait on it
    arrival: float
    # The call's parents in its program, whose pins its admission releases;
    # None when unknown (sim serve), and then it releases the pins of its
    # program whose history it re-sends. Seconds to pin its KV at finish
    # (0: none), for its program's follow-up.
    parents: tuple[str, ...] | None = None
    pin_ttl: float = 0.0
    core: CallState | None = None
    engine: int = -1
    num_tokens: int = 0  # prompt + generated
    num_computed: int = 0  # tokens whose KV is on the GPU (or swapped out)
    generated: int = 0
    swapped: bool = False
    blocks: BlockTable = field(default_factory=BlockTable)
    first_scheduled: float = -1.0
    first_token: float = -1.0
    finish: float = -1.0
    service: float = 0.0
    prefix_hit_tokens: int = 0
    # Lazy decode accounting (`sim.decode_cohort`): while ``steady`` the
    # token and service fields above are as of cohort step ``j_steps`` and
    # cohort service ``j_service``; ``q_due`` is the cohort service at
    # which the call's quantum runs out.
    steady: bool = False
    j_steps: int = 0
    j_service: float = 0.0
    q_due: float = 0.0
    sampled_in: int = -1  # the schedule (`Replica._sched_seq`) whose step sampled the last token

    def __post_init__(self) -> None:
        self.num_tokens = self.prompt_tokens


def core_call_id(program_id: str, call_id: str) -> str:
    """The scheduler core's id of a call: ``PROGRAM/CALL``, unambiguous whatever the ids hold.

    Trace ids may contain ``/``: program ``a/b`` call ``c`` and program ``a``
    call ``b/c`` would both read ``a/b/c`` and clash in the core. A ``/`` or
    ``\\`` in the program id is escaped with ``\\``, so the first unescaped
    ``/`` ends it; ids without either, as every generator writes, are unchanged.
    """
    if "/" in program_id or "\\" in program_id:
        program_id = program_id.replace("\\", "\\\\").replace("/", "\\/")
    return f"{program_id}/{call_id}"


