"""Exact KV-block keys of each call's context, for prefix caching.

The simulator's prefix cache and the locality balancer ask one question: how
many leading KV blocks of this call's context are already cached? They answer
it by comparing *chain keys*: the key of block ``b`` depends on every token of
blocks ``0..b``, so two sequences share their first ``n`` keys exactly when
their first ``n * block_size`` tokens are identical (up to 64-bit hash
collisions). Only full blocks get keys, because a partial block is never
shared by vLLM's prefix cache.

Token identity (what "identical tokens" means for a trace that has no text):

* shared prefix ``K``, token ``i``  ->  ("shared", K, i);
* the first ``context_tokens(X)`` tokens of a call with ``context_of=X`` are
  X's context tokens (X's prompt, then X's output);
* every other prompt token, and every output token, is unique to its
  (program id, call id) and its position;
* with ``block_hashes`` and ``hash_block_tokens=H``, prompt token ``t`` is
  (hash id of block ``t // H``, offset ``t % H``): identical to the token at
  the same offset of any hash block with the same id. Mooncake's hash ids
  already chain over the prefix, so this is exact for its traces.

Representation: a token is (source, index) with ``source`` an integer. A run
of tokens ``index, index+1, ...`` from one source is a triple ``(source,
start, length)``. A block is described by its *maximal* runs, which is
canonical: two blocks of identical tokens have identical descriptions. The
key of block ``b`` is ``hash((key[b-1], *runs))`` over integers only, which
Python hashes the same in every process (``str``/``bytes`` hashing is
randomised per process, so names become integers once each through an 8-byte
BLAKE2b digest).

Cost: a call with ``context_of=X`` reuses X's key tuple for X's full blocks
and hashes only the blocks that contain new tokens (plus X's partial last
block), so an 80-turn chat hashes each token once, not once per turn.
"""

from __future__ import annotations

import hashlib

from traces.dag import topological_order
from traces.format import Program

_ROOT_KEY = 0x5EED  # the "previous key" of block 0


def name_id(*parts: str) -> int:
    """A process-independent 64-bit integer for a tuple of names.

    The parts are joined by NUL with NUL and SOH escaped inside them (SOH
    first), so two tuples never give the same bytes: ids may hold a NUL, and
    program ``"x\\0y"`` call ``"z"`` met program ``"x"`` call ``"y\\0z"``
    (unrelated calls sharing cached tokens). Names without either character,
    every generated one, keep the bytes, and so the keys, they had.
    """
    return int.from_bytes(hashlib.blake2b(name_bytes(parts), digest_size=8).digest(), "little")


def name_bytes(parts: tuple[str, ...]) -> bytes:
    """What `name_id` hashes: a different byte string for every tuple of names."""
    escaped = (p.replace("\x01", "\x01\x01").replace("\x00", "\x01\x00") for p in parts)
    return "\x00".join(escaped).encode("utf-8")


def hash_block_source(hid: int) -> int:
    """The token source of a trace's hash block ``hid``.

    Through BLAKE2b rather than Python's ``hash``: an int hashes to itself
    modulo 2**61 - 1 (and ``hash(-1) == hash(-2)``), so ids 0 and 2**61 - 1
    would share their tokens. Hypothesis found that case.
    """
    return name_id("block_hash", str(hid))


def _append(runs: list[list[int]], source: int, start: int, length: int) -> None:
    """Append a run, merging it into the last one when the tokens continue it."""
    if length <= 0:
        return
    if runs:
        last = runs[-1]
        if last[0] == source and last[1] + last[2] == start:
            last[2] += length
            return
    runs.append([source, start, length])


def _blocks(prev_key: int, runs: list[list[int]], block_size: int) -> tuple[list[int], list[list[int]]]:
    """Keys of the full blocks of ``runs`` (chained from ``prev_key``) and the leftover runs.

    ``runs`` must be maximal (built with :func:`_append`). The leftover is
    the partial last block, fewer than ``block_size`` tokens.
    """
    keys: list[int] = []
    pending: list[int] = []  # flattened runs of the block being filled
    filled = 0
    for source, start, length in runs:
        offset = 0
        while offset < length:
            room = block_size - filled
            if filled == 0 and length - offset >= block_size:
                # Whole blocks inside this run: one key each, O(1) per block.
                whole = (length - offset) // block_size
                s = start + offset
                for _ in range(whole):
                    prev_key = hash((prev_key, source, s, block_size))
                    keys.append(prev_key)
                    s += block_size
                offset += whole * block_size
                continue
            take = min(room, length - offset)
            pending += (source, start + offset, take)
            filled += take
            offset += take
            if filled == block_size:
                prev_key = hash((prev_key, *pending))
                keys.append(prev_key)
                pending = []
                filled = 0
    tail = [pending[i : i + 3] for i in range(0, len(pending), 3)]
    return keys, tail


def context_block_keys(program: Program, block_size: int = 16) -> dict[str, tuple[int, ...]]:
    """For each call, the chain keys of the full blocks of its context.

    The context is the call's prompt followed by its output; it has
    ``floor((prompt_tokens + output_tokens) / block_size)`` full blocks. The
    program must be valid (as every loaded or generated program is).
    """
    if type(block_size) is not int or block_size <= 0:
        raise ValueError(f"block_size must be an integer > 0, got {block_size!r}")
    keys: dict[str, tuple[int, ...]] = {}
    tails: dict[str, list[list[int]]] = {}  # partial last block of each context
    context_len: dict[str, int] = {}
    pid = program.id
    for call in topological_order(program):
        runs: list[list[int]] = []
        new_prompt = call.prompt_tokens
        if call.context_of is not None:
            base = keys[call.context_of]
            for r in tails[call.context_of]:
                _append(runs, *r)
            new_prompt -= context_len[call.context_of]
        else:
            base = ()
            if call.shared_prefix is not None:
                sp = call.shared_prefix
                _append(runs, name_id("shared", sp.key), 0, sp.tokens)
                new_prompt -= sp.tokens
            elif call.block_hashes is not None:
                h = call.hash_block_tokens
                left = call.prompt_tokens
                for hid in call.block_hashes:
                    _append(runs, hash_block_source(hid), 0, min(h, left))
                    left -= h
                new_prompt = 0
        _append(runs, name_id("prompt", pid, call.id), 0, new_prompt)
        _append(runs, name_id("output", pid, call.id), 0, call.output_tokens)
        prev = base[-1] if base else _ROOT_KEY
        new_keys, tail = _blocks(prev, runs, block_size)
        keys[call.id] = base + tuple(new_keys) if new_keys else base
        tails[call.id] = tail
        context_len[call.id] = call.prompt_tokens + call.output_tokens
    return keys

