"""Expiry times of held things that mostly end early: the heap behind KV pins' time-to-live.

The simulator's replica (`sim.replica`) and the vLLM plugin (`engine.kv_pins`)
both pin a finished call's KV until a time-to-live passes, and most pins end
sooner (a follow-up takes them up, or they give way to work). Removing an
entry from the middle of a heap is costly, so an ended pin's entry stays
until it surfaces and is skipped then; once stale entries outnumber live
ones the heap is rebuilt, or a long time-to-live would grow it by one entry
per pin ever made.
"""

from __future__ import annotations

import heapq
from typing import Collection, Hashable, Iterator


class Expiries:
    """A heap of (time, key) over the keys of ``live``; a key no longer in ``live`` is stale."""

    def __init__(self, live: Collection[Hashable]):
        self._live = live
        self._heap: list[tuple[float, Hashable]] = []

    def __len__(self) -> int:
        """Entries left, stale ones included."""
        return len(self._heap)

    def push(self, when: float, key: Hashable) -> None:
        heapq.heappush(self._heap, (when, key))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [entry for entry in self._heap if entry[1] in self._live]
            heapq.heapify(self._heap)

    def next_time(self) -> float:
        """The earliest time in the heap (it may be stale: only ever early), or infinity."""
        return self._heap[0][0] if self._heap else float("inf")

    def pop_due(self, now: float) -> Iterator[Hashable]:
        """The live keys whose time is ``now`` or earlier, earliest first; stale entries are dropped."""
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            if key in live:
                yield key
