"""Importers: real traces in other formats -> programs.

Each importer reads a whole source file, checks every row, and either
returns programs or raises :class:`~traces.validate.TraceError` naming the
file, the line (or entry) and the field. Nothing is dropped or changed
silently: where an importer has to change or skip something it counts it in
the returned :class:`ImportReport`, and the CLI prints the report.

* Azure LLM inference CSV (Splitwise, 2023): one call per row, real arrival
  times and token counts.
* ShareGPT JSON: each conversation becomes a multi-turn chat chain.
* Mooncake JSONL: one call per row with prompt block hashes, optionally
  grouped into chains by a shared hash prefix.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from traces.arrivals import arrival_times
from traces.format import MAX_SECONDS, MAX_TOKENS, Call, Program
from traces.validate import SECOND_BOM, LongInt, RoundedFloat, TraceError, decode_jsonl_line, parse_json_int, reading, show, unique_keys

IMPORTERS = ("azure", "sharegpt", "mooncake")


@dataclass
class ImportReport:
    """What an importer changed or skipped, for the user to see."""

    programs: list[Program]
    notes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------- azure

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def parse_azure_timestamp(text: str) -> int:
    """``2023-11-16 18:17:03.9799600`` -> integer 100-nanosecond ticks since the epoch (UTC).

    The trace has seven fraction digits; ``datetime`` keeps only six, so the
    fraction is read as an integer and the whole time is kept exactly. Only
    ASCII digits are accepted: ``strptime`` and ``int`` would also read
    other scripts' digits, which no trace writer produces.
    """
    if not text.isascii():
        raise ValueError("not ASCII")
    main, dot, frac = text.strip().partition(".")
    if dot and (not frac.isdigit() or len(frac) > 7):
        raise ValueError(f"bad fraction of a second {frac!r}")
    base = datetime.strptime(main, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    seconds = int(base.timestamp())
    return seconds * 10_000_000 + (int(frac.ljust(7, "0")) if dot else 0)


def _utf8_lines(fh: Iterable[bytes], file: str) -> Iterator[str]:
    """The lines of a binary file as text. Decoding line by line names the line
    that is not UTF-8; a text-mode file fails a whole read buffer early. A
    byte order mark starting the file is dropped (``utf-8-sig``), as trace
    files and the other importers do: spreadsheet programs write one."""
    for line, raw in enumerate(fh, 1):
        try:
            text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(f"not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason})",
                             file=file, line=line) from None
        if line == 1 and text.startswith("\ufeff"):
            raise TraceError(SECOND_BOM, file=file, line=1)
        yield text


_DECIMAL = re.compile(r"-?[0-9]+")  # not int(): it also takes "1_000", " 12 " and non-ASCII digits


def _azure_count(text: str, file: str, line: int, column: str) -> int:
    """A token count cell: an optional minus and ASCII digits, nothing else.

    A count too long for a token count is refused before ``int()``, which
    would refuse 4300 digits with advice about interpreter limits.
    """
    if not _DECIMAL.fullmatch(text):
        raise TraceError(f"expected an integer (ASCII digits 0-9 only), got {text!r}", file=file, line=line,
                         field=column)
    if text.startswith("-") and text.strip("-0"):  # negative: the sign is the problem, not the size
        shown = text if len(text) <= 20 else f"a {len(text) - 1}-digit negative integer"
        raise TraceError(f"expected an integer > 0, got {shown}", file=file, line=line, field=column)
    if len(text.lstrip("-").lstrip("0")) > len(str(MAX_TOKENS)) or int(text) > MAX_TOKENS:
        shown = text if len(text) <= 20 else f"a {len(text)}-digit integer"
        raise TraceError(f"expected at most {MAX_TOKENS:,} tokens, got {shown}", file=file, line=line, field=column)
    return int(text)


def _csv_rows(reader: Any, file: str) -> Iterator[tuple[int, list[str]]]:
    """The reader's rows with the line each starts on (a quoted field may span
    lines); what the csv module refuses is a located TraceError.

    ``csv.Error`` is not a ValueError, so it would escape the CLI as a traceback.
    """
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            text = str(exc)
            if "new-line character" in text:  # its advice (newline='') is for the code, not the file
                text = "a carriage return (\\r) inside a line: lines must end in \\n or \\r\\n"
            elif "field larger than field limit" in text:
                text = f"a field longer than {csv.field_size_limit():,} characters; no Azure trace cell is"
            raise TraceError(f"not a CSV row: {text}", file=file, line=reader.line_num) from None
        yield start, row


def import_azure(path: str | os.PathLike, min_tokens: int | None = None) -> ImportReport:
    """Azure LLM inference trace CSV: each row a one-call program.

    ``arrival`` is the time since the first row in seconds, computed from
    integer 100 ns ticks (exact to float precision). Rows must be in time
    order. A token count of 0 is an error by default (a call must have at
    least one prompt and one output token); with ``min_tokens=N`` counts
    below N are raised to N and the number of cells raised is reported.
    The workload label is ``azure-<file stem>``.
    """
    file = os.fspath(path)
    # A file name's undecodable bytes (kept by Python as lone surrogates) as \xNN: a label is text.
    stem = os.path.splitext(os.path.basename(file))[0]
    label = "azure-" + stem.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    programs: list[Program] = []
    changed = 0
    if min_tokens is not None and (type(min_tokens) is not int or not 1 <= min_tokens <= MAX_TOKENS):
        raise ValueError(f"min_tokens must be an integer from 1 to {MAX_TOKENS:,}, got {min_tokens!r}")
    with reading(file) as fh:
        reader = csv.reader(_utf8_lines(fh, file))
        rows = _csv_rows(reader, file)
        _, header = next(rows, (1, None))
        if header is None or tuple(h.strip() for h in header) != AZURE_COLUMNS:
            raise TraceError(
                f"expected the header {','.join(AZURE_COLUMNS)}, got {show(header)}", file=file, line=1
            )
        first = prev = None
        prev_time = ""
        for line, row in rows:
            if len(row) != 3:
                raise TraceError(f"expected 3 columns, got {len(row)}", file=file, line=line)
            try:
                ticks = parse_azure_timestamp(row[0])
            except ValueError as exc:
                raise TraceError(f"expected a time like 2023-11-16 18:17:03.9799600, got {row[0]!r} ({exc})",
                                 file=file, line=line, field="TIMESTAMP") from None
            counts = []
            for name, text in zip(AZURE_COLUMNS[1:], row[1:]):
                value = _azure_count(text, file, line, name)
                if value < 0 or (value == 0 and min_tokens is None):
                    hint = " (--min-tokens 1 imports it as 1 and reports it)" if value == 0 else ""
                    raise TraceError(f"expected an integer > 0, got {value}{hint}", file=file, line=line, field=name)
                if min_tokens is not None and value < min_tokens:
                    value = min_tokens
                    changed += 1
                counts.append(value)
            if first is None:
                first = prev = ticks
            if ticks < prev:
                raise TraceError(f"rows must be in time order: expected a time at or after the previous row's "
                                 f"{prev_time!r}, got {row[0]!r}", file=file, line=line, field="TIMESTAMP")
            prev, prev_time = ticks, row[0]
            arrival = (ticks - first) / 10_000_000
            if arrival > MAX_SECONDS:
                raise TraceError(f"expected at most {MAX_SECONDS:g} s after the first row (the trace format's limit "
                                 f"on arrival times), got {arrival!r} s", file=file, line=line, field="TIMESTAMP")
            pid = f"p{len(programs)}"
            programs.append(Program(pid, arrival, label, (Call("c0", (), counts[0], counts[1]),)))
    notes = []
    if min_tokens is not None:
        notes.append(f"{changed} token count(s) below {min_tokens} raised to {min_tokens}")
    return ImportReport(programs, notes)


# ----------------------------------------------------------------- sharegpt


def approx_tokens(text: str) -> int:
    """About four characters per token (English text under BPE tokenizers), at least 1."""
    return max(1, math.ceil(len(text) / 4))


def load_tokenizer(name: str) -> Callable[[str], int]:
    """A token counter from a Hugging Face tokenizer (``transformers`` needed)."""
    try:
        from transformers import AutoTokenizer  # noqa: PLC0415 - optional, heavy
    except ImportError:
        raise ValueError(
            f"--tokenizer {name} needs the 'transformers' package (pip install transformers); "
            "without --tokenizer, tokens are approximated as characters / 4"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001  transformers raises OSError, ValueError, HTTP errors...
        # Its messages run over several lines of advice; the first says what failed.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--tokenizer {name}: cannot load it ({first})") from None
    return lambda text: max(1, len(tok.encode(text, add_special_tokens=False)))


USER_ROLES = ("human", "user", "system")
REPLY_ROLES = ("gpt", "chatgpt", "assistant", "bard", "bing")


@dataclass
class _Chat:
    """The calls of one conversation being built, message by message."""

    calls: list[Call] = field(default_factory=list)
    pending: int = 0  # prompt tokens since the last call
    asked: bool = False  # a user or system message seen: a reply now answers it
    replying: bool = False  # the last message was a reply

    def user(self, tokens: int) -> None:
        self.pending += tokens
        self.asked = True
        self.replying = False

    def reply(self, tokens: int) -> None:
        calls = self.calls
        if not self.asked:
            self.pending += tokens  # a greeting before any user message: context, not a call
        elif self.replying:
            prev = calls[-1]  # the model continued its reply
            calls[-1] = Call(prev.id, prev.parents, prev.prompt_tokens, prev.output_tokens + tokens,
                             prev.delay, prev.context_of)
        elif not calls:
            calls.append(Call("c0", (), self.pending, tokens))
            self.pending = 0
        else:
            prev = calls[-1]
            calls.append(Call(f"c{len(calls)}", (prev.id,), prev.context_tokens + self.pending, tokens, 0.0, prev.id))
            self.pending = 0
        self.replying = True


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _repeat_position(text: str) -> tuple[int | None, int | None]:
    """The line of the object that gives a key twice, and the index of the top-level
    conversation holding it (None if it is not inside one, or if it cannot be told).

    Only called once :func:`unique_keys` has refused the document, so the cost
    of a second, slower parse falls on bad files alone. The conversation is
    found by decoding the top-level array's elements one by one (any value
    counts: a ``null`` element is an index too). The line needs json's
    pure-Python scanner, which calls a replaceable ``parse_object`` with the
    offset (the C scanner does not say where an object starts); it is run on
    that element alone, and one nested too deeply for it gives no line.
    """
    fast = json.JSONDecoder(parse_int=parse_json_int, object_pairs_hook=unique_keys)
    at = _JSON_SPACE.match(text).end()
    conversation = None
    if text.startswith("[", at):
        at, i = at + 1, 0
        while True:
            at = _JSON_SPACE.match(text, at).end()
            try:
                _, after = fast.raw_decode(text, at)
            except TraceError:
                conversation = i
                break
            except (ValueError, RecursionError):
                return None, None
            at = _JSON_SPACE.match(text, after).end()
            if not text.startswith(",", at):
                return None, None  # the repeat was not inside an element
            at, i = at + 1, i + 1
    found: list[int] = []

    def parse_object(s_and_end: tuple[str, int], *args: Any, **kwargs: Any) -> tuple[Any, int]:
        try:
            return json.decoder.JSONObject(s_and_end, *args, **kwargs)
        except TraceError:
            if not found:  # the innermost object raised first
                found.append(s_and_end[1] - 1)
            raise

    slow = json.JSONDecoder(parse_int=parse_json_int, object_pairs_hook=unique_keys)
    slow.parse_object = parse_object  # type: ignore[attr-defined]
    slow.scan_once = json.scanner.py_make_scanner(slow)  # type: ignore[attr-defined]
    try:
        slow.raw_decode(text, at)
    except TraceError:
        pass
    except RecursionError:  # deeper than the pure-Python scanner goes (about a third of the C one)
        return None, conversation
    return (text.count("\n", 0, found[0]) + 1 if found else None), conversation


def import_sharegpt(
    path: str | os.PathLike,
    rate: float = 1.0,
    seed: int = 0,
    count_tokens: Callable[[str], int] = approx_tokens,
) -> ImportReport:
    """ShareGPT JSON: each conversation a chain of calls, one per ``gpt`` reply.

    A reply's prompt re-sends the conversation so far (``context_of`` the
    previous call) plus the messages since that call; its output is the
    reply. Messages before the first reply (``system``, ``human``, or a
    leading ``gpt`` greeting, however many messages long) form the first
    prompt. Consecutive ``gpt`` messages are one reply (the model
    continued). Messages after the last reply have no answer to time and are
    not calls; conversations without any reply become no program. An empty
    message counts as one token (a call needs at least one prompt and one
    output token). All three are counted in the report. Roles: ``human``,
    ``user``, ``system`` ask; ``gpt``, ``chatgpt``, ``assistant``, ``bard``,
    ``bing`` reply. Arrivals are Poisson at ``rate`` programs/s with
    ``seed``; a program's id is ``pN``, N the index of its conversation in
    the file (as errors give it, ``conversation [N]``), so a program can be
    traced to its source even where conversations without a reply leave gaps
    (the ShareGPT id is not used, since real dumps repeat ids). A leading
    byte order mark is ignored.
    """
    file = os.fspath(path)
    with reading(file) as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # by line, as the other importers say it: a byte offset is no help
        raise TraceError(f"not UTF-8 text ({exc.reason})", file=file, line=raw.count(b"\n", 0, exc.start) + 1) from None
    if text.startswith("\ufeff"):  # json read it as "Unexpected UTF-8 BOM (decode using utf-8-sig)"
        raise TraceError(SECOND_BOM, file=file, line=1)
    try:
        data = json.loads(text, parse_int=parse_json_int, object_pairs_hook=unique_keys)
    except TraceError as exc:  # a key given twice: json would keep the last value silently
        line, conversation = _repeat_position(text)
        inside = f" (in conversation [{conversation}])" if conversation is not None else ""
        raise TraceError(exc.reason + inside, file=file, line=line, field=exc.field) from None
    except ValueError as exc:
        raise TraceError(f"malformed JSON: {exc}", file=file) from None
    except RecursionError:
        raise TraceError("malformed JSON: nested too deeply", file=file) from None
    if not isinstance(data, list):
        raise TraceError(f"expected a JSON array of conversations, got {show(data)}", file=file)
    bodies: list[tuple[Call, ...]] = []
    sources: list[int] = []  # each body's conversation index
    no_reply = trailing = empty = 0
    roles = ", ".join(repr(r) for r in USER_ROLES + REPLY_ROLES)
    for n, conv in enumerate(data):
        where = f"{file}: conversation [{n}]"

        def bad(fieldname: str, reason: str) -> TraceError:
            cid = conv.get("id") if isinstance(conv, dict) else None
            return TraceError(reason, file=where, program_id=cid if isinstance(cid, str) else None, field=fieldname)

        if not isinstance(conv, dict) or not isinstance(conv.get("conversations"), list):
            raise bad("conversations", f"expected an object with a list 'conversations', got {show(conv)}")
        chat = _Chat()
        empties: list[int] = []  # this conversation's empty messages, by index
        in_calls = -1  # the last message that made or extended a call: it and all before are in calls
        for m, msg in enumerate(conv["conversations"]):
            if not isinstance(msg, dict):
                raise bad(f"conversations[{m}]", f"expected an object {{from, value}}, got {show(msg)}")
            role, text = msg.get("from"), msg.get("value")
            if not isinstance(text, str):
                raise bad(f"conversations[{m}].value", f"expected a string, got {show(text)}")
            if role not in USER_ROLES and role not in REPLY_ROLES:
                raise bad(f"conversations[{m}].from", f"expected one of {roles}, got {show(role)}")
            if text == "":
                empties.append(m)
            if role in REPLY_ROLES and chat.asked:
                in_calls = m
            (chat.user if role in USER_ROLES else chat.reply)(count_tokens(text))
            last = chat.calls[-1] if chat.calls else None
            if last is not None and max(last.prompt_tokens, last.output_tokens) > MAX_TOKENS:
                raise bad(f"conversations[{m}]", f"makes a call of {last.prompt_tokens:,} prompt and "
                                                 f"{last.output_tokens:,} output tokens, more than a call may "
                                                 f"have ({MAX_TOKENS:,})")
        # Only messages that are part of a call count: those after the last reply are in none.
        empty += sum(1 for m in empties if m <= in_calls)
        if not chat.calls:
            no_reply += 1
            continue
        if chat.pending:
            trailing += 1
        bodies.append(tuple(chat.calls))
        sources.append(n)
    rng = np.random.Generator(np.random.PCG64(seed))
    times = arrival_times(len(bodies), rate, rng)
    programs = [Program(f"p{n}", t, "sharegpt", calls) for n, t, calls in zip(sources, times, bodies)]
    notes = [
        f"{no_reply} conversation(s) without a reply: no program",
        f"{trailing} conversation(s) end with unanswered messages: not calls",
        f"{empty} empty message(s) counted as 1 token each",
    ]
    return ImportReport(programs, notes)


# ----------------------------------------------------------------- mooncake

MOONCAKE_BLOCK = 512
MOONCAKE_KEYS = frozenset({"timestamp", "input_length", "output_length", "hash_ids"})


def _mooncake_row(obj: Any) -> tuple[Any, int, int, tuple[int, ...]]:
    """(timestamp ms, input, output, hash ids) of one decoded row, checked.

    Raises TraceError without file and line (the caller adds them). Unknown
    keys are refused, as in a trace: a misspelt key would otherwise vanish.
    """
    if not isinstance(obj, dict):
        raise TraceError(f"expected a JSON object, got {show(obj)}")
    for key in sorted(MOONCAKE_KEYS):
        if key not in obj:
            raise TraceError("missing", field=key)
    unknown = sorted(k for k in obj if k not in MOONCAKE_KEYS)
    if unknown:
        raise TraceError(f"unknown key in a row (allowed: {', '.join(sorted(MOONCAKE_KEYS))})", field=unknown[0])
    ts = obj["timestamp"]
    digits = sys.get_int_max_str_digits()
    if type(ts) is LongInt and not ts.negative:  # >= 0, but too long to read: say so, not ">= 0"
        raise TraceError(f"expected a number of milliseconds of at most {digits} digits, got {show(ts)}",
                         field="timestamp")
    if type(ts) is RoundedFloat:  # 1e-400 read as 0.0: not ">= 0", which it is
        raise TraceError(f"expected a number of milliseconds a float holds (nothing is rounded to 0 or "
                         f"infinity), got {ts!r}", field="timestamp")
    if type(ts) not in (int, float) or (type(ts) is float and not math.isfinite(ts)) or ts < 0:
        raise TraceError(f"expected a number of milliseconds >= 0, got {show(ts)}", field="timestamp")
    if type(ts) is float and math.ulp(ts) > 1:
        # Past 2**53 a float's steps exceed 1 ms: 100000000000000000000.0 and ...005000.0,
        # 5 s apart, were the same float and both arrived at 0.0. An integer is read exactly.
        raise TraceError(f"expected a float below 2**53 ({2**53:,}) ms, where a float holds every "
                         f"millisecond, got {show(ts)}; write it as an integer",
                         field="timestamp")
    counts = []
    for key in ("input_length", "output_length"):
        v = obj[key]
        too_long = type(v) is LongInt and not v.negative
        if not too_long and (type(v) is not int or v <= 0):
            raise TraceError(f"expected an integer > 0, got {show(v)}", field=key)
        if too_long or v > MAX_TOKENS:
            raise TraceError(f"expected at most {MAX_TOKENS:,} tokens, got {show(v)}", field=key)
        counts.append(v)
    hashes = obj["hash_ids"]
    if type(hashes) is not list:
        raise TraceError(f"expected a list of integers, got {show(hashes)}", field="hash_ids")
    for h in hashes:
        if type(h) is LongInt:
            raise TraceError(f"expected integers of at most {digits} digits, got {show(h)}", field="hash_ids")
        if type(h) is not int:
            raise TraceError(f"expected a list of integers, got {show(hashes)}", field="hash_ids")
    want = -(-counts[0] // MOONCAKE_BLOCK)
    if len(hashes) != want:
        raise TraceError(f"expected ceil(input_length / {MOONCAKE_BLOCK}) = {want} hash ids, got {len(hashes)}",
                         field="hash_ids")
    return ts, counts[0], counts[1], tuple(hashes)


def _mooncake_rows(file: str) -> list[tuple[Any, int, int, int, tuple[int, ...]]]:
    """(timestamp ms, line, input, output, hash ids) of every row, checked.

    Lines are read by the trace format's own JSONL rules
    (:func:`~traces.validate.decode_jsonl_line`): no blank lines, no
    duplicate keys.
    """
    rows = []
    with reading(file) as fh:
        for line, raw in enumerate(fh, 1):
            try:
                ts, prompt, output, hashes = _mooncake_row(decode_jsonl_line(raw, "one row per line", first=line == 1))
            except TraceError as exc:
                raise exc.located(file, line) from None
            rows.append((ts, line, prompt, output, hashes))
    return rows


def _check_mooncake_span(rows: list, file: str) -> None:
    """Refuse a row arriving more than MAX_SECONDS after the first, naming its line.

    Compared without converting to float: a huge integer timestamp would
    overflow it, and int/float comparisons in Python are exact.
    """
    t0 = rows[0][0]
    limit = t0 + (int(MAX_SECONDS) * 1000 if type(t0) is int else MAX_SECONDS * 1000)
    for ts, line, *_ in rows:
        if ts > limit:
            raise TraceError(f"expected at most {MAX_SECONDS:g} s ({MAX_SECONDS * 1000:g} ms) after the earliest "
                             f"timestamp {show(t0)} (the trace format's limit on arrival times), got {show(ts)}",
                             file=file, line=line, field="timestamp")


def import_mooncake(path: str | os.PathLike, group_by_prefix: int | None = None) -> ImportReport:
    """Mooncake-style JSONL: block-hashed prompts, optionally grouped into programs.

    Rows are taken in timestamp order (a stable sort, so equal times keep
    file order); arrival = (timestamp - first timestamp) / 1000 s. Each call
    carries ``block_hashes`` with ``hash_block_tokens=512``.

    Without grouping, each row is a one-call program. With
    ``group_by_prefix=N``, rows whose first N hash ids are equal (and that
    have at least N) form one program: a chain in timestamp order, each call
    the parent of the next, arriving at its first row's time. The chain
    claims no ``context_of``: the block hashes already state exactly which
    prompt blocks are shared. Every ``delay`` is 0: a row's own timestamp
    says when it was *sent*, but the delay is measured from the parent's
    *finish*, which depends on the serving system being simulated and is
    unknown at import time; issuing the next call as soon as the previous
    one finishes is the closed-loop reading. Rows with fewer than N hash
    ids stay one-call programs.
    """
    file = os.fspath(path)
    if group_by_prefix is not None and (type(group_by_prefix) is not int or group_by_prefix < 1):
        raise ValueError(f"group_by_prefix must be an integer >= 1, got {group_by_prefix!r}")
    rows = sorted(_mooncake_rows(file), key=lambda r: r[0])
    if not rows:
        return ImportReport([], ["no rows"])
    _check_mooncake_span(rows, file)
    t0 = rows[0][0]
    groups: dict[Any, list] = {}
    for row in rows:
        hashes = row[4]
        if group_by_prefix is not None and len(hashes) >= group_by_prefix:
            key: Any = ("prefix", hashes[:group_by_prefix])
        else:
            key = ("row", row[1])
        groups.setdefault(key, []).append(row)
    programs = []
    for i, members in enumerate(groups.values()):  # dicts keep first-arrival order
        calls = []
        for j, (_, _, prompt, output, hashes) in enumerate(members):
            parents = (f"c{j - 1}",) if j else ()
            calls.append(Call(f"c{j}", parents, prompt, output, 0.0, block_hashes=hashes,
                              hash_block_tokens=MOONCAKE_BLOCK))
        arrival = (members[0][0] - t0) / 1000
        if arrival > MAX_SECONDS:  # within the span in milliseconds, past it once divided (float rounding)
            raise TraceError(f"expected at most {MAX_SECONDS:g} s after the earliest timestamp {show(t0)} (the "
                             f"trace format's limit on arrival times), got {arrival!r} s", file=file,
                             line=members[0][1], field="timestamp")
        programs.append(Program(f"p{i}", arrival, "mooncake", tuple(calls)))
    notes = [f"{len(rows)} row(s) -> {len(programs)} program(s)"]
    return ImportReport(programs, notes)
