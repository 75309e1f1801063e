"""Prefix chain keys: exact sharing semantics, checked against explicit token lists."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import combinations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_traces_io import valid_programs

from traces.dag import topological_order
from traces.format import Call, Program, SharedPrefix
from traces.prefix import context_block_keys, name_bytes, name_id


def explicit_tokens(program: Program) -> dict[str, list[tuple]]:
    """The reference model: every call's context as a list of token identities."""
    out: dict[str, list[tuple]] = {}
    for c in topological_order(program):
        if c.context_of is not None:
            toks = list(out[c.context_of])
        elif c.shared_prefix is not None:
            toks = [("shared", c.shared_prefix.key, i) for i in range(c.shared_prefix.tokens)]
        elif c.block_hashes is not None:
            h = c.hash_block_tokens
            toks = [("hash", c.block_hashes[t // h], t % h) for t in range(c.prompt_tokens)]
        else:
            toks = []
        toks += [("prompt", program.id, c.id, i) for i in range(c.prompt_tokens - len(toks))]
        toks += [("output", program.id, c.id, i) for i in range(c.output_tokens)]
        out[c.id] = toks
    return out


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def common_keys(a: tuple, b: tuple) -> int:
    return common_prefix(a, b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(valid_programs(), min_size=1, max_size=3), st.sampled_from([1, 4, 16, 512]))
def test_keys_share_exactly_the_identical_full_blocks(programs, bs):
    programs = [Program(f"p{i}", p.arrival, p.workload, p.calls) for i, p in enumerate(programs)]
    toks, keys = {}, {}
    for p in programs:
        for cid, t in explicit_tokens(p).items():
            toks[(p.id, cid)] = t
        for cid, k in context_block_keys(p, bs).items():
            keys[(p.id, cid)] = k
    assert toks.keys() == keys.keys()
    for name, k in keys.items():
        assert len(k) == len(toks[name]) // bs
    for a, b in combinations(sorted(keys), 2):
        assert common_keys(keys[a], keys[b]) == min(common_prefix(toks[a], toks[b]), len(toks[a]), len(toks[b])) // bs


def test_programs_sharing_a_system_prompt_share_exactly_its_full_blocks():
    def prog(pid):
        return Program(pid, 0.0, "w", (Call("c0", (), 300, 20, shared_prefix=SharedPrefix("sys", 100)),))

    a = context_block_keys(prog("a"))["c0"]
    b = context_block_keys(prog("b"))["c0"]
    assert len(a) == len(b) == 320 // 16
    assert common_keys(a, b) == 100 // 16  # 6 full blocks; the 7th is partial -> differs


def test_child_shares_exactly_the_parents_full_context_blocks():
    parent = Call("a", (), 45, 30)  # context 75 tokens: 4 full blocks + 11 tokens
    child = Call("b", ("a",), 75 + 40, 10, context_of="a")
    k = context_block_keys(Program("p", 0.0, "w", (parent, child)))
    assert len(k["a"]) == 4 and len(k["b"]) == (115 + 10) // 16
    assert k["b"][:4] == k["a"]
    assert k["b"][4] != k["a"][-1]
    # Siblings continuing the same parent share the parent's blocks, then diverge.
    sib = Call("c", ("a",), 75 + 40, 10, context_of="a")
    k2 = context_block_keys(Program("p", 0.0, "w", (parent, child, sib)))
    assert common_keys(k2["b"], k2["c"]) == 4


def test_exact_block_boundary_context_shares_all_its_blocks():
    parent = Call("a", (), 20, 12)  # 32 tokens = 2 full blocks
    child = Call("b", ("a",), 32, 1, context_of="a")  # no new prompt tokens
    k = context_block_keys(Program("p", 0.0, "w", (parent, child)))
    assert k["b"] == k["a"] and len(k["a"]) == 2


def test_partial_blocks_never_get_keys():
    k = context_block_keys(Program("p", 0.0, "w", (Call("a", (), 10, 5),)))
    assert k["a"] == ()


def test_block_hash_semantics():
    def prog(pid, prompt, hashes, h=32):
        return Program(pid, 0.0, "w", (Call("c", (), prompt, 4, block_hashes=hashes, hash_block_tokens=h),))

    a = context_block_keys(prog("a", 96, (1, 2, 3)))["c"]
    b = context_block_keys(prog("b", 96, (1, 2, 9)))["c"]
    assert common_keys(a, b) == 64 // 16
    c = context_block_keys(prog("c", 70, (1, 2, 3)))["c"]  # last hash block holds 6 tokens
    assert common_keys(a, c) == 64 // 16  # 70 tokens: block 4 (64..80) mixes hash and output tokens
    # Same hash ids in another program are the same tokens.
    assert context_block_keys(prog("z", 96, (1, 2, 3)))["c"][:6] == a[:6]
    # Hash blocks not a multiple of the KV block: 24-token hash blocks, 16-token KV blocks.
    d = context_block_keys(prog("d", 48, (7, 8), h=24))["c"]
    e = context_block_keys(prog("e", 48, (7, 5), h=24))["c"]
    assert common_keys(d, e) == 1  # tokens 0..23 identical, block 1 spans 16..31
    # Ids that Python's int hash maps together (mod 2**61 - 1; -1 and -2) are distinct blocks.
    for x, y in ((0, 2**61 - 1), (-1, -2), (5, 5 + 2**61 - 1)):
        assert common_keys(context_block_keys(prog("x", 32, (x,)))["c"], context_block_keys(prog("y", 32, (y,)))["c"]) == 0


def test_long_chat_keys_are_built_incrementally_and_are_consistent():
    calls = [Call("c0", (), 100, 50)]
    for t in range(1, 80):
        prev = calls[-1]
        calls.append(Call(f"c{t}", (prev.id,), prev.prompt_tokens + prev.output_tokens + 37, 50, context_of=prev.id))
    k = context_block_keys(Program("chat", 0.0, "sharegpt", tuple(calls)))
    for t in range(1, 80):
        prev = calls[t - 1]
        n = (prev.prompt_tokens + prev.output_tokens) // 16
        assert k[f"c{t}"][:n] == k[f"c{t-1}"][:n]
        assert len(k[f"c{t}"]) == (calls[t].prompt_tokens + 50) // 16


def test_keys_are_identical_across_processes_with_different_hash_seeds():
    code = (
        "from traces.format import *; from traces.prefix import context_block_keys;"
        "p = Program('p', 0.0, 'w', (Call('a', (), 70, 30, shared_prefix=SharedPrefix('sys', 40)),"
        " Call('b', ('a',), 140, 5, context_of='a')));"
        "print(context_block_keys(p))"
    )
    outs = set()
    for seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1


@given(a=st.lists(st.text(alphabet="\x00\x01ab", max_size=4), min_size=1, max_size=3),
       b=st.lists(st.text(alphabet="\x00\x01ab", max_size=4), min_size=1, max_size=3))
def test_name_bytes_differ_for_different_names(a, b):
    """Joined with NUL and nothing escaped, ("x\\0y", "z") and ("x", "y\\0z") were one name."""
    assert (name_bytes(tuple(a)) == name_bytes(tuple(b))) == (a == b)


def test_ids_holding_a_nul_do_not_share_tokens():
    one = Program("x\x00y", 0.0, "w", (Call("z", (), 64, 1),))
    two = Program("x", 0.0, "w", (Call("y\x00z", (), 64, 1),))
    (keys_one,), (keys_two,) = context_block_keys(one).values(), context_block_keys(two).values()
    assert len(keys_one) == 4 and not set(keys_one) & set(keys_two)


def test_names_without_nul_or_soh_keep_their_ids():
    """Every generated trace's keys, and so every shipped result, are unchanged by the escaping."""
    assert (name_id("bfcl-tools-3"), name_id("p12", "c4"), name_id("block_hash", "17")) == (
        18172115384228482052, 12058534467069175061, 7507270054695074224)
