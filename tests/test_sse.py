"""The SSE parser gives the same events however the bytes are cut into reads."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sse import DONE, SSEParser, whole_events_end

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
# A stream of completion chunks (one per word), its line ends, and where reads cut it.
STREAMS = dict(
    words=st.lists(texts, max_size=6),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(**STREAMS)
def test_events_survive_any_split_of_the_stream(words, newline, cuts):
    """A CRLF cut between two reads ("...\\r" then "\\n...") lost both events around it."""
    events, stream = _stream(words, newline)
    stream += b": keep-alive" + newline + b"data: [DONE]" + newline * 2
    parser = SSEParser()
    got = []
    for piece in _reads(stream, cuts):
        got += parser.feed(piece)
    assert got == [*events, DONE]


def _stream(words: list[str], newline: bytes) -> tuple[list[dict], bytes]:
    """One completion chunk per word, and the stream of them, each event ended by a blank line."""
    events = [{"choices": [{"index": 0, "text": w}]} for w in words]
    return events, b"".join(b"data: " + json.dumps(e).encode() + newline * 2 for e in events)


def _reads(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` cut at ``cuts`` (clipped to its length) into the pieces a client reads."""
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    return [stream[start:end] for start, end in zip(bounds, bounds[1:])]


def test_a_crlf_cut_between_two_reads_is_one_line_end():
    first = b'data: {"choices": [{"text": "a"}]}\r\n\r\n'
    stream = first + b'data: {"choices": [{"text": "b"}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    parser = SSEParser()
    got = list(parser.feed(stream[: len(first) - 1])) + list(parser.feed(stream[len(first) - 1:]))
    assert got == [{"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}, DONE]  # was [DONE] alone


def test_a_read_that_is_only_the_lf_of_a_crlf_ends_that_line_alone():
    """The next read's LF was eaten too: both events were lost."""
    parser = SSEParser()
    got = []
    for piece in (b'data: {"a":1}\r', b"\n", b'\ndata: {"b":2}\n\n'):
        got += parser.feed(piece)
    assert got == [{"a": 1}, {"b": 2}]


@settings(max_examples=300, deadline=None)
@given(**STREAMS)
def test_whole_events_end_relays_each_event_whole(words, newline, cuts):
    """What a relay passes on (`whole_events_end` of what it holds) is always whole events, parsed
    alone to the same events, however the stream is cut into reads; the rest comes at the end."""
    events, stream = _stream(words, newline)
    held, relayed = b"", []
    for piece in _reads(stream, cuts):
        held += piece
        cut = whole_events_end(held)
        relayed.append(held[:cut])
        held = held[cut:]
    for piece in relayed:  # each piece stands alone: no half event for an error to join
        parser = SSEParser()
        list(parser.feed(piece))
        assert parser._buf == b"", piece
    assert b"".join(relayed) + held == stream
    assert list(SSEParser().feed(b"".join(relayed) + held)) == events
    if newline != b"\r":  # a final CR may be half a CRLF: held until more comes or the stream ends
        assert held == b""


def test_whole_events_end_by_hand():
    assert whole_events_end(b'data: {"a":1}\n\ndata: {"b"') == 15
    assert whole_events_end(b'data: x\r\n\r\n') == 11
    assert whole_events_end(b'data: x\r\n\r') == 0  # the last CR may be the start of its CRLF
    assert whole_events_end(b'data: x\r\r\n') == 10
    assert whole_events_end(b'data: x\n') == 0
    assert whole_events_end(b": keep-alive\n\n") == 14
