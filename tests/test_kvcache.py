"""The block-counting KV cache by hand: copies of a block under one key, as vLLM keeps them.

A call that fills a block whose key is already present keeps its own copy
(vLLM's hash map holds several blocks per hash). These cases fix what each
copy costs, where a freed one goes in the LRU order, and which block serves
a key's hits once the first is evicted. `test_replica_vs_vllm` checks the
same against vLLM's scheduler on random cases. A state machine then runs
random arrivals, growth, pins and frees against a count of what the calls'
block tables hold.
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


# ---------------------------------------------------------------- random operation sequences
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule  # noqa: E402

# A prompt's blocks, each one of a few contents: hits, shared blocks and copies are common. A block's key
# stands for its whole prefix (vLLM chains the hashes), so equal keys only ever start equal prompts.
BLOCKS = st.lists(st.integers(0, 2), min_size=1, max_size=5)


class KVCacheMachine(RuleBasedStateMachine):
    """Calls arrive (hits, then fresh blocks, keyed as filled), grow by a block, are pinned and freed.

    The cache's ``in_use`` is checked against a count made from the calls'
    own block tables: a block per private block and per copy, and one per
    key the calls share. A leak on release or an allocation past capacity
    shows at once, where the engine-level tests need a full cache to see it.
    """

    tables = Bundle("tables")

    def __init__(self):
        super().__init__()
        self.kv = KVCache(capacity=8)
        self.live: list[tuple[BlockTable, list[int]]] = []
        self.key_of: dict[tuple[int, ...], int] = {}
        self.pinned: list[tuple[BlockTable, list[int]]] = []  # also in live: they hold blocks

    @rule(target=tables, blocks=BLOCKS, extra=st.integers(0, 3))
    def arrive(self, blocks, extra):
        keys = [self.key_of.setdefault(tuple(blocks[: i + 1]), len(self.key_of)) for i in range(len(blocks))]
        kv, table = self.kv, BlockTable()
        n = kv.hit_blocks(keys, len(keys) - 1)  # a hit stops short of the prompt's last block, as vLLM's
        fresh = len(keys) - n + extra
        if not kv.can_allocate(kv.hit_cost(keys, n) + fresh):
            return table  # does not fit: not admitted
        kv.acquire_hits(table, keys, n)
        kv.allocate(table, fresh)
        kv.register_full(table, keys, 16 * len(keys))
        self.live.append((table, keys))
        return table

    @precondition(lambda self: len(self.live) > len(self.pinned))
    @rule(data=st.data())
    def grow(self, data):
        table, _ = data.draw(st.sampled_from([e for e in self.live if e not in self.pinned]))
        if self.kv.can_allocate(1):
            self.kv.allocate_one(table)

    @rule(table=consumes(tables), pin=st.booleans())
    def finish(self, table, pin):
        entry = next((e for e in self.live if e[0] is table), None)
        if entry is None or entry in self.pinned:
            return
        if pin:  # its keyed blocks stay referenced until the pin is dropped
            self.kv.keep_keyed(table)
            assert table.private == 0
            self.pinned.append(entry)
        else:
            self.kv.release(table)
            self.live.remove(entry)

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def drop_pin(self, data):
        entry = data.draw(st.sampled_from(self.pinned))
        self.kv.release(entry[0])
        self.pinned.remove(entry)
        self.live.remove(entry)

    @invariant()
    def in_use_is_what_the_tables_hold(self):
        shared = {k for t, _ in self.live for k in t.keys if not (t.copies and k in t.copies)}
        held = sum(t.private + len(t.copies or ()) for t, _ in self.live) + len(shared)
        assert self.kv.in_use == held
        assert 0 <= self.kv.in_use <= self.kv.capacity
        assert self.kv.in_use + self.kv.num_cached <= self.kv.capacity

    @invariant()
    def held_keys_hit(self):
        for t, keys in self.live:  # a block in use is never evicted: its prefix hits while it is held
            assert self.kv.hit_blocks(keys, len(keys)) >= len(t.keys)


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None, derandomize=True,
                                       database=None)
