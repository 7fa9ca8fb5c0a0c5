"""Progress display: one bar factory for every phase, shown only where someone is watching.

A bar appears only on a terminal (``sys.stderr`` is a tty: redirected logs get no ``\\r`` lines),
only after a phase has run for a second (``delay``: short phases stay silent), and never under
``quiet`` (``-q``). Bars have honest totals — bytes to write or hash, groups in a sweep — or none:
:func:`phase` shows a phase of unknown length (tracing) as its elapsed time, refreshed while it runs.

Example:
    >>> with progress(total=nbytes, desc="writing", unit="B", quiet=quiet) as bar:  # doctest: +SKIP
    ...     bar.update(len(chunk))
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

__all__ = ["DELAY_S", "phase", "progress", "shown"]

DELAY_S = 1.0
"""Seconds a phase runs before its bar appears."""


def shown(quiet: bool) -> bool:
    """Whether bars are drawn: not ``quiet``, and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


def progress(iterable: Iterable[Any] | None = None, *, quiet: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when :func:`shown` and after :data:`DELAY_S` (or ``delay``);
    ``unit="B"`` scales to kB/MB/GB."""
    if kwargs.get("unit") == "B":
        kwargs.setdefault("unit_scale", True)
        kwargs.setdefault("unit_divisor", 1000)
    kwargs.setdefault("delay", DELAY_S)
    return tqdm(iterable, disable=not shown(quiet), file=sys.stderr, dynamic_ncols=True, **kwargs)


@contextmanager
def phase(desc: str, *, quiet: bool, interval: float = 0.5) -> Iterator[None]:
    """Show ``desc`` and its elapsed time while the block runs (a phase with no countable steps)."""
    if not shown(quiet):
        yield
        return
    bar = progress(desc=desc, quiet=quiet, bar_format="{desc}: {elapsed}", total=None, leave=False)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(interval):
            bar.update(0)  # redraws (after the delay) and records the draw, so close() ends the line

    ticker = threading.Thread(target=tick, name="permerge-phase", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()
