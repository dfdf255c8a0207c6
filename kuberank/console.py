"""The console of long commands (``kuberank demo``, ``kuberank pipeline run --local``): one line
per step on the terminal (name, seconds, its headline number), everything else in log files.

    console = StepConsole("runs/<ts>/logs")
    with console.step("evaluate-served") as step:  # the block's output -> logs/evaluate-served.log
        ...
        step.headline = "test nDCG@10 0.1043"
    console.say("a line for the terminal")

Quiet (the default): while a step runs, file descriptors 1 and 2 point at its log file, so what
libraries, Ray, Triton and subprocesses print lands there too; on a terminal a transient line
shows the running step and its time. ``verbose=True`` leaves the output on the console (the
step lines are printed as well). A failed step prints its log's path and last lines.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

NAME_WIDTH = 18
TAIL_LINES = 20


class Step:
    """What a step block reports: set ``headline`` before the block ends."""

    def __init__(self, name: str):
        self.name = name
        self.headline = ""
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def format_step(name: str, seconds: float, headline: str = "", ok: bool = True) -> str:
    """``  evaluate            19.3 s  test nDCG@10 0.0984``."""
    status = "" if ok else "FAILED "
    text = f"  {name:<{NAME_WIDTH}} {seconds:7.1f} s  {status}{headline}"
    return text.rstrip()


def tail(path: Path | None, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log (empty when there is none)."""
    if path is None or not Path(path).is_file():
        return []
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        text = fh.read().decode(errors="replace")
    return text.replace("\r", "\n").splitlines()[-lines:]


class StepConsole:
    """Step lines to ``echo`` (default: file descriptor ``fd``, standard output or error, as it
    was when the console was made), the rest of each step's output to ``log_dir/<step>.log``."""

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        verbose: bool = False,
        echo: Callable[[str], None] | None = None,
        fd: int = 1,
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self._lock = threading.Lock()
        self._ticker: tuple[threading.Thread, threading.Event] | None = None
        self._stream = None
        if echo is None:
            std = sys.stdout if fd == 1 else sys.stderr
            try:  # a stream of its own on the terminal, so capturing fds 1 and 2 does not take it
                std.flush()
                self._stream = os.fdopen(os.dup(std.fileno()), "w", buffering=1)
            except (AttributeError, OSError, ValueError):  # no file descriptor (a test's capture)
                self._stream = std
            echo = self._write
        self._echo = echo
        self.live = not verbose and self._stream is not None and _isatty(self._stream)

    # ------------------------------------------------------------------ output

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def say(self, text: str = "") -> None:
        """Lines for the terminal (a section header, a table, the summary)."""
        with self._lock:
            self._clear()
            for line in text.split("\n"):
                self._echo(line)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # ------------------------------------------------------------------ steps

    def begin(self, name: str) -> None:
        """A step started: on a terminal, a transient line with its running time."""
        self._stop_ticker()
        if not self.live:
            return
        stop = threading.Event()
        started = time.perf_counter()

        def tick():
            while not stop.wait(1.0):
                with self._lock:
                    if not stop.is_set():
                        text = format_step(name, time.perf_counter() - started, "...")
                        self._stream.write("\r\x1b[K" + text)
                        self._stream.flush()

        thread = threading.Thread(target=tick, name=f"console-{name}", daemon=True)
        self._ticker = (thread, stop)
        thread.start()

    def done(
        self,
        name: str,
        seconds: float,
        headline: str = "",
        *,
        ok: bool = True,
        log: Path | None = None,
    ) -> None:
        """A step ended: its line, and for a failure its log's path and last lines."""
        self._stop_ticker()
        lines = [format_step(name, seconds, headline, ok)]
        if not ok:
            lines[0] = format_step(name, seconds, f"log: {log}" if log else "", ok)
            lines += [f"    | {line}" for line in tail(log)]
        self.say("\n".join(lines))

    @contextmanager
    def capture(self, name: str):
        """File descriptors 1 and 2 (what C libraries and every child process started meanwhile
        write), sys.stdout and sys.stderr into ``log_dir/NAME.log`` while the block runs;
        nothing when verbose. Yields the log's path."""
        path = self.log_path(name)
        if self.verbose:
            yield path
            return
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        saved = [os.dup(1), os.dup(2)]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # and the Python streams, which need not write to fds 1 and 2 (a replaced sys.stdout)
            with redirect_stdout(log), redirect_stderr(log):
                yield path
        finally:
            log.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in (fd, *saved):
                os.close(f)
            log.close()

    @contextmanager
    def step(self, name: str):
        """One step: its output to its log, then its line (``Step.headline``); an exception
        prints the failed line with the log's last lines and propagates."""
        step = Step(name)
        self.begin(name)
        try:
            with self.capture(name) as path:
                yield step
        except BaseException:
            self.done(name, step.seconds, ok=False, log=None if self.verbose else path)
            raise
        self.done(name, step.seconds, step.headline)

    def close(self) -> None:
        self._stop_ticker()
        if self._stream is not None and self._stream not in (
            sys.stdout,
            sys.stderr,
            sys.__stdout__,
            sys.__stderr__,
        ):
            self._stream.close()
        self._stream = None

    def _stop_ticker(self) -> None:
        if self._ticker is None:
            return
        thread, stop = self._ticker
        stop.set()
        thread.join(timeout=5)
        self._ticker = None
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self.live and self._stream is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):
        pass
