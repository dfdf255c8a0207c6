"""Progress for long work, on stderr (so `--json` output on stdout stays clean).

On a terminal a bar is tqdm's, drawn in place. Anywhere else (a log file, a pipe: a kfp task's
output, ``make demo > demo.log``) it is a few plain lines instead: one when a tenth of the work
is done since the last line or when 30 s have passed and something moved (never closer than
2 s), and one at the end; nothing while nothing moves, nothing for work done within 2 s. ``KUBERANK_PROGRESS=0`` turns progress
off, ``=lines`` or ``=bars`` picks one form whatever stderr is.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

LINE_FRACTION = 0.1  # a line when this share of the total is done since the last one
LINE_SECONDS = 30.0  # or when this long has passed and something moved
LINE_MIN_SECONDS = 2.0  # and never two lines closer than this (fast loops write one line)


def mode(stream=None) -> str:
    """``"off"``, ``"bars"`` (tqdm, redrawn in place) or ``"lines"`` (sparse plain lines):
    KUBERANK_PROGRESS when it says so, else bars on a terminal and lines elsewhere."""
    setting = os.environ.get("KUBERANK_PROGRESS", "1").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return "off"
    if setting in ("bars", "lines"):
        return setting
    stream = sys.stderr if stream is None else stream
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def enabled() -> bool:
    return mode() != "off"


class LineProgress:
    """The tqdm calls kuberank uses (iteration, ``update``, ``refresh``, ``n``, postfix,
    context manager), written as sparse lines for logs; see the module docstring."""

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        file=None,
        clock: Callable[[], float] = time.monotonic,
        fraction: float = LINE_FRACTION,
        seconds: float = LINE_SECONDS,
        min_seconds: float = LINE_MIN_SECONDS,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.file = sys.stderr if file is None else file
        self.clock, self.fraction, self.seconds, self.min_seconds = (
            clock,
            fraction,
            seconds,
            min_seconds,
        )
        self.n = 0
        self.postfix = ""
        self.start = self._last_t = clock()
        self._last_n = 0
        self.closed = False

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self, *args, **kwargs) -> None:
        """Write a line if one is due (a bar redraws here; a log only gets news)."""
        now = self.clock()
        moved = self.n - self._last_n
        if self.closed or moved <= 0 or now - self._last_t < self.min_seconds:
            return
        share = moved / self.total if self.total else 0.0
        if share >= self.fraction or now - self._last_t >= self.seconds:
            self._line(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self.closed:
            return
        now = self.clock()
        # the closing line, unless the work took less than min_seconds and wrote nothing yet
        if self.n != self._last_n and (self._last_n or now - self.start >= self.min_seconds):
            self._line(now, done=True)
        self.closed = True

    def format(self, now: float, done: bool = False) -> str:
        elapsed = now - self.start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        text = f"{self.desc}: {count} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f" in {tqdm.format_interval(elapsed)}"
        if not done and self.total and self.n and self.n < self.total:
            left = elapsed / self.n * (self.total - self.n)
            text += f", ~{tqdm.format_interval(left)} left"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _line(self, now: float, done: bool = False) -> None:
        try:
            self.file.write(self.format(now, done) + "\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed or broken log must not end the work
            pass
        self._last_t, self._last_n = now, self.n


def bar(
    iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it"
):
    """Progress on stderr: a tqdm bar on a terminal, sparse lines elsewhere (see the module
    docstring); KUBERANK_PROGRESS=0 turns it off."""
    how = mode()
    if how == "lines":
        return LineProgress(iterable, desc=desc, total=total, unit=unit)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        disable=how == "off",
        dynamic_ncols=True,
        leave=False,
    )


def note(message: str) -> None:
    """One line of progress on stderr that does not break a bar being drawn."""
    tqdm.write(message, file=sys.stderr)
