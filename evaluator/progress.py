"""Progress of long stages: a rich bar on a terminal, elsewhere one line every few seconds.

A bar redrawn in place is invisible in `make demo > log` or a CI log, where minutes of training looked
like a hang; so where stderr is not a terminal each stage prints a plain line (step, rate, time left)
every ``XARES_PROGRESS_SECONDS`` (30 s by default; 0: at every update) and one when it ends.

    with progress("training", total=100_000, completed=start, unit="steps") as ticker:
        for step in ...:
            ticker.advance(1)
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

LOG_SECONDS = 30.0  # between two lines where there is no terminal
# where a campaign job's reports go (its log file), for the stages it runs; None: the caller's choice
_SINK: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("xares_progress", default=None)


@contextlib.contextmanager
def lines_to(write: Callable[[str], None]) -> Iterator[None]:
    """Within this block, every `progress` and `waiting` report is a plain line to ``write``, also where the
    caller turned reports off: a campaign's jobs keep the terminal for the campaign's own bar, and their
    logs still say how far a ten-hour training is."""
    token = _SINK.set(write)
    try:
        yield
    finally:
        _SINK.reset(token)


def _route(enabled: bool, write: Callable[[str], None] | None) -> tuple[bool, Callable[[str], None] | None]:
    """(report at all?, where lines go): inside `lines_to`, always, to its sink unless the caller named one."""
    sink = _SINK.get()
    return enabled or sink is not None, write or sink


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("XARES_PROGRESS_SECONDS", LOG_SECONDS)))
    except ValueError:
        return LOG_SECONDS


def duration(seconds: float) -> str:
    """'2h 05m', '3m 20s', '12s'."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


class Ticker:
    """What a stage reports through: ``advance(n)`` or ``set(completed, note)``."""

    def advance(self, n: float = 1) -> None: ...

    def set(self, completed: float, note: str = "") -> None: ...


class _Bar(Ticker):
    def __init__(self, bar, task, label: str):
        self.bar, self.task, self.label = bar, task, label

    def advance(self, n: float = 1) -> None:
        self.bar.advance(self.task, n)

    def set(self, completed: float, note: str = "") -> None:
        self.bar.update(self.task, completed=completed, description=f"{self.label}  {note}".rstrip())


class _Lines(Ticker):
    """The plain-text reporter: a line when ``interval`` seconds have passed since the last one."""

    def __init__(self, label: str, total: float | None, completed: float, unit: str, interval: float,
                 write: Callable[[str], None]):
        self.label, self.total, self.done, self.unit, self.write = label, total, completed, unit, write
        self.start_done, self.t0, self.interval = completed, time.monotonic(), interval
        self.last, self.note = self.t0, ""

    def advance(self, n: float = 1) -> None:
        self.set(self.done + n, self.note)

    def set(self, completed: float, note: str = "") -> None:
        self.done, self.note = completed, note
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.write(self.line(now))

    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(1e-9, now - self.t0)
        rate = (self.done - self.start_done) / elapsed
        count = f"{self.done:g}/{self.total:g}" if self.total else f"{self.done:g}"
        text = f"[{self.label}] {count} {self.unit}, {rate:.3g} {self.unit}/s, {duration(elapsed)} elapsed"
        if self.total and rate > 0 and not final:
            text += f", ~{duration((self.total - self.done) / rate)} left"
        if self.note:
            text += f" ({self.note})"
        return text + (", done" if final else "")


@contextlib.contextmanager
def progress(label: str, total: float | None = None, *, completed: float = 0, unit: str = "steps",
             enabled: bool = True, write: Callable[[str], None] | None = None) -> Iterator[Ticker]:
    """A `Ticker`: a bar on a terminal, periodic lines elsewhere (or to ``write``), nothing when not ``enabled``
    (unless inside `lines_to`)."""
    enabled, write = _route(enabled, write)
    if not enabled:
        yield Ticker()
        return
    if write is None and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, transient=True) as bar:
            yield _Bar(bar, bar.add_task(label, total=total, completed=completed), label)
        return
    lines = _Lines(label, total, completed, unit, _interval(), write or _stderr)
    yield lines
    if time.monotonic() - lines.t0 >= lines.interval:  # a stage that printed lines says when it ends
        lines.write(lines.line(time.monotonic(), final=True))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def waiting(label: str, *, enabled: bool = True, write: Callable[[str], None] | None = None) -> Iterator[None]:
    """For one long call with no steps to count (a metric's models scoring a task): a spinner on a terminal,
    elsewhere a line every interval while it runs, so a log never looks hung."""
    enabled, write = _route(enabled, write)
    if not enabled:
        yield
        return
    if write is None and sys.stderr.isatty():
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn(label), TimeElapsedColumn(), transient=True) as bar:
            bar.add_task(label, total=None)
            yield
        return
    write, interval, t0 = write or _stderr, _interval(), time.monotonic()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(interval, 0.05)):
            write(f"[{label}] still running, {duration(time.monotonic() - t0)} elapsed")

    thread = threading.Thread(target=beat, name=f"progress: {label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
