"""Reading and writing trace files (JSON Lines, one program per line).

Both directions stream: :func:`load` holds one line at a time (plus the set of
program ids seen, to reject duplicates), and :func:`save` writes each program
as it comes, so traces larger than memory can be produced and checked.

Output is deterministic byte for byte: keys in the dataclass field order,
compact separators, optional keys omitted when ``None``, and floats written
with ``repr`` (the shortest string that reads back as the same float), so
``load(save(x)) == x`` exactly and the same seed gives the same file.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import contextlib
from contextlib import contextmanager
from typing import Iterable, Iterator

from traces.format import Call, Program
from traces.validate import TraceError, decode_jsonl_line, parse_program, reading

# json.dumps would also give repr-exact floats; a hand-built encoder avoids
# building an intermediate dict per call and keeps the key order explicit.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _float(x: float) -> str:
    return repr(float(x))


def call_to_json(call: Call) -> str:
    """One call as compact JSON, keys in field order, optional keys omitted."""
    parts = [
        '{"id":',
        _dumps(call.id),
        ',"parents":',
        _dumps(list(call.parents)),
        ',"prompt_tokens":',
        str(call.prompt_tokens),
        ',"output_tokens":',
        str(call.output_tokens),
        ',"delay":',
        _float(call.delay),
    ]
    if call.context_of is not None:
        parts += [',"context_of":', _dumps(call.context_of)]
    if call.shared_prefix is not None:
        sp = call.shared_prefix
        parts += [',"shared_prefix":{"key":', _dumps(sp.key), ',"tokens":', str(sp.tokens), "}"]
    if call.block_hashes is not None:
        parts += [',"block_hashes":[', ",".join(map(str, call.block_hashes)), "]"]
    if call.hash_block_tokens is not None:
        parts += [',"hash_block_tokens":', str(call.hash_block_tokens)]
    parts.append("}")
    return "".join(parts)


def program_to_json(program: Program) -> str:
    """One program as a single trace line (without the newline)."""
    return (
        '{"id":'
        + _dumps(program.id)
        + ',"arrival":'
        + _float(program.arrival)
        + ',"workload":'
        + _dumps(program.workload)
        + ',"calls":['
        + ",".join(call_to_json(c) for c in program.calls)
        + "]}"
    )


def digest(programs: Iterable[Program]) -> str:
    """SHA-256 of the programs in their trace form, in id order: two traces with this digest hold
    the same programs, however their lines are ordered or spaced (a replay records it, and
    ``engine validate`` refuses a trace that no longer matches)."""
    h = hashlib.sha256()
    for program in sorted(programs, key=lambda p: p.id):
        h.update(program_to_json(program).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def save(programs: Iterable[Program], path: str | os.PathLike) -> int:
    """Write ``programs`` to ``path`` as a trace; returns how many were written.

    Writes to a temporary file beside the file ``path`` names and renames it
    into place, so a failure (or a bad program) never leaves a half-written
    trace under the final name. A symbolic link is followed (its target is
    replaced, the link kept); a device, a pipe or a file descriptor
    (``/dev/stdout``, a FIFO) is written through, since nothing can be
    renamed over it. Each program
    is validated by round-tripping its JSON through the parser: a generator
    or importer bug is caught here, not in a simulation hours later.
    Duplicate program ids are rejected too. An OSError names ``path``, never
    the temporary file, which the user has not heard of.
    """
    target = os.fspath(path)
    real = os.path.realpath(target)
    descriptor = _is_descriptor(target)
    if descriptor or (os.path.exists(target) and not os.path.isfile(target)):
        with _named(target):
            # Appending: opening /dev/stdout afresh with "w" truncates a file the shell redirected it to,
            # dropping what ">>" meant to keep.
            fh = open(target, "a" if descriptor else "w", encoding="utf-8", newline="\n")
        with _closing(fh, target):
            return _write(programs, fh, target)
    directory, name = os.path.split(real)
    # A short name: the target's own name plus a suffix could pass the 255-byte limit on names
    # (cut in bytes: 64 characters of UTF-8 may be 256).
    short = os.fsdecode(os.fsencode(name)[:64])
    tmp = os.path.join(directory, f".{short}.tmp{os.getpid()}")
    try:
        with _named(target):
            fh = open(tmp, "w", encoding="utf-8", newline="\n")
        with _closing(fh, target):
            n = _write(programs, fh, target)
        with _named(target):
            os.replace(tmp, real)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def _is_descriptor(path: str) -> bool:
    """Whether ``path`` names an open file descriptor (/dev/stdout, /dev/fd/N, /proc/PID/fd/N), directly
    or through symbolic links: whatever it points at, a shell's redirection or a pipe, is written through.

    Resolving it fully would name the file a shell redirected stdout to, and replacing that file
    would drop what ``>>`` had appended and orphan the shell's own descriptor.
    """
    seen = 0
    while True:
        path = os.path.abspath(path)
        if path.startswith(("/dev/stdin", "/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/")):
            return True
        if not os.path.islink(path) or seen == 40:
            return False
        path, seen = os.path.join(os.path.dirname(path), os.readlink(path)), seen + 1


def _write(programs: Iterable[Program], fh, target: str) -> int:
    """Validate and write each program as a line; an error writing names ``target``.

    An OSError from ``programs`` itself (a lazily read input that is missing)
    names its own file and passes through.
    """
    seen: set[str] = set()
    n = 0
    for n, program in enumerate(programs, 1):
        line = program_to_json(program)
        try:
            parse_program(json.loads(line))
        except TraceError as exc:
            raise exc.located(target, n) from None
        if program.id in seen:
            raise TraceError("duplicate program id", file=target, line=n, program_id=program.id, field="id")
        seen.add(program.id)
        with _named(target):
            fh.write(line)
            fh.write("\n")
    with _named(target):
        fh.flush()
    return n


@contextmanager
def _named(target: str) -> Iterator[None]:
    """Re-raise an OSError of our own file operations as one about ``target``: the
    temporary file is unknown to the user, and a failed write names no file at all."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, target) from None


@contextmanager
def _closing(fh, target: str) -> Iterator[None]:
    """Close ``fh`` after the body. Closing flushes what is still buffered, so on a full
    disk it fails again, and its error (naming no file) replaced the body's named one:
    an error of the body wins; closing after a clean body is `_named`."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            fh.close()
        raise
    with _named(target):
        fh.close()


def load(path: str | os.PathLike) -> Iterator[Program]:
    """Stream the programs of a trace file, validating each.

    Raises :class:`TraceError` (with file and line) at the first bad line,
    and OSError if the file cannot be read. Programs are yielded in file
    order.
    """
    file = os.fspath(path)
    seen: dict[str, int] = {}
    with reading(file) as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                program = parse_program(decode_jsonl_line(raw, first=lineno == 1))
            except TraceError as exc:
                raise exc.located(file, lineno) from None
            first = seen.setdefault(program.id, lineno)
            if first != lineno:
                raise TraceError(
                    f"duplicate program id (first on line {first})",
                    file=file,
                    line=lineno,
                    program_id=program.id,
                    field="id",
                )
            yield program


def load_all(path: str | os.PathLike) -> list[Program]:
    """All programs of a trace file as a list (see :func:`load`).

    The cyclic garbage collector is paused while the list is built: a
    million new Calls would otherwise trigger repeated full collections that
    rescan everything loaded so far, doubling the load time, and loading
    creates no reference cycles for it to find. It is re-enabled (if it was
    enabled) even when loading fails.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return list(load(path))
    finally:
        if was_enabled:
            gc.enable()
