"""KV pins of a simulated replica (Continuum's time-to-live, ``engine.kv_ttl``).

A finished call whose program will send a follow-up keeps its keyed blocks
referenced, so no admission can evict them, until the follow-up takes them
up, the time-to-live passes, or the engine needs the memory. This table
holds the pins and their bookkeeping; *when* a pin gives way (before a
preemption, for a better-ranked waiting call, for the head of an idle
engine) is the replica's decision (`sim.replica.Replica`), as it is the
plugin's in the real engine, whose own table is `engine.kv_pins.KVPins`.

Pins are numbered in the order they were taken, so "the oldest pin" is the
first of an insertion-ordered dict; a live engine (``sim serve``) may hold
several pins of one call's thread, as the plugin does.
"""

from __future__ import annotations

from sim.core.expiries import Expiries
from sim.kvcache import BlockTable, KVCache

CallKey = tuple[str, str]  # (program id, call id)


class SimKVPins:
    def __init__(self, kv: KVCache):
        self.kv = kv
        self._pins: dict[int, tuple[CallKey, BlockTable]] = {}  # by serial, oldest first
        self._of_call: dict[CallKey, list[int]] = {}
        self._expiries = Expiries(self._pins)  # each pin's expiry, by serial
        self.pinned = 0  # calls whose KV was pinned at finish
        self.dropped = 0  # pins released early, for memory (`drop_oldest`)

    def __len__(self) -> int:
        """Pins held now."""
        return len(self._pins)

    def pin(self, key: CallKey, table: BlockTable, expires_at: float) -> None:
        """Keep call ``key``'s keyed blocks ``table`` until ``expires_at`` or an earlier release."""
        self.kv.keep_keyed(table)
        self.pinned += 1
        serial = self.pinned
        self._pins[serial] = (key, table)
        self._of_call.setdefault(key, []).append(serial)
        self._expiries.push(expires_at, serial)

    def next_expiry(self) -> float:
        """The earliest expiry still queued (it may be stale: only ever early), or infinity."""
        return self._expiries.next_time()

    def expiries_queued(self) -> bool:
        """Whether any expiry is queued (stale ones included): a cheap test before `expire`."""
        return bool(self._expiries)

    def expire(self, now: float) -> None:
        """Release the pins whose time-to-live has passed by ``now``."""
        for serial in self._expiries.pop_due(now):
            self._release(serial)

    def release_call(self, key: CallKey) -> None:
        """Release the pins of call ``key`` still held: a DAG child of it was admitted."""
        for serial in list(self._of_call.get(key, ())):
            self._release(serial)

    def release_taken_up(self, program_id: str, keys: list) -> None:
        """Release the pins of ``program_id`` whose whole history a call with block ``keys`` re-sends.

        Keys chain over every earlier block, so one equal key at the pin's
        last position means the whole pinned prefix is equal.
        """
        for serial, (key, table) in list(self._pins.items()):
            n = len(table.keys)
            if key[0] == program_id and len(keys) >= n and keys[n - 1] == table.keys[-1]:
                self._release(serial)

    def drop_oldest(self) -> None:
        """Release the oldest pin early, for memory; counted in ``dropped``."""
        self._release(next(iter(self._pins)))
        self.dropped += 1

    def drop_until_free(self, need: int) -> None:
        """Drop the oldest pins until ``need`` blocks are free or none is left."""
        kv = self.kv
        while self._pins and need > kv.capacity - kv.in_use:
            self.drop_oldest()

    def _release(self, serial: int) -> None:
        key, table = self._pins.pop(serial)
        serials = self._of_call[key]
        serials.remove(serial)
        if not serials:
            del self._of_call[key]
        self.kv.release(table)
