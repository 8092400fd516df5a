"""Progress bars on stderr, shown only when stderr is a terminal and not silenced."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar of this process."""
    global _QUIET
    _QUIET = bool(quiet)


def enabled() -> bool:
    """True when progress should be drawn: stderr is a TTY and --quiet was not given."""
    return not _QUIET and sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when enabled, else return it unchanged."""
    if not enabled():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def status(line: str) -> None:
    """A one-line status message on stderr when progress is enabled."""
    if enabled():
        print(line, file=sys.stderr, flush=True)
