"""The SSE parser gives the same events however the bytes are cut into reads."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sse import DONE, SSEParser

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(texts, max_size=6),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_events_survive_any_split_of_the_stream(words, newline, cuts):
    """A CRLF cut between two reads ("...\\r" then "\\n...") lost both events around it."""
    events = [{"choices": [{"index": 0, "text": w}]} for w in words]
    stream = b"".join(b"data: " + json.dumps(e).encode() + newline * 2 for e in events)
    stream += b": keep-alive" + newline + b"data: [DONE]" + newline * 2
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    parser = SSEParser()
    got = []
    for start, end in zip(bounds, bounds[1:]):
        got += parser.feed(stream[start:end])
    assert got == [*events, DONE]


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
