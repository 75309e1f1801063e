"""DAG width (max parallel calls): exact on hand cases and against brute force."""

from __future__ import annotations

from itertools import combinations

from hypothesis import given, settings
from test_traces_io import valid_programs

from traces.dag import max_parallel_calls, topological_order
from traces.format import Call, Program


def prog(edges: dict[str, list[str]]) -> Program:
    return Program("p", 0.0, "w", tuple(Call(c, tuple(ps), 1, 1) for c, ps in edges.items()))


def brute_width(p: Program) -> int:
    anc: dict[str, set[str]] = {}
    for c in topological_order(p):
        anc[c.id] = set(c.parents).union(*(anc[x] for x in c.parents)) if c.parents else set()
    ids = [c.id for c in p.calls]
    for k in range(len(ids), 0, -1):
        for sub in combinations(ids, k):
            if all(a not in anc[b] and b not in anc[a] for a, b in combinations(sub, 2)):
                return k
    return 0


def test_hand_cases():
    assert max_parallel_calls(prog({"a": []})) == 1
    assert max_parallel_calls(prog({"a": [], "b": ["a"], "c": ["b"]})) == 1  # chain
    assert max_parallel_calls(prog({"a": [], "b": ["a"], "c": ["a"], "d": ["a"]})) == 3  # fan-out
    # fan-out then join then fan-out of 2: widest is 3
    assert max_parallel_calls(prog({"r": [], "x": ["r"], "y": ["r"], "z": ["r"], "j": ["x", "y", "z"], "u": ["j"], "v": ["j"]})) == 3
    # two independent roots and a join
    assert max_parallel_calls(prog({"a": [], "b": [], "j": ["a", "b"]})) == 2
    # a "zigzag" where greedy layering is wrong: width is 3 ({a2, b1, c} style antichain)
    g = {"a1": [], "a2": ["a1"], "b1": [], "b2": ["b1", "a1"], "c": [], "d": ["c", "a2"]}
    assert max_parallel_calls(prog(g)) == brute_width(prog(g))


@settings(max_examples=200, deadline=None)
@given(valid_programs())
def test_width_equals_brute_force(p):
    assert max_parallel_calls(p) == brute_width(p)


def test_large_dag_does_not_recurse():
    # 3000 calls: a ladder where every call has two parents.
    edges = {"c0": [], "c1": []}
    for i in range(2, 3000):
        edges[f"c{i}"] = [f"c{i-1}", f"c{i-2}"]
    assert max_parallel_calls(prog(edges)) == 2  # {c0, c1}; everything after is a chain
