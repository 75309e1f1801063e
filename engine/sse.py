"""Incremental parsing of Server-Sent Events as OpenAI-compatible servers send them.

The gateway passes a stream through byte for byte but must still see its
events (first token, the final usage chunk, the engine's ``engine_stats``),
and the replayer reads the same streams. Bytes arrive in arbitrary pieces,
so the parser buffers until an event's blank-line terminator.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

DONE = "[DONE]"


class SSEParser:
    """Feed bytes; get back the ``data:`` payload of each complete event.

    Payloads are returned parsed as JSON when they are JSON objects, as the
    string ``"[DONE]"`` for the terminator, and skipped otherwise (comments,
    keep-alives, fields other than ``data``).
    """

    def __init__(self) -> None:
        self._buf = b""
        self._cr = False  # the last piece ended in a CR, which may be half of a CRLF

    def feed(self, chunk: bytes) -> Iterator[dict[str, Any] | str]:
        # Lines end in CRLF, LF or CR (the SSE spec). A CR ends a line either
        # way, so it is read at once; an LF starting the next piece is then
        # the rest of that CRLF. (Normalised per piece, a CRLF cut between
        # two reads left "\n\r\n" behind, and the events around it merged.)
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
            self._cr = False  # that CRLF is whole: a further LF is a line end of its own
        if chunk:
            self._cr = chunk.endswith(b"\r")
        self._buf += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return
            raw, self._buf = self._buf[:end], self._buf[end + 2:]
            data = [line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:")]
            if not data:
                continue
            text = b"\n".join(data).decode("utf-8", errors="replace")
            if text.strip() == DONE:
                yield DONE
                continue
            try:
                event = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                yield event


def whole_events_end(buf: bytes) -> int:
    """How many leading bytes of ``buf`` are whole events (each ended by its blank line).

    A relay that passes bytes through as they come can leave a client in the
    middle of an event; if the stream then fails, an error event written
    after them joins that half event, and the client drops both. Relaying
    only whole events avoids it. A CR at the very end may be half of a CRLF,
    so it does not end a line here yet.
    """
    end = line_start = pos = 0
    n = len(buf)
    while pos < n:
        cr, lf = buf.find(b"\r", pos), buf.find(b"\n", pos)
        if cr < 0 and lf < 0:
            break
        at = lf if cr < 0 or (0 <= lf < cr) else cr
        if buf[at] == 0x0D:  # CR: alone, or the first half of a CRLF
            if at + 1 == n:
                break
            nxt = at + 2 if buf[at + 1] == 0x0A else at + 1
        else:
            nxt = at + 1
        if at == line_start:  # an empty line: the event before it is whole
            end = nxt
        line_start = pos = nxt
    return end


def event_token_count(event: dict[str, Any]) -> int:
    """Output tokens carried by one streamed completion/chat chunk.

    Prefers the chunk's ``token_ids`` (vLLM with ``return_token_ids``, and
    ``sim serve``); otherwise a chunk with non-empty text counts as one
    token, which is exact for servers that send one token per chunk.
    """
    n = 0
    for choice in event.get("choices") or ():
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            n += len(ids)
            continue
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            n += 1
    return n


def event_token_ids(event: dict[str, Any]) -> list[int] | None:
    """The output token ids in a chunk, or None when the server sent none."""
    out: list[int] = []
    seen = False
    for choice in event.get("choices") or ():
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            seen = True
            out.extend(int(i) for i in ids)
    return out if seen else None
