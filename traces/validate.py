"""Parsing and validation of trace programs.

One function, :func:`parse_program`, turns the JSON object of one trace line
into a :class:`~traces.format.Program` and checks every rule of the format on
the way, so a program that exists in memory is always valid. It raises a
:class:`TraceError` on the *first* problem of that program, naming the file,
line, program, call and field, because a person fixing a trace by hand needs
the exact place. Later checks of the same program would mostly repeat the
first problem (a missing parent makes every descendant suspicious), so one
error per line is reported; :func:`validate_file` keeps going with the next
line and so collects every bad line of a file.

Nothing is clipped, rounded or dropped: a value is either accepted as written
or the line is rejected. ``bool`` is rejected where an integer or a number is
expected (``True`` is an ``int`` in Python, not in a trace).

This is the hot path of loading a trace (a million calls must load in
seconds), hence the exact-type tests (``type(x) is int``), the frozenset key
checks and the fast paths for the common shapes (parents listed before their
children; ``context_of`` naming a direct parent).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from traces.format import MAX_SECONDS, MAX_TOKENS, Call, Program, SharedPrefix, make_call

PROGRAM_KEYS = frozenset({"id", "arrival", "workload", "calls"})
CALL_REQUIRED = ("id", "parents", "prompt_tokens", "output_tokens", "delay")
OPTIONAL_CALL_KEYS = ("context_of", "shared_prefix", "block_hashes", "hash_block_tokens")
CALL_KEYS = frozenset(CALL_REQUIRED) | frozenset(OPTIONAL_CALL_KEYS)
PREFIX_KEYS = frozenset({"key", "tokens"})


class TraceError(ValueError):
    """A trace that breaks a rule of the format.

    ``str(error)`` is the full message, e.g.
    ``trace.jsonl:12: program 'p7' call 'c3': field 'prompt_tokens':
    expected an integer > 0, got -5``; the parts are also attributes so tests
    and tools need not parse the message. ``reason`` is the message without
    the location.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        line: int | None = None,
        program_id: str | None = None,
        call_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = file
        self.line = line
        self.program_id = program_id
        self.call_id = call_id
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.file is not None or self.line is not None:
            where = self.file if self.file is not None else "<trace>"
            parts.append(f"{where}:{self.line}" if self.line is not None else where)
        who = ""
        if self.program_id is not None:
            who = f"program {self.program_id!r}"
        if self.call_id is not None:
            who = f"{who} call {self.call_id!r}".strip()
        if who:
            parts.append(who)
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(self.reason)
        return ": ".join(parts)

    def located(self, file: str | None, line: int | None) -> "TraceError":
        """The same error with the file and line filled in (used by loaders)."""
        return _rebuild(self.reason, file, line, self.program_id, self.call_id, self.field)

    def __reduce__(self):  # keep attributes across pickling (multiprocessing)
        return (_rebuild, (self.reason, self.file, self.line, self.program_id, self.call_id, self.field))


def _rebuild(reason, file, line, program_id, call_id, field):
    return TraceError(
        reason, file=file, line=line, program_id=program_id, call_id=call_id, field=field
    )


def show(value: Any) -> str:
    """A short JSON rendering of an offending value for error messages."""
    if isinstance(value, numbers.Number) and type(value) not in (int, float, bool, complex):
        # numpy's float64 is a float, and json renders it "1.0": "expected a number, got 1.0"
        # contradicted itself. Name the type a Program built in Python must not carry.
        return f"{value!r} (a {type(value).__module__}.{type(value).__qualname__}; convert with int() or float())"
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(slots=True)
class _Ctx:
    program_id: str | None = None
    call_id: str | None = None
    call_index: int | None = None  # the call being parsed, named by position while its id is unknown

    def error(self, field: str | None, reason: str) -> TraceError:
        if self.call_id is None and self.call_index is not None:
            # Without it, a call's bad id read as the program's ("program 'p0': field 'id'").
            field = f"calls[{self.call_index}]" + (f".{field}" if field not in (None, "calls") else "")
        return TraceError(reason, program_id=self.program_id, call_id=self.call_id, field=field)


class LongInt:
    """Stands in for a JSON integer too long for ``int()``.

    Python refuses to convert more than ``sys.get_int_max_str_digits()``
    digits (4300 by default) and its error advises changing that limit, which
    means nothing to a person fixing a trace. :func:`decode_line` puts this
    in the integer's place instead, so the validator can name the field.
    """

    __slots__ = ("digits", "negative")

    def __init__(self, text: str) -> None:
        self.negative = text.startswith("-")
        self.digits = len(text) - self.negative

    def __repr__(self) -> str:
        return f"a {self.digits}-digit {'negative ' if self.negative else ''}integer"


def parse_json_int(text: str) -> int | LongInt:
    """``json``'s parse_int: an integer, or a LongInt that names its length."""
    try:
        return int(text)
    except ValueError:
        return LongInt(text)


class RoundedFloat:
    """Stands in for a nonzero JSON number that a float cannot hold: ``1e-400`` would
    read as 0.0 and ``1e400`` as infinity. :func:`decode_line` puts this in its place,
    so the validator names the field rather than take a number other than the one written."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: float) -> None:
        self.text = text
        self.value = value

    def __repr__(self) -> str:
        return f"{self.text[:40]}{'...' if len(self.text) > 40 else ''} (a float reads it as {self.value!r})"


_INF = float("inf")


def parse_json_float(text: str) -> float | RoundedFloat:
    """``json``'s parse_float: the float, or a RoundedFloat where the literal is nonzero and
    the float is 0.0 (underflow) or infinite (overflow). One Python call per float literal,
    about a tenth of the decoding time, against a number silently replaced."""
    value = float(text)
    if value == 0.0:
        mantissa = text.partition("e")[0].partition("E")[0]
        if mantissa.strip("-+0.") != "":
            return RoundedFloat(text, value)
    elif value == _INF or value == -_INF:
        return RoundedFloat(text, value)
    return value


def _too_big(value: Any) -> bool:
    """Whether ``value`` is a positive integer too long to read (hence out of any range)."""
    return type(value) is LongInt and not value.negative


def _pos_int(ctx: _Ctx, field: str, value: Any) -> int:
    if type(value) is not int or value <= 0:
        if _too_big(value):
            raise ctx.error(field, f"expected at most {MAX_TOKENS:,} tokens, got {value!r}")
        raise ctx.error(field, f"expected an integer > 0, got {show(value)}")
    if value > MAX_TOKENS:
        raise ctx.error(field, f"expected at most {MAX_TOKENS:,} tokens, got {show(value)}")
    return value


def _nonneg_number(ctx: _Ctx, field: str, value: Any) -> float:
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise ctx.error(field, f"expected a finite number >= 0, got {show(value)}")
    elif t is not int:
        if _too_big(value):
            raise ctx.error(field, f"expected at most {MAX_SECONDS:g} seconds, got {value!r}")
        if t is RoundedFloat:
            raise ctx.error(field, f"expected a number a float holds (nothing is rounded to 0 or infinity), "
                                   f"got {value!r}")
        raise ctx.error(field, f"expected a number >= 0, got {show(value)}")
    if value < 0:
        raise ctx.error(field, f"expected a number >= 0, got {show(value)}")
    if value > MAX_SECONDS:  # also before float(): an integer of 400 digits overflows it
        raise ctx.error(field, f"expected at most {MAX_SECONDS:g} seconds, got {show(value)}")
    return float(value)


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8.

    JSON escapes can spell a lone surrogate (``"\\ud800"``), which Python
    decodes into a ``str`` that no UTF-8 encoder accepts: the trace would
    pass validation and crash later, where an id is hashed or written out.
    ``isascii`` is O(1), so the common all-ASCII id costs nothing more.
    """
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_id(value: Any) -> bool:
    return type(value) is str and value != "" and is_unicode(value)


# Control characters (Unicode category Cc): a carriage return in an id left the
# results' CSV unreadable (a writer ending lines with "\n" does not quote "\r").
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _text(ctx: _Ctx, field: str, value: str) -> str:
    if not is_unicode(value):
        raise ctx.error(field, "not valid Unicode (lone surrogate)")
    bad = _CONTROL.search(value)
    if bad:
        raise ctx.error(field, f"control character {bad.group()!r} in {show(value)}; expected a name without them")
    return value


def _id(ctx: _Ctx, field: str, value: Any) -> str:
    if type(value) is not str or not value:
        raise ctx.error(field, f"expected a non-empty string, got {show(value)}")
    return _text(ctx, field, value)


def _check_keys(ctx: _Ctx, obj: dict, allowed: frozenset, required, what: str) -> None:
    for key in required:
        if key not in obj:
            raise ctx.error(key, f"missing (required in {what})")
    if len(obj) > len(required) and not allowed.issuperset(obj):
        unknown = sorted(k for k in obj if k not in allowed)
        raise ctx.error(
            unknown[0], f"unknown key in {what} (allowed: {', '.join(sorted(allowed))})"
        )


def _parse_prefix(ctx: _Ctx, value: Any) -> SharedPrefix:
    if type(value) is not dict:
        raise ctx.error("shared_prefix", f"expected an object {{key, tokens}}, got {show(value)}")
    _check_keys(ctx, value, PREFIX_KEYS, ("key", "tokens"), "shared_prefix")
    key = _id(ctx, "shared_prefix.key", value["key"])
    tokens = _pos_int(ctx, "shared_prefix.tokens", value["tokens"])
    return SharedPrefix(key, tokens)


def _parse_call(ctx: _Ctx, obj: Any) -> Call:
    """Fast path for the common shapes (no prefix information, or ``context_of``).

    Anything it does not fully recognise as valid goes to :func:`_check_call`,
    which repeats the checks one at a time to name the exact problem.
    """
    if type(obj) is dict:
        n = len(obj)
        if n == 5 or (n == 6 and "context_of" in obj):
            try:
                cid = obj["id"]
                parents = obj["parents"]
                prompt = obj["prompt_tokens"]
                output = obj["output_tokens"]
                delay = obj["delay"]
            except KeyError:
                return _check_call(ctx, obj)
            context_of = obj["context_of"] if n == 6 else None
            td = type(delay)
            if (
                type(cid) is str
                and cid
                and cid.isascii()
                and cid.isprintable()  # for ASCII: no control character (see _text)
                and type(parents) is list
                and type(prompt) is int
                and 0 < prompt <= MAX_TOKENS
                and type(output) is int
                and 0 < output <= MAX_TOKENS
                and (td is float or td is int)
                and 0 <= delay <= MAX_SECONDS
                and (n == 5 or (type(context_of) is str and context_of and context_of.isascii()
                                   and context_of.isprintable()))
            ):
                for p in parents:
                    if type(p) is not str or not p or not p.isascii() or not p.isprintable():
                        break
                else:
                    if len(parents) < 2 or len(set(parents)) == len(parents):
                        return make_call(cid, tuple(parents), prompt, output, float(delay), context_of,
                                         None, None, None)
    return _check_call(ctx, obj)


def _check_call(ctx: _Ctx, obj: Any) -> Call:
    if type(obj) is not dict:
        raise ctx.error("calls", f"expected each call to be an object, got {show(obj)}")
    cid = obj.get("id")
    if _is_id(cid):
        ctx.call_id = cid
    _check_keys(ctx, obj, CALL_KEYS, CALL_REQUIRED, "a call")
    _id(ctx, "id", cid)
    parents = obj["parents"]
    if type(parents) is not list:
        raise ctx.error("parents", f"expected a list of call ids, got {show(parents)}")
    for p in parents:
        if type(p) is not str or not p:
            raise ctx.error("parents", f"expected call ids (non-empty strings), got {show(p)}")
        _text(ctx, "parents", p)
    if len(parents) > 1 and len(set(parents)) != len(parents):
        raise ctx.error("parents", f"lists a parent twice: {show(parents)}")
    prompt = _pos_int(ctx, "prompt_tokens", obj["prompt_tokens"])
    output = _pos_int(ctx, "output_tokens", obj["output_tokens"])
    delay = _nonneg_number(ctx, "delay", obj["delay"])
    if len(obj) == 5:  # the common case: no prefix information
        return make_call(cid, tuple(parents), prompt, output, delay, None, None, None, None)

    for key in OPTIONAL_CALL_KEYS:
        if key in obj and obj[key] is None:
            # Accepting null would read as absent and `save` would drop the
            # key: a file that does not round-trip, and perhaps a typo'd value.
            raise ctx.error(key, "expected a value, got null (omit the key when the call has none)")
    context_of = obj.get("context_of")
    if context_of is not None:
        _id(ctx, "context_of", context_of)
    prefix = obj.get("shared_prefix")
    if prefix is not None:
        prefix = _parse_prefix(ctx, prefix)
        if context_of is not None:
            raise ctx.error(
                "shared_prefix",
                "not allowed together with context_of (the call inherits its ancestor's prefix)",
            )
        if prefix.tokens > prompt:
            raise ctx.error(
                "shared_prefix.tokens",
                f"shared prefix of {prefix.tokens} tokens is longer than prompt_tokens {prompt}",
            )
    hashes = obj.get("block_hashes")
    hbt = obj.get("hash_block_tokens")
    if hashes is not None or hbt is not None:
        if hashes is None:
            raise ctx.error("block_hashes", "missing (required with hash_block_tokens)")
        if hbt is None:
            raise ctx.error("hash_block_tokens", "missing (required with block_hashes)")
        hbt = _pos_int(ctx, "hash_block_tokens", hbt)
        if type(hashes) is not list:
            raise ctx.error("block_hashes", f"expected a list of integers, got {show(hashes)}")
        for h in hashes:
            if type(h) is LongInt:
                raise ctx.error("block_hashes", f"expected integers of at most {sys.get_int_max_str_digits()} "
                                                f"digits, got {h!r}")
            if type(h) is not int:
                raise ctx.error("block_hashes", f"expected integers, got {show(h)}")
        want = -(-prompt // hbt)
        if len(hashes) != want:
            raise ctx.error(
                "block_hashes",
                f"expected ceil(prompt_tokens / hash_block_tokens) = ceil({prompt} / {hbt}) = "
                f"{want} hashes, got {len(hashes)}",
            )
        if context_of is not None or prefix is not None:
            raise ctx.error(
                "block_hashes",
                "not allowed together with context_of or shared_prefix (one kind of prefix "
                "information per call)",
            )
        hashes = tuple(hashes)
    return make_call(cid, tuple(parents), prompt, output, delay, context_of, prefix, hashes, hbt)


def parse_program(obj: Any) -> Program:
    """Build a validated :class:`Program` from one decoded trace line.

    Raises :class:`TraceError` (without file and line; the loader adds them)
    on the first rule the program breaks.
    """
    ctx = _Ctx()
    if type(obj) is not dict:
        raise ctx.error(None, f"expected a JSON object (one program per line), got {show(obj)}")
    pid = obj.get("id")
    if _is_id(pid):
        ctx.program_id = pid
    _check_keys(ctx, obj, PROGRAM_KEYS, ("id", "arrival", "workload", "calls"), "a program")
    _id(ctx, "id", pid)
    arrival = _nonneg_number(ctx, "arrival", obj["arrival"])
    workload = obj["workload"]
    if type(workload) is not str:
        raise ctx.error("workload", f"expected a string, got {show(workload)}")
    _text(ctx, "workload", workload)
    raw_calls = obj["calls"]
    if type(raw_calls) is not list or not raw_calls:
        raise ctx.error("calls", f"expected a non-empty list of calls, got {show(raw_calls)}")

    calls = []
    index: dict[str, int] = {}
    in_order = True  # every parent listed before its child: parents exist, no cycle
    for i, raw in enumerate(raw_calls):
        ctx.call_id, ctx.call_index = None, i
        call = _parse_call(ctx, raw)
        cid = call.id
        if cid in index:
            ctx.call_id = cid
            raise ctx.error("id", f"duplicate call id (also call #{index[cid]} of this program)")
        if in_order:
            for p in call.parents:
                if p not in index:  # a later call, a missing one, or itself
                    in_order = False
                    break
        index[cid] = i
        calls.append(call)
    ctx.call_index = None  # from here on every error names its call by id

    if not in_order:
        for call in calls:
            for p in call.parents:
                if p not in index:
                    ctx.call_id = call.id
                    raise ctx.error("parents", f"names call {p!r}, which is not in this program")
        _check_acyclic(ctx, calls, index)

    ancestry = _Ancestry(calls, index, in_order)
    for call in calls:
        x = call.context_of
        if x is None:
            continue
        ctx.call_id = call.id
        if x not in index:
            raise ctx.error("context_of", f"names call {x!r}, which is not in this program")
        if x not in call.parents and not ancestry.is_ancestor(x, call):
            raise ctx.error("context_of", f"names call {x!r}, which is not an ancestor of this call")
        anc = calls[index[x]]
        if anc.prompt_tokens + anc.output_tokens > call.prompt_tokens:
            raise ctx.error(
                "context_of",
                f"context of {x!r} is {anc.prompt_tokens + anc.output_tokens} tokens "
                f"(prompt {anc.prompt_tokens} + output {anc.output_tokens}), longer than this "
                f"call's prompt_tokens {call.prompt_tokens}",
            )
    return Program(pid, arrival, workload, tuple(calls))


def check_program(program: Any) -> None:
    """Apply the trace format's rules (`parse_program`) to a :class:`Program` built in Python.

    Programs read from a trace were checked line by line; one built by hand
    was not, and a bad one (a missing parent, a cycle, a token count given as
    a string) would otherwise surface deep in a simulation as a KeyError or
    a stall. Raises :class:`TraceError` naming the program, call and field.
    """
    if not isinstance(program, Program):
        raise TraceError(f"expected a traces.format.Program, got {show(program)}")
    calls = program.calls
    if not isinstance(calls, (tuple, list)):
        raise _Ctx(program.id if _is_id(program.id) else None).error(
            "calls", f"expected a tuple of calls, got {show(calls)}")
    raw_calls = []
    for call in calls:
        if not isinstance(call, Call):
            raise _Ctx(program.id if _is_id(program.id) else None).error(
                "calls", f"expected traces.format.Call objects, got {show(call)}")
        raw = {
            "id": call.id,
            "parents": list(call.parents) if isinstance(call.parents, (tuple, list)) else call.parents,
            "prompt_tokens": call.prompt_tokens,
            "output_tokens": call.output_tokens,
            "delay": call.delay,
        }
        if call.context_of is not None:
            raw["context_of"] = call.context_of
        sp = call.shared_prefix
        if sp is not None:
            raw["shared_prefix"] = {"key": sp.key, "tokens": sp.tokens} if isinstance(sp, SharedPrefix) else sp
        if call.block_hashes is not None:
            hashes = call.block_hashes
            raw["block_hashes"] = list(hashes) if isinstance(hashes, (tuple, list)) else hashes
        if call.hash_block_tokens is not None:
            raw["hash_block_tokens"] = call.hash_block_tokens
        raw_calls.append(raw)
    parse_program({"id": program.id, "arrival": program.arrival, "workload": program.workload, "calls": raw_calls})


def _check_acyclic(ctx: _Ctx, calls: list[Call], index: dict[str, int]) -> None:
    """Kahn's algorithm; on a cycle, name a call that lies on it."""
    n = len(calls)
    indeg = [len(c.parents) for c in calls]
    children: list[list[int]] = [[] for _ in range(n)]
    for i, c in enumerate(calls):
        for p in c.parents:
            children[index[p]].append(i)
    ready = [i for i in range(n) if indeg[i] == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for j in children[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if seen == n:
        return
    # Walk parents among the unresolved calls until one repeats: it is on a cycle.
    i = next(k for k in range(n) if indeg[k] > 0)
    visited: list[int] = []
    pos: dict[int, int] = {}
    while i not in pos:
        pos[i] = len(visited)
        visited.append(i)
        i = next(index[p] for p in calls[i].parents if indeg[index[p]] > 0)
    cycle = [calls[k].id for k in visited[pos[i]:]]
    cycle.reverse()  # parent -> child order
    ctx.call_id = calls[i].id
    raise ctx.error("parents", _cycle_text(cycle))


CYCLE_SHOWN = 8  # calls of a cycle named in its message


def _cycle_text(cycle: list[str]) -> str:
    """The cycle in parent -> child order, back to its first call; past CYCLE_SHOWN calls its
    length and first calls only (a 50,000-call cycle was one 589 KB line)."""
    if len(cycle) <= CYCLE_SHOWN:
        return "cycle: " + " -> ".join(repr(c) for c in cycle + [cycle[0]])
    shown = " -> ".join(repr(c) for c in cycle[:CYCLE_SHOWN])
    return f"cycle of {len(cycle):,} calls: {shown} -> ... {len(cycle) - CYCLE_SHOWN:,} more -> {cycle[0]!r}"


class _Ancestry:
    """Whether a call is an ancestor of another (the DAG is known to be acyclic).

    First a walk up from the call, bounded: when parents are listed before
    children, every ancestor of a call sits at a smaller position, so it
    skips calls listed before the target, and a LATS step (evaluation ->
    children -> expanded node) finds its target in one or two hops. A walk
    that runs past ``WALK_LIMIT`` calls (a long chain whose every call
    continues the root's context) instead takes the target's descendants,
    found once by walking down and kept: without that, a chain of n such
    calls took n^2 / 2 steps (14 s for 10,000).
    """

    WALK_LIMIT = 256

    def __init__(self, calls: list[Call], index: dict[str, int], in_order: bool) -> None:
        self.calls, self.index, self.in_order = calls, index, in_order
        self._children: dict[str, list[str]] | None = None
        self._descendants: dict[str, set[str]] = {}

    def is_ancestor(self, target: str, call: Call) -> bool:
        if target in call.parents:
            return True
        if target in self._descendants:
            return call.id in self._descendants[target]
        index, calls = self.index, self.calls
        floor = index[target] if self.in_order else -1
        stack = [p for p in call.parents if index[p] > floor]
        seen = set(stack)
        while stack:
            for p in calls[index[stack.pop()]].parents:
                if p == target:  # test on discovery: a LATS step finds it in one or two hops
                    return True
                if p not in seen and index[p] > floor:
                    seen.add(p)
                    stack.append(p)
            if len(seen) > self.WALK_LIMIT:
                return call.id in self._descendants_of(target)
        return False

    def _descendants_of(self, target: str) -> set[str]:
        if self._children is None:
            self._children = {c.id: [] for c in self.calls}
            for c in self.calls:
                for p in c.parents:
                    self._children[p].append(c.id)
        found: set[str] = set()
        stack = [target]
        while stack:
            for child in self._children[stack.pop()]:
                if child not in found:
                    found.add(child)
                    stack.append(child)
        self._descendants[target] = found
        return found


DUPLICATE_KEY = "duplicate key in one JSON object"


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice: json would keep the
    last value silently, and which one the author meant is unknowable."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise TraceError(DUPLICATE_KEY, field=_first_repeat(pairs))
    return obj


def _first_repeat(pairs: list[tuple[str, Any]]) -> str:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no repeated key")  # only called when dict() lost a pair


class _KeyClash(dict):
    """A JSON object that gave ``key`` twice, kept so :func:`_locate_repeat`
    can say which program and call it belongs to."""

    key: str | None = None


def _keep_clash(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _KeyClash(pairs)
    if len(obj) != len(pairs):
        obj.key = _first_repeat(pairs)
    return obj


def _locate_repeat(line: str) -> TraceError:
    """The duplicate-key error of ``line`` with its program, call and field path.

    The strict decoder refuses a repeated key while the enclosing objects are
    still being read, so it cannot know them; this second, lenient decode runs
    on that error only, and so costs the hot path nothing.
    """
    top = json.JSONDecoder(object_pairs_hook=_keep_clash, parse_int=parse_json_int).decode(line)
    is_program = isinstance(top, dict) and isinstance(top.get("calls"), list)
    program_id = _own_id(top) if is_program else None

    def first_closed(value: Any, path: str, call_id: str | None) -> TraceError | None:
        # children before their parent, in document order: the order in which
        # the strict decoder finishes objects, so both blame the same one
        if isinstance(value, list):
            items = [(v, f"{path[:-1]}[{i}].") for i, v in enumerate(value)]
        elif isinstance(value, dict):
            items = [(v, f"{path}{k}.") for k, v in value.items()]
        else:
            return None
        in_calls = is_program and value is top["calls"]
        for child, child_path in items:
            cid = _own_id(child) if in_calls and isinstance(child, dict) else None
            found = first_closed(child, "", cid) if cid is not None else first_closed(child, child_path, call_id)
            if found is not None:
                return found
        if isinstance(value, _KeyClash) and value.key is not None:
            return TraceError(DUPLICATE_KEY, program_id=program_id, call_id=call_id, field=path + value.key)
        return None

    found = first_closed(top, "", None)
    if found is None:
        raise AssertionError("the strict decoder found a repeat the lenient one did not")
    return found


def _own_id(obj: dict[str, Any]) -> str | None:
    """The object's id, unless the id is the key given twice (then which one?)."""
    value = obj.get("id")
    return value if isinstance(value, str) and getattr(obj, "key", None) != "id" else None


_decode = json.JSONDecoder(object_pairs_hook=unique_keys, parse_float=parse_json_float).decode
# Only for a line that holds an integer too long for int(): a parse_int hook
# is a Python call per integer, too slow for every line of a large trace.
_decode_long = json.JSONDecoder(object_pairs_hook=unique_keys, parse_int=parse_json_int,
                                parse_float=parse_json_float).decode


def _json_complaint(exc: ValueError) -> str:
    """The decoder's complaint, placed by column on the trace's own line.

    json counts lines inside the text it was given, and a JSON Lines record
    ends in its newline, so a line cut short read "line 2 column 1".
    """
    if not isinstance(exc, json.JSONDecodeError):
        return str(exc)
    if exc.pos >= len(exc.doc.rstrip("\r\n")):
        return f"{exc.msg} at the end of the line (is it cut short?)"
    return f"{exc.msg} at column {exc.pos + 1}"


def decode_line(text: str | bytes) -> Any:
    """``json.loads`` with the decoder's complaint turned into a TraceError.

    One decoder is built once, not per line (``json.loads`` with a hook would
    build one per call): loading a million-call trace stays fast. An integer
    too long for ``int()`` becomes a :class:`LongInt`, which the validator
    rejects naming its field.
    """
    try:
        line = text.decode("utf-8") if isinstance(text, bytes) else text  # a mark is the caller's to drop
        try:
            return _decode(line)
        except (TraceError, json.JSONDecodeError):
            raise
        except ValueError:  # int() refused a very long integer
            return _decode_long(line)
    except TraceError as exc:
        if exc.reason != DUPLICATE_KEY:
            raise
        try:
            located = _locate_repeat(line)
        except RecursionError:  # too deep to walk: the key alone must do
            raise exc from None
        except ValueError as bad:  # malformed past the repeat: not JSON at all, so say that
            raise TraceError(f"malformed JSON: {_json_complaint(bad)}") from None
        raise located from None
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError from bytes
        raise TraceError(f"malformed JSON: {_json_complaint(exc)}") from None
    except RecursionError:
        raise TraceError("malformed JSON: nested too deeply") from None


_BOM = b"\xef\xbb\xbf"
# The format allows one mark; the decoders dropped a second too (``utf-8-sig`` after the first was cut).
SECOND_BOM = "a second byte order mark (bytes EF BB BF) follows the first; only one may start the file"


def decode_jsonl_line(raw: bytes, what: str = "one program per line", first: bool = False) -> Any:
    """One line of a JSON Lines file, decoded by the trace format's rules.

    Shared by the trace loaders and the JSONL importers so that they agree:
    blank lines, duplicate keys and malformed JSON are errors everywhere. A
    UTF-8 byte order mark may start the file (``first``, its first line), as
    editors on Windows write one; one on a later line is where two files
    were joined, so it is named rather than read as the JSON error it is.
    """
    if raw.startswith(_BOM):
        if not first:
            raise TraceError("a byte order mark starts this line; only a file's first line may start with one "
                             "(were two files joined?)")
        raw = raw[len(_BOM):]
        if raw.startswith(_BOM):
            raise TraceError(SECOND_BOM)
    if not raw.strip():
        raise TraceError(f"empty line ({what}, no blank lines)")
    return decode_line(raw)


@contextmanager
def reading(file: str) -> Iterator[BinaryIO]:
    """``open(file, "rb")`` whose every OSError names ``file``: one raised by a read past
    open() (EIO from /proc/self/mem) carries no file name, and the message named none."""
    try:
        with open(file, "rb") as fh:
            yield fh
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), file) from None


def validate_file(path: str | os.PathLike, limit: int | None = 50) -> list[TraceError]:
    """Every problem of a trace file, one per bad line, up to ``limit``.

    Unlike :func:`traces.io.load`, this keeps going after a bad line so a
    person sees all of them at once. ``limit=None`` collects all. Raises
    OSError if the file cannot be read.
    """
    return scan_file(path, limit).errors


@dataclass(slots=True)
class ScanResult:
    """What :func:`scan_file` found: errors (up to the limit), their total and sizes."""

    errors: list[TraceError]
    error_count: int
    programs: int
    calls: int


def scan_file(path: str | os.PathLike, limit: int | None = 50) -> ScanResult:
    """Validate every line of ``path``; keep the first ``limit`` errors and count the rest."""
    file = os.fspath(path)
    errors: list[TraceError] = []
    count = 0
    programs = calls = 0
    seen: dict[str, int] = {}
    with reading(file) as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                prog = parse_program(decode_jsonl_line(raw, first=lineno == 1))
            except TraceError as exc:
                err = exc
            else:
                first = seen.get(prog.id)
                if first is None:
                    seen[prog.id] = lineno
                    programs += 1
                    calls += len(prog.calls)
                    continue
                err = TraceError(
                    f"duplicate program id (first on line {first})",
                    program_id=prog.id,
                    field="id",
                )
            count += 1
            if limit is None or len(errors) < limit:
                errors.append(err.located(file, lineno))
    return ScanResult(errors, count, programs, calls)
