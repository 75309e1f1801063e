"""Token ids for replaying a trace: the trace's token identity made concrete.

A trace has token counts, not text. `traces.prefix` defines which tokens are
identical (a shared prefix's i-th token, a continued call's context, a hash
block's offset); the replayer must send prompts whose ids realise exactly
that identity, so the engine's prefix cache sees the sharing the trace
describes and nothing more. Each token source (a shared-prefix key, a call's
new prompt tokens, a hash-block id) is an integer from `traces.prefix.name_id`;
token ``i`` of source ``s`` gets the id ``FILLER_BASE + mix64(s, i) % FILLER_VOCAB``.

A call with ``context_of=X`` re-sends X's prompt ids followed by the output
ids X actually received from the engine (``token_ids`` in the response: vLLM
with ``return_token_ids``, or ``sim serve``), then its own new tokens. When
the engine returned no ids (a server that does not support
``return_token_ids``), X's output is stood in for by ids from the source
("output", program, X), which keeps the prompt length right but cannot hit
the cache for X's output blocks. The prompt always has exactly the trace's
``prompt_tokens`` tokens.
"""

from __future__ import annotations

from sim.filler_tokens import FILLER_BASE, FILLER_VOCAB, mix64
from traces.format import Call, Program
from traces.prefix import name_id


def source_ids(source: int, start: int, n: int) -> list[int]:
    return [FILLER_BASE + mix64(source, i) % FILLER_VOCAB for i in range(start, start + n)]


def fallback_output_ids(program: Program, call: Call) -> list[int]:
    """Stand-in ids for a call's output when the engine did not return them."""
    return source_ids(name_id("output", program.id, call.id), 0, call.output_tokens)


def prompt_ids(program: Program, call: Call, contexts: dict[str, list[int]]) -> list[int]:
    """The prompt of ``call``; ``contexts[X]`` is X's prompt + received output, for every finished X."""
    ids: list[int] = []
    if call.context_of is not None:
        ids = list(contexts[call.context_of])[: call.prompt_tokens]
    elif call.shared_prefix is not None:
        sp = call.shared_prefix
        ids = source_ids(name_id("shared", sp.key), 0, sp.tokens)
    elif call.block_hashes is not None:
        h = call.hash_block_tokens or 0
        left = call.prompt_tokens
        for hid in call.block_hashes:
            take = min(h, left)
            ids += source_ids(name_id("block_hash", str(hid)), 0, take)
            left -= take
    new = call.prompt_tokens - len(ids)
    ids += source_ids(name_id("prompt", program.id, call.id), 0, max(0, new))
    return ids
