"""A paged KV cache with a prefix cache, at block granularity, as in vLLM v1.

Blocks are counted, not placed: the simulator needs how many are in use,
which prefixes are cached, and what is evicted, not addresses. Every block
is in one of three states:

* in use: referenced by at least one live call or pin (shared prefix blocks
  are counted once; a pin is a finished call's blocks kept for its
  program's follow-up, `KVCache.keep_keyed`);
* cached: a full block with a content key and no reference, kept in LRU
  order and evicted only when a fresh block is needed;
* empty.

``in_use`` never exceeds ``capacity`` (an invariant the tests check), and
cached blocks count as free for allocation. A call's registered blocks are
always a prefix of its blocks, so a later call's prompt can hit them.

Blocks are keyed when the replica schedules the chunk that fills them, as
vLLM does, so a call admitted later in the same step hits them.

A call that fills a block whose key is already present (in use or cached)
keeps its own copy, as vLLM keeps duplicate blocks under one hash: the
copy counts as in use until the call frees it. It happens whenever a fully
cached prompt is a whole number of blocks, since a hit stops one token
short of the prompt and its last block is recomputed. (It used to adopt the
held block and free its copy, as SGLang's radix cache does, which counted
a block fewer than vLLM and missed its preemptions.) The copy is the
call's alone: hits go to the first block under the key, as vLLM's lookup
returns the first; a freed copy is cached beside it in LRU order; and when
the block serving a key is evicted, the key's oldest other block (live or
freed) serves its hits.
"""

from __future__ import annotations

from bisect import insort
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class BlockTable:
    """The blocks one call holds: registered (keyed) blocks first, then private ones."""

    keys: list[int] = field(default_factory=list)
    private: int = 0
    copies: dict[int, int] | None = None  # key -> serial of this call's own copy under it (module docstring)

    @property
    def num_blocks(self) -> int:
        return len(self.keys) + self.private


class KVCache:
    def __init__(self, capacity: int, block_size: int = 16, prefix_caching: bool = True):
        if capacity < 1:
            raise ValueError(f"KV capacity must be >= 1 block, got {capacity}")
        self.capacity = capacity
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.in_use = 0
        self._refs: dict[int, int] = {}  # key -> references from live calls (>= 1)
        # Unreferenced blocks, LRU first: a key stands for the block that serves its hits, a
        # (key, serial) pair for a freed copy beside it.
        self._cached: OrderedDict[int | tuple[int, int], None] = OrderedDict()
        self._live_copies: dict[int, list[tuple[int, BlockTable]]] = {}  # key -> (serial, holder), oldest first
        self._cached_copies: dict[int, list[int]] = {}  # key -> serials of its freed copies, oldest first
        self._copy_serial = 0
        self.evictions = 0

    @property
    def free(self) -> int:
        """Blocks a new allocation may take (empty plus evictable cached)."""
        return self.capacity - self.in_use

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    # -- prefix lookup -------------------------------------------------------------
    def hit_blocks(self, keys: list[int] | tuple[int, ...], max_blocks: int) -> int:
        """Leading blocks of ``keys`` present in the cache (in use or cached)."""
        if not self.prefix_caching:
            return 0
        n = 0
        refs, cached = self._refs, self._cached
        for key in keys[:max_blocks]:
            if key in refs or key in cached:
                n += 1
            else:
                break
        return n

    def hit_cost(self, keys, n: int) -> int:
        """Free blocks consumed by referencing the first ``n`` keys (the cached ones)."""
        cached = self._cached
        return sum(1 for k in keys[:n] if k in cached)

    def acquire_hits(self, table: BlockTable, keys, n: int) -> None:
        """Reference the first ``n`` keys (all present) for a call with no blocks."""
        refs, cached = self._refs, self._cached
        hit = keys[:n]
        revived = 0
        for key in hit:
            r = refs.get(key)
            if r is None:
                del cached[key]
                refs[key] = 1
                revived += 1
            else:
                refs[key] = r + 1
        self.in_use += revived
        table.keys.extend(hit)

    # -- allocation ------------------------------------------------------------------
    def can_allocate(self, n: int) -> bool:
        return n <= self.capacity - self.in_use

    def allocate(self, table: BlockTable, n: int) -> None:
        """Give ``n`` fresh private blocks, evicting LRU cached blocks if needed."""
        if n <= 0:
            return
        if n > self.capacity - self.in_use:
            raise RuntimeError(f"KV allocation of {n} blocks with {self.free} free")
        empty = self.capacity - self.in_use - len(self._cached)
        for _ in range(max(0, n - empty)):
            self._evict()
        self.in_use += n
        table.private += n

    def _evict(self) -> None:
        """Reuse the least recently used cached block.

        When it served a key's hits, the key's oldest other block takes over,
        live or freed, as vLLM's lookup falls through to the next block
        registered under the hash.
        """
        cached = self._cached
        entry, _ = cached.popitem(last=False)
        self.evictions += 1
        if entry.__class__ is tuple:  # a freed copy: nothing was hitting it
            key, serial = entry
            _drop_item(self._cached_copies, key, serial)
            return
        key = entry
        live, freed = self._live_copies.get(key), self._cached_copies.get(key)
        if live and (not freed or live[0][0] < freed[0]):
            serial, holder = live[0]
            _drop_item(self._live_copies, key, live[0])
            del holder.copies[key]
            self._refs[key] = 1
        elif freed:
            serial = freed[0]
            _drop_item(self._cached_copies, key, serial)
            old = list(cached)  # the copy keeps its place in the LRU order, as the key's block now
            cached.clear()
            cached.update((key if e == (key, serial) else e, None) for e in old)

    def register_full(self, table: BlockTable, keys, computed_tokens: int) -> None:
        """Key the call's private blocks that are now full and have content keys."""
        if not self.prefix_caching:
            return
        full = min(computed_tokens // self.block_size, len(keys))
        refs, cached = self._refs, self._cached
        while len(table.keys) < full and table.private > 0:
            key = keys[len(table.keys)]
            if key in refs or key in cached:  # present already: ours stays a copy, still in use
                self._copy_serial += 1
                if table.copies is None:
                    table.copies = {}
                table.copies[key] = self._copy_serial
                self._live_copies.setdefault(key, []).append((self._copy_serial, table))
            else:
                refs[key] = 1
            table.private -= 1
            table.keys.append(key)

    def register_filled(self, table: BlockTable, keys, computed_tokens: int) -> None:
        """`register_full` for a decode that just filled one block: the common case inline."""
        if not table.private or not self.prefix_caching:
            return
        n = len(table.keys)
        if computed_tokens // self.block_size != n + 1 or n >= len(keys):
            self.register_full(table, keys, computed_tokens)
            return
        key = keys[n]
        refs = self._refs
        if key in refs or key in self._cached:
            self.register_full(table, keys, computed_tokens)
            return
        refs[key] = 1
        table.private -= 1
        table.keys.append(key)

    def allocate_one(self, table: BlockTable) -> None:
        """`allocate` of one block (a decode crossing into a new block)."""
        if self.in_use >= self.capacity:
            raise RuntimeError(f"KV allocation of 1 block with {self.free} free")
        if self.in_use + len(self._cached) >= self.capacity:
            self._evict()
        self.in_use += 1
        table.private += 1

    def release(self, table: BlockTable) -> None:
        """Free a call's blocks; its keyed blocks stay cached for later hits."""
        refs, cached = self._refs, self._cached
        freed = table.private
        copies = table.copies
        # Release the tail first so the LRU evicts a prefix's end before its start.
        for key in reversed(table.keys):
            if copies is not None and key in copies:  # a freed copy is cached beside the key's block
                serial = copies[key]
                freed += 1
                live = self._live_copies[key]
                live.remove((serial, table))
                if not live:
                    del self._live_copies[key]
                cached[(key, serial)] = None
                insort(self._cached_copies.setdefault(key, []), serial)
                continue
            r = refs[key]
            if r > 1:
                refs[key] = r - 1
            else:
                del refs[key]
                cached[key] = None
                freed += 1
        self.in_use -= freed
        table.keys.clear()
        table.private = 0
        table.copies = None

    def keep_keyed(self, table: BlockTable) -> None:
        """Free a finished call's private blocks but keep its keyed ones referenced.

        The table then pins its prefix (Continuum's KV time-to-live): pinned
        blocks count as in use, so no allocation can evict them, until
        `release` returns them to the LRU order.
        """
        self.in_use -= table.private
        table.private = 0

    def freed_by_release(self, table: BlockTable) -> int:
        """Blocks that releasing ``table`` would return (shared blocks stay in use)."""
        refs, copies = self._refs, table.copies or ()
        return table.private + sum(1 for k in table.keys if k in copies or refs[k] == 1)


def _drop_item(index: dict, key: int, item) -> None:
    """Remove ``item`` from ``index[key]`` (a short list), and the key with its last item."""
    items = index[key]
    items.remove(item)
    if not items:
        del index[key]
