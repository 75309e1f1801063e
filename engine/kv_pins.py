"""KV pins on vLLM's block pool: Continuum's time-to-live in the real engine.

Why: when a call finishes, vLLM returns its blocks to the LRU free queue.
While its program is in tool time, other admissions take those blocks, so
the program's next call re-prefills its whole history. A client that knows a
follow-up is coming tags the call with ``kv_ttl`` (seconds,
`engine.plugin_config`). At finish the plugin then takes one reference on
each of the call's cached (hashed) blocks. They leave the free queue, so
nothing can evict them, and the follow-up hits them.

A pin ends at the first of:

* **take-up**: a call of the same program is admitted holding the pin's last
  block, so it hit the whole pinned history and holds its own references;
* **expiry**: ``kv_ttl`` seconds after the finish (checked once per step);
* **giving way**: the scheduler drops the oldest pins rather than preempt or
  idle, by the simulator's rules (`sim.replica`, docs/findings.md "Continuum's KV
  time-to-live"). See `engine.scheduler` for where each rule hooks in.

The simulator releases a pin when one of the call's DAG children is
admitted. An engine does not see the DAG, so take-up stands in for it: a
child re-sends its parent's history, hits the pinned blocks and so holds
the last one; a sibling branch shares at most the common prefix.

Releasing a pin hands its blocks back with vLLM's own `BlockPool.free_blocks`
(tail first, as `KVCacheManager.free` orders them), so they stay cached and
are evicted in LRU order like any freed block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from sim.core.expiries import Expiries


@dataclass(slots=True)
class KVPin:
    program_id: str
    blocks: tuple[list[KVCacheBlock], ...]  # per KV cache group, the referenced blocks in sequence order
    last_index: int  # position of the last pinned block in the call's group-0 block list
    expiry: float


class KVPins:
    """The pins held on one engine's block pool, oldest first."""

    def __init__(self, block_pool: BlockPool):
        self._pool = block_pool
        self._pins: dict[int, KVPin] = {}  # insertion order is pin order
        self._by_program: dict[str, list[int]] = {}
        self._expiries = Expiries(self._pins)  # each pin's expiry, by pin id
        self._ids = itertools.count()
        # Counters, for tests and logs.
        self.pinned = 0
        self.taken_up = 0
        self.expired = 0
        self.dropped = 0  # released early to make room

    def __len__(self) -> int:
        return len(self._pins)

    def blocks_held(self) -> int:
        """References the pins hold, over all groups."""
        return sum(len(g) for pin in self._pins.values() for g in pin.blocks)

    def pin(self, program_id: str, request_blocks: Sequence[Sequence[KVCacheBlock]], expiry: float) -> None:
        """Reference a finished call's cached blocks until ``expiry`` (nothing if it has none).

        Call before vLLM frees the request, while it still owns its blocks.
        Only hashed blocks are pinned: the partial tail block can never be hit.
        """
        if not request_blocks:
            return
        first = request_blocks[0]
        last_index = max((i for i, b in enumerate(first) if b.block_hash is not None and not b.is_null), default=-1)
        if last_index < 0:
            return
        groups = tuple([b for b in blocks if b.block_hash is not None and not b.is_null] for blocks in request_blocks)
        for blocks in groups:
            self._pool.touch(blocks)
        pin_id = next(self._ids)
        self._pins[pin_id] = KVPin(program_id, groups, last_index, expiry)
        self._by_program.setdefault(program_id, []).append(pin_id)
        self._expiries.push(expiry, pin_id)
        self.pinned += 1

    def release_taken_up(self, program_id: str, request_blocks: Sequence[Sequence[KVCacheBlock]]) -> None:
        """Release the program's pins whose history an admitted call now holds."""
        ids = self._by_program.get(program_id)
        if not ids or not request_blocks:
            return
        # By hash, not identity: hashes chain over the whole prefix, so an equal hash at the pin's last
        # position means the whole pinned history is held, whichever copy of it the call hit. vLLM keeps
        # duplicate blocks under one hash (a fully cached block-aligned prompt recomputes its last block),
        # and a follow-up's lookup may return another program's copy: by identity the pin was never taken
        # up. The simulator compares content keys the same way.
        held = request_blocks[0]
        taken = [
            pin_id for pin_id in ids
            if len(held) > (pin := self._pins[pin_id]).last_index
            and held[pin.last_index].block_hash == pin.blocks[0][-1].block_hash
        ]
        for pin_id in taken:
            self._release(pin_id)
        self.taken_up += len(taken)

    def expire(self, now: float) -> None:
        """Release every pin whose time-to-live has passed."""
        for pin_id in self._expiries.pop_due(now):
            self._release(pin_id)
            self.expired += 1

    def drop_oldest(self) -> None:
        """Release the oldest pin early, to make room for work."""
        self._release(next(iter(self._pins)))
        self.dropped += 1

    def drop_until_free(self, need: int) -> None:
        """Release the oldest pins until the pool has ``need`` free blocks or no pin is left."""
        pool = self._pool
        while self._pins and pool.get_num_free_blocks() < need:
            self.drop_oldest()

    def hold_all_used_blocks(self) -> bool:
        """Whether the pins are all that holds blocks: releasing them empties the pool.

        vLLM resets its prefix cache only when no block is in use, so pins are
        released for a reset only when that is what stands in the way; with a
        request still holding blocks the reset fails, and the pins stay.
        """
        refs: dict[int, int] = {}
        for pin in self._pins.values():
            for blocks in pin.blocks:
                for block in blocks:
                    refs[block.block_id] = refs.get(block.block_id, 0) + 1
        return all(b.is_null or b.ref_cnt <= refs.get(b.block_id, 0) for b in self._pool.blocks)

    def release_all(self) -> None:
        for pin_id in list(self._pins):
            self._release(pin_id)

    def _release(self, pin_id: int) -> None:
        pin = self._pins.pop(pin_id)
        ids = self._by_program[pin.program_id]
        ids.remove(pin_id)
        if not ids:
            del self._by_program[pin.program_id]
        for blocks in pin.blocks:
            self._pool.free_blocks(reversed(blocks))
