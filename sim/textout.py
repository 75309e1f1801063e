"""Plain-text outputs: aligned tables for the terminal and atomic file writes.

Several commands print a table (`run`, `sweep`, `plot`, `engine validate`)
and several write result files that a reader may open while a long run is
still going; one helper each keeps their formats and guarantees the same.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

# The largest count or size taken anywhere (engine keys, specs, profiles, fitted models): the
# arithmetic runs in floats, which hold every integer up to 2**53 exactly; past about 1e308
# converting one raised OverflowError (a traceback).
MAX_COUNT = 2**53


def brief(value: Any) -> str:
    """A value for an error message: its repr, or its length for an integer too long to show."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(value))} digits"
    return repr(value)


def aligned(rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Rows as lines: the first ``left`` columns left-aligned, the rest right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]


@contextmanager
def writing_under(directory: Path) -> Iterator[None]:
    """Name ``directory`` in an OSError that names no file.

    A failed write or flush on an open file (a full disk) carries no file
    name, so the user read "[Errno 28] No space left on device" and had to
    guess where.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(directory)) from None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)
