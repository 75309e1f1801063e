"""The block-counting KV cache by hand: copies of a block under one key, as vLLM keeps them.

A call that fills a block whose key is already present keeps its own copy
(vLLM's hash map holds several blocks per hash). These cases fix what each
copy costs, where a freed one goes in the LRU order, and which block serves
a key's hits once the first is evicted. `test_replica_vs_vllm` checks the
same against vLLM's scheduler on random cases.
"""

from sim.kvcache import BlockTable, KVCache

K1, K2 = 101, 202


def filled(kv: KVCache, keys: list[int]) -> BlockTable:
    """A call that computed one full block per key from scratch (no hits)."""
    table = BlockTable()
    kv.allocate(table, len(keys))
    kv.register_full(table, keys, 16 * len(keys))
    return table


def test_a_second_call_computing_a_present_key_holds_its_own_copy():
    kv = KVCache(capacity=4)
    a = filled(kv, [K1])
    b = filled(kv, [K1])  # e.g. a fully cached block-aligned prompt: its last block is recomputed
    assert kv.in_use == 2 and b.copies == {K1: 1}
    assert kv.freed_by_release(b) == 1 and kv.freed_by_release(a) == 1
    kv.release(a)
    assert kv.in_use == 1 and kv.hit_blocks([K1], 1) == 1 and kv.hit_cost([K1], 1) == 1  # a's block, cached


def test_when_the_first_block_is_evicted_a_live_copy_serves_the_hits():
    kv = KVCache(capacity=3)
    a = filled(kv, [K1])
    b = filled(kv, [K1])
    kv.release(a)  # K1's first block is cached; b's copy is in use
    filled(kv, [K2, 303])  # needs both free blocks: evicts a's block
    assert kv.evictions == 1 and kv.in_use == 3
    assert kv.hit_blocks([K1], 1) == 1 and kv.hit_cost([K1], 1) == 0  # b's copy, shared at no cost
    c = BlockTable()
    kv.acquire_hits(c, [K1], 1)
    assert kv.in_use == 3 and b.copies == {}
    kv.release(b)
    assert kv.in_use == 3  # c still holds it
    kv.release(c)
    assert kv.in_use == 2 and kv.hit_blocks([K1], 1) == 1


def test_a_freed_copy_is_cached_after_the_first_block_and_evicted_in_lru_order():
    kv = KVCache(capacity=4)
    a = filled(kv, [K1])
    b = filled(kv, [K1])
    kv.release(b)  # the copy is freed first: least recently used
    kv.release(a)
    assert kv.in_use == 0 and kv.num_cached == 2
    filled(kv, [1, 2, 3])  # 2 empty blocks, then one eviction: the copy
    assert kv.evictions == 1 and kv.hit_blocks([K1], 1) == 1
    filled(kv, [4])  # the next eviction takes K1's block itself
    assert kv.evictions == 2 and kv.hit_blocks([K1], 1) == 0


def test_a_freed_copy_serves_the_hits_from_its_place_in_the_lru_order():
    kv = KVCache(capacity=4)
    a = filled(kv, [K1])
    b = filled(kv, [K1])
    kv.release(a)  # K1's block first in the LRU order
    kv.release(b)  # then the copy
    other = filled(kv, [K2])
    kv.release(other)  # K2 after both
    filled(kv, [1])  # one empty block left: no eviction
    filled(kv, [2])  # evicts K1's block: the copy now serves K1
    assert kv.evictions == 1 and kv.hit_blocks([K1], 1) == 1 and kv.hit_blocks([K2], 1) == 1
    filled(kv, [3])  # the copy comes before K2 in the LRU order
    assert kv.hit_blocks([K1], 1) == 0 and kv.hit_blocks([K2], 1) == 1


def test_a_pinned_copy_stays_in_use_until_the_pin_is_released():
    kv = KVCache(capacity=4)
    a = filled(kv, [K1])
    b = filled(kv, [K1])
    kv.keep_keyed(b)  # a finished call's blocks kept for its program (kv_ttl)
    kv.release(a)
    assert kv.in_use == 1
    kv.release(b)
    assert kv.in_use == 0 and kv.num_cached == 2
