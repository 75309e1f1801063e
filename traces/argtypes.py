"""argparse types shared by the command lines (``traces``, ``sim serve``, the
gateway), so a bad number is a usage error naming its option (exit 2), not a
traceback from wherever the value is first used; `path_problem`, the
check of an output path made before a long run; and `StrictParser`, which
refuses an option given twice. Numbers are read strictly,
as JSON numbers (`json_number`), like ``python -m traces gen --param``."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable


def json_number(text: str) -> int | float | None:
    """``text`` as a JSON number (the grammar ``--param`` values are read with), else None.

    Strict: ASCII digits only, no underscores, no surrounding spaces, no
    leading ``+`` or zero, so ``5_0`` is not 50 and ``\u0661`` (an
    Arabic-Indic one) is not 1, as Python's ``int`` and ``float`` read them.
    ``NaN`` and ``Infinity`` are JSON's words for floats, and a number past
    the digits Python converts is None too.
    """
    if not text or text != text.strip():  # json.loads skips surrounding whitespace
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an integer past Python's digit limit, or "[[[[..."
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# Said where Python would read the text as a number but `json_number` does not.
_STRICT = "in ASCII digits as JSON writes it (no underscores, spaces, '+' or leading zeros)"


def _integer(text: str, noun: str = "an integer") -> int:
    value = json_number(text)
    if not isinstance(value, int):
        try:
            int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        raise argparse.ArgumentTypeError(f"expected {noun} {_STRICT}, got {text!r}")
    return value


def integer(text: str) -> int:
    """Any integer, read strictly (its range is the option's own check)."""
    return _integer(text)


def number(text: str) -> float:
    """Any number, read strictly; ``nan`` and ``inf`` pass, for the option's own check to name."""
    value = json_number(text)
    if value is None:
        try:
            loose = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isfinite(loose):  # '.5', '1_0', a non-ASCII digit
            raise argparse.ArgumentTypeError(f"expected a number {_STRICT}, e.g. 0.5, got {text!r}")
        return loose
    try:
        return float(value)
    except OverflowError:  # an integer past what a float holds
        return math.inf


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum`` (engine limits take 1: 0 would start an engine that never schedules)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def int_between(minimum: int, maximum: int) -> Callable[[str], int]:
    """An integer in [minimum, maximum] (a token count: at most the trace format's limit)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer from {minimum} to {maximum:,}, got {value}")
        return value

    parse.__name__ = f"int_between_{minimum}_{maximum}"
    return parse


def port_number(text: str) -> int:
    """A TCP port (0: any free one)."""
    port = _integer(text, "a port number")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {port}")
    return port


def nonblank(text: str) -> str:
    """A name that is not blank (a model name: '' served, or asked for, a model with no name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty name, got {text!r}")
    return text


def api_key(text: str) -> str:
    """An API key sent as ``Authorization: Bearer KEY`` (what vLLM's ``--api-key`` checks), refused here if a
    header cannot carry it whole: a control character (aiohttp refuses a newline only at the first request),
    a space at either end (HTTP drops it, so the key the engine sees is another), a non-ASCII character (the
    engine's server reads header bytes as Latin-1, aiohttp writes UTF-8) or none at all (``Bearer `` gets a
    401). The error names the character without echoing the key."""
    if not text:
        raise argparse.ArgumentTypeError("expected a key, got an empty one")
    bad = next((i for i, c in enumerate(text) if not 0x20 <= ord(c) <= 0x7E), None)
    if bad is None and text != text.strip(" "):
        bad = 0 if text[0] == " " else len(text) - 1
    if bad is not None:
        raise argparse.ArgumentTypeError(
            f"expected printable ASCII, with no space at either end; character {bad + 1} of the key "
            f"(of {len(text)}) is {_described_char(text[bad])}")
    return text


def api_key_or_env(given: str | None, variable: str) -> str | None:
    """``given`` (the ``--api-key`` flag), else the environment variable ``variable``, checked as the
    flag is, so a key need not show in ``ps``: ``vllm serve`` reads VLLM_API_KEY, vLLM's benchmark
    client OPENAI_API_KEY. An empty variable is no key, as vLLM skips it. ValueError names the
    variable without echoing the key."""
    if given is not None:
        return given
    text = os.environ.get(variable, "")
    if not text:
        return None
    try:
        return api_key(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"the environment's {variable}: {exc}") from None


def _described_char(char: str) -> str:
    """How an error names a character of a secret without showing the secret: its code point and class."""
    kind = "a space" if char == " " else "a control character" if ord(char) < 0x20 or ord(char) == 0x7F \
        else "not ASCII"
    return f"U+{ord(char):04X} ({kind})"


def fraction(text: str) -> float:
    """A number in (0, 1] (a share of GPU memory: 0 leaves nothing for the model, more than 1 is not there)."""
    value = number(text)
    if not 0 < value <= 1:  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, coefficients of variation)."""
    value = number(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def path_problem(path: str, flag: str, directory: bool = False) -> str | None:
    """Why ``path`` (a file, or a ``directory`` to be made) cannot be written, as one line naming
    ``flag``; None if it can. For an output checked before a long run (``engine profile -o``,
    ``engine validate --json``): a missing parent, or one that is a file, used to end the run in a
    traceback, or an error without the flag, when the output was written."""
    if not path.strip():
        return f"{flag} {path!r}: expected a path"
    if os.path.isdir(path) and not directory:
        return f"{flag} {path}: is a directory, expected a file to write"
    if os.path.exists(path) and directory and not os.path.isdir(path):
        return f"{flag} {path}: exists and is not a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if directory:  # made with its parents: the nearest one that exists must take it
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
    if not os.path.exists(parent):
        return f"{flag} {path}: directory {parent} does not exist"
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is not a directory"
    if os.path.isdir(path) and directory:
        parent = path
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.isfile(path) and not os.access(path, os.W_OK)):
        return f"{flag} {path}: cannot write there: permission denied"
    return None


class _StoreOnce(argparse.Action):
    """argparse's plain store, refusing a second value for the same option in one parse."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.option_strings:  # a positional is consumed once by construction
            given = namespace.__dict__.setdefault(_GIVEN, {})
            shown = f"{option_string} {values}"
            if self.dest in given:
                parser.error(f"argument {'/'.join(self.option_strings)}: given twice ({given[self.dest]}, then "
                             f"{shown}); give it once")
            given[self.dest] = shown
        setattr(namespace, self.dest, values)


_GIVEN = "_strict_parser_given"  # the namespace's record of the options given so far in this parse


class StrictParser(argparse.ArgumentParser):
    """An ArgumentParser that refuses a single-valued option given twice (exit 2, naming both).

    argparse keeps the last value: ``--out a ... --out b`` wrote to ``b`` and
    ``--seeds 3 --seeds 5`` ran five, without a word. Options that take a
    list (``--set``, ``action="append"``) and flags are not affected, nor
    options declared on a plain ArgumentParser given as a ``parents=`` entry.
    Its subcommands' parsers are StrictParsers too (``add_subparsers`` makes
    them of the parent's class). The record of what was given lives in the
    parse's namespace, and is removed from it before the namespace is returned.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        try:
            namespace, extras = super().parse_known_args(args, namespace)
        finally:
            if namespace is not None:  # one given, or the one made, as an error exits before this
                namespace.__dict__.pop(_GIVEN, None)
        return namespace, extras
