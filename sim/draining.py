"""Finished calls whose last token is still in flight, under async scheduling.

With vLLM's async scheduling the engine schedules step N+1 before it has
processed step N's output, so a call that finished in step N keeps its
sequence slot and KV blocks until step N+1 has been scheduled: vLLM frees
them only when it processes N's outputs. Until then the call is still in
vLLM's running list, so it may be a memory or policy victim, which frees
them a step early. That costs nothing: its last token arrives anyway, so no
work is redone, and it is not counted as a preemption.

This table holds those calls for a simulated replica (`sim.replica.Replica`,
"async scheduling"); when to release them, and which victim to take, stay
the replica's decisions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from sim.kv_pins import SimKVPins
from sim.kvcache import KVCache

if TYPE_CHECKING:
    from sim.sim_call import SimCall


class DrainingCalls:
    """One replica's finished calls still holding their slot and KV until their last output is processed."""

    def __init__(self, kv: KVCache, pins: SimKVPins):
        self.kv = kv
        self.pins = pins
        self._calls: list[SimCall] = []  # in finishing order

    def __len__(self) -> int:
        """The sequence slots these calls hold."""
        return len(self._calls)

    def __iter__(self) -> Iterator[SimCall]:
        return iter(self._calls)

    def add(self, call: SimCall) -> None:
        """``call`` has sampled its last token in the step just ended: it holds its slot and KV for now."""
        self._calls.append(call)

    def evict_below(self, victim: SimCall) -> bool:
        """Evict the worst draining call, if it ranks below ``victim``; whether one was.

        vLLM still holds such a call in its running list, and its memory
        victim is the worst there (``running.pop()``, or the largest
        priority), so it may be this call rather than the running one the
        replica would preempt. Evicting it frees its KV a step early and
        costs nothing: its last token arrives anyway. It is not counted as a
        preemption, since no work is redone.
        """
        calls = self._calls
        if not calls:
            return False
        worst = max(range(len(calls)), key=lambda j: calls[j].core.key)
        if calls[worst].core.key < victim.core.key:
            return False
        self.kv.release(calls.pop(worst).blocks)
        return True

    def drop(self, call: SimCall) -> None:
        """Free a draining call's slot and KV now, before its output is processed (a policy victim)."""
        self._calls.remove(call)
        self.kv.release(call.blocks)

    def release(self, now: float) -> bool:
        """Free the slots and KV of all draining calls, their output processed at ``now``; True if any.

        A call that pins its KV for a follow-up (``pin_ttl``) is pinned now,
        as the plugin pins it when vLLM processes its last output.
        """
        if not self._calls:
            return False
        for call in self._calls:
            blocks = call.blocks
            if call.pin_ttl > 0:
                self.kv.register_full(blocks, call.keys, call.num_computed)  # vLLM keys the last blocks first
                if blocks.keys:
                    self.pins.pin((call.program_id, call.call_id), blocks, now + call.pin_ttl)
                    continue
            self.kv.release(blocks)
        self._calls.clear()
        return True
