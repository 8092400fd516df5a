"""Progress on stderr: bars and live lines on a terminal, a status line every ~30 s elsewhere, nothing with --quiet.

Two kinds of output:

- :func:`progress` wraps a loop in a tqdm bar and :func:`status` prints a one-line message, both on
  a terminal only (the training loop, the runner's per-step lines).
- :func:`report` is the one interface every long computation calls with ``(done, total, unit)``:
  the Lanczos iterations, the trace estimators' blocks of products, SLQ and the surface's grid
  points. On a terminal it redraws one live line (at most 5 times a second); on any other stream
  (a log file, a batch job's output) it writes one line every :data:`INTERVAL_S` seconds with the
  count done, the rate and the time left, e.g.
  ``lossatlas: Lanczos: 120/400 products (30%), 3.9 products/s, at most 1 min 12 s left``.

The rate is (done − done at the task's first report) / (time since that report), and the time left
(total − done) / rate; it is "at most" for a total that is only a cap (Lanczos stops when its Ritz
pairs converge). A task is one run of one estimator: a new name, unit or total, or a count that
goes back, starts the next. :func:`task` names the work around the reports (``SLQ``,
``hessian step 100``); :func:`reporting` sends them to a :class:`Reporter` of the caller's (tests,
a notebook's own stream). ``--quiet`` (:func:`set_quiet`) silences all of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

INTERVAL_S = 30.0  # seconds between two status lines on a stream that is not a terminal
REDRAW_S = 0.2  # seconds between two redraws of the live line on a terminal

_QUIET = False
_clock: Callable[[], float] = time.monotonic  # the time source of the default reporter (tests replace it)


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar, status line and report of this process."""
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
    """A one-line status message on stderr when progress is enabled (a live report line is cleared first)."""
    if enabled():
        reporter = _REPORTER.get() or _DEFAULT
        if reporter is not None:
            reporter.clear()
        print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``: a time span for a status line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Reporter:
    """Turns ``report(done, total, unit)`` calls into progress output on one stream.

    Args:
        stream: where to write (default: ``sys.stderr`` at the time of writing).
        interval: seconds between two status lines when the stream is not a terminal (default 30).
        clock: the time source in seconds (default ``time.monotonic``; tests pass a fake one).
        tty: whether the stream is a terminal (default: ``stream.isatty()``).
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = INTERVAL_S,
                 clock: Callable[[], float] | None = None, tty: bool | None = None) -> None:
        self.stream = stream
        self.interval = float(interval)
        self.clock = clock
        self.tty = tty
        self._key: tuple | None = None  # (what, unit, total) of the task running
        self._t0 = 0.0  # when the task's first report came
        self._done0 = 0  # the count at that report (a resumed surface starts above 0)
        self._done = 0
        self._last = 0.0  # when the last line was written (or the task began)
        self._drawn = False  # a live line is on the terminal

    def _stream(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _now(self) -> float:
        return (self.clock or _clock)()

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        isatty = getattr(self._stream(), "isatty", None)
        return bool(isatty and isatty())

    def update(self, done: int, total: int | None, unit: str, what: str, *, bound: bool = False) -> None:
        """One report: ``done`` of ``total`` (None: unknown; a cap when ``bound``) ``unit`` of the task ``what``."""
        now = self._now()
        key = (what, unit, total)
        if key != self._key or done < self._done:  # a new task: its rate is measured from here
            self._key, self._t0, self._done0, self._last = key, now, done, now
        self._done = done
        if self._is_tty():
            finished = total is not None and done >= total
            if finished:
                self.clear()
            elif now - self._last >= REDRAW_S or not self._drawn:
                self._write("\r" + self.line(done, total, unit, what, now, bound=bound) + "\x1b[K")
                self._drawn, self._last = True, now
        elif now - self._last >= self.interval:
            self._write(self.line(done, total, unit, what, now, bound=bound) + "\n")
            self._last = now

    def line(self, done: int, total: int | None, unit: str, what: str, now: float, *, bound: bool = False) -> str:
        """The status line: count (and share) done, rate since the task began, time left."""
        label = " · ".join([*_LABELS.get(), what] if what else _LABELS.get())
        elapsed = now - self._t0
        rate = (done - self._done0) / elapsed if elapsed > 0 else 0.0
        count = f"{done}/{total} {unit} ({100.0 * done / total:.0f}%)" if total else f"{done} {unit}"
        parts = [f"lossatlas: {label + ': ' if label else ''}{count}"]
        if rate > 0:
            parts.append(f"{rate:.3g} {unit}/s")
            if total:
                parts.append(f"{'at most ' if bound else 'about '}{duration((total - done) / rate)} left")
        else:
            parts.append(f"{duration(elapsed)} so far")
        return ", ".join(parts)

    def clear(self) -> None:
        """Erase the live line of a terminal (nothing else is written)."""
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def _write(self, text: str) -> None:
        stream = self._stream()
        stream.write(text)
        stream.flush()


_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("lossatlas_reporter", default=None)
_LABELS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("lossatlas_progress_labels", default=())
_DEFAULT: Reporter | None = None  # stderr, made at the first report


def report(done: int, total: int | None = None, unit: str = "products", what: str = "", *,
           bound: bool = False) -> None:
    """Report progress: ``done`` of ``total`` ``unit`` (e.g. Hessian-vector ``products``, grid ``points``).

    Cheap when silenced (``--quiet``): nothing is measured or written. ``bound`` marks ``total`` as a
    cap the work may stop short of (the time left is then "at most").
    """
    global _DEFAULT
    if _QUIET:
        return
    reporter = _REPORTER.get()
    if reporter is None and os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 alone reports to stderr (every rank does the same work)
    if reporter is None:
        if _DEFAULT is None:
            _DEFAULT = Reporter()
        reporter = _DEFAULT
    reporter.update(int(done), None if total is None else int(total), unit, what, bound=bound)


@contextlib.contextmanager
def task(label: str) -> Iterator[None]:
    """Name the work inside the block: its reports read ``label · what: ...`` (nested labels join)."""
    token = _LABELS.set((*_LABELS.get(), label))
    try:
        yield
    finally:
        _LABELS.reset(token)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Send the reports made inside the block (in this thread or task) to ``reporter``."""
    token = _REPORTER.set(reporter)
    try:
        yield reporter
    finally:
        reporter.clear()
        _REPORTER.reset(token)
