"""argparse types shared by the command lines (``traces``, ``sim serve``, the
gateway), so a bad number is a usage error naming its option (exit 2), not a
traceback from wherever the value is first used."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _integer(text: str, noun: str = "an integer") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


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


def positive_float(text: str) -> float:
    """A finite number > 0 (rates, coefficients of variation)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value
