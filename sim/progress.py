"""A progress bar over the programs a run simulates, on stderr.

Runs take minutes at realistic loads, so the CLI shows progress; it goes to
stderr so stdout (the result table) stays clean for pipes, and it never
touches the output files, which must be byte-identical across runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from tqdm import tqdm


@dataclass
class Progress:
    """Counts finished programs; ``advance`` is what `simulate` calls."""

    bar: tqdm | None  # None when quiet
    done: int = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def finish_to(self, target: int) -> None:
        """Catch up to ``target`` (a policy is done even if it reported fewer)."""
        if target > self.done:
            self.advance(target - self.done)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)


@contextmanager
def progress_bar(total: int, quiet: bool = False, unit: str = "prog") -> Iterator[Progress]:
    """A bar on stderr, or none at all when ``quiet``.

    Even a disabled tqdm takes tqdm's lock, a named semaphore shared across
    processes; a seed worker that is terminated (an interrupted ``--seeds``
    run) could not release it, and Python then warns of a leaked semaphore.
    """
    if quiet:
        yield Progress(None)
        return
    bar = tqdm(total=total, unit=unit, leave=False, dynamic_ncols=True, mininterval=0.5)
    try:
        yield Progress(bar)
    finally:
        bar.close()
