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

One departure from vLLM, chosen for simplicity: when a call fills a block
whose key is already held (a running call computing content that another
call keyed since this one was admitted, which same-step keying makes rare),
it adopts the held block and frees its own copy, as SGLang's radix cache
does; vLLM would keep both until one is freed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class BlockTable:
    """The blocks one call holds: registered (keyed) blocks first, then private ones."""

    keys: list[int] = field(default_factory=list)
    private: int = 0

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
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, LRU first
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
            self._cached.popitem(last=False)
            self.evictions += 1
        self.in_use += n
        table.private += n

    def register_full(self, table: BlockTable, keys, computed_tokens: int) -> None:
        """Key the call's private blocks that are now full and have content keys."""
        if not self.prefix_caching:
            return
        full = min(computed_tokens // self.block_size, len(keys))
        refs, cached = self._refs, self._cached
        while len(table.keys) < full and table.private > 0:
            key = keys[len(table.keys)]
            if key in refs:  # a sibling computed it: adopt theirs, free ours
                refs[key] += 1
                self.in_use -= 1
            elif key in cached:
                del cached[key]
                refs[key] = 1
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
            self._cached.popitem(last=False)
            self.evictions += 1
        self.in_use += 1
        table.private += 1

    def release(self, table: BlockTable) -> None:
        """Free a call's blocks; its keyed blocks stay cached for later hits."""
        refs, cached = self._refs, self._cached
        freed = table.private
        # Release the tail first so the LRU evicts a prefix's end before its start.
        for key in reversed(table.keys):
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
        refs = self._refs
        return table.private + sum(1 for k in table.keys if refs[k] == 1)
