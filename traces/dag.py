"""Graph helpers for a program's call DAG: order and width.

The width (the largest set of calls none of which depends on another, i.e.
the widest antichain) is the most calls of a program that can ever run at
once. It is computed exactly for any DAG:

* a forest (no call has two parents) has width = its number of leaves: the
  leaves are pairwise independent, and the root-to-leaf paths are that many
  chains covering every call, so by Dilworth's theorem no antichain is wider.
  This is O(n) and covers chats, tool loops and pure trees.
* any other DAG: Dilworth's theorem, width = n - (maximum matching in the
  bipartite graph u -> v for every v reachable from u). Reachability is kept
  as Python-int bitsets, and the matching is Kuhn's augmenting paths after a
  greedy start, which for ~160-call LATS programs takes milliseconds.
"""

from __future__ import annotations

from traces.format import Call, Program


def topological_order(program: Program) -> list[Call]:
    """The calls with every parent before its children (stable for sorted input).

    Assumes a validated program (acyclic, parents exist).
    """
    calls = program.calls
    pos = {c.id: i for i, c in enumerate(calls)}
    if all(pos[p] < i for i, c in enumerate(calls) for p in c.parents):
        return list(calls)
    indeg = [len(c.parents) for c in calls]
    children: list[list[int]] = [[] for _ in calls]
    for i, c in enumerate(calls):
        for p in c.parents:
            children[pos[p]].append(i)
    ready = [i for i, d in enumerate(indeg) if d == 0]
    ready.reverse()
    out: list[Call] = []
    while ready:
        i = ready.pop()
        out.append(calls[i])
        for j in reversed(children[i]):
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    return out


def max_parallel_calls(program: Program) -> int:
    """The width of the program's DAG (exact; see the module docstring)."""
    calls = topological_order(program)
    n = len(calls)
    if all(len(c.parents) <= 1 for c in calls):
        has_child = {p for c in calls for p in c.parents}
        return sum(1 for c in calls if c.id not in has_child)
    pos = {c.id: i for i, c in enumerate(calls)}
    # reach[i]: bitset of calls strictly reachable from i (descendants).
    reach = [0] * n
    children: list[list[int]] = [[] for _ in range(n)]
    for i, c in enumerate(calls):
        for p in c.parents:
            children[pos[p]].append(i)
    for i in range(n - 1, -1, -1):
        bits = 0
        for j in children[i]:
            bits |= (1 << j) | reach[j]
        reach[i] = bits
    return n - _max_matching(reach, n)


def _max_matching(adj: list[int], n: int) -> int:
    """Maximum bipartite matching; left i may match right j iff bit j of adj[i]."""
    match_right = [-1] * n  # right j -> left i
    match_left = [-1] * n
    size = 0
    # Greedy start: match each left vertex to its lowest free right vertex.
    free = (1 << n) - 1
    for i in range(n):
        cand = adj[i] & free
        if cand:
            j = (cand & -cand).bit_length() - 1
            match_left[i] = j
            match_right[j] = i
            free &= ~(1 << j)
            size += 1

    # Kuhn's algorithm with an explicit BFS (no recursion: programs may have
    # thousands of calls). Each search finds a shortest augmenting path.
    for root in range(n):
        if match_left[root] >= 0 or not adj[root]:
            continue
        seen = 0  # right vertices already reached
        came_from: dict[int, int] = {}  # right j -> left vertex that reached it
        frontier = [root]
        end = -1
        while frontier and end < 0:
            nxt = []
            for i in frontier:
                cand = adj[i] & ~seen
                seen |= cand
                while cand:
                    low = cand & -cand
                    cand ^= low
                    j = low.bit_length() - 1
                    came_from[j] = i
                    if match_right[j] < 0:
                        end = j
                        break
                    nxt.append(match_right[j])
                if end >= 0:
                    break
            frontier = nxt
        if end < 0:
            continue
        j = end
        while True:  # flip the path back to the root
            i = came_from[j]
            prev = match_left[i]
            match_left[i] = j
            match_right[j] = i
            if i == root:
                break
            j = prev
        size += 1
    return size
