"""Progress: tqdm bars on a terminal, a few plain lines in a log (never one per second while
nothing moves), nothing with KUBERANK_PROGRESS=0."""

from __future__ import annotations

import fcntl
import io
import os
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest

from kuberank import progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def make(total, clock, **kwargs):
    out = io.StringIO()
    return progress.LineProgress(
        desc="work", total=total, unit="step", file=out, clock=clock, **kwargs
    ), out


def test_mode_follows_the_terminal_and_the_setting(monkeypatch):
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty, open(os.devnull, "w") as log:
        monkeypatch.delenv("KUBERANK_PROGRESS", raising=False)
        assert progress.mode(tty) == "bars" and progress.mode(log) == "lines"
        monkeypatch.setenv("KUBERANK_PROGRESS", "lines")
        assert progress.mode(tty) == "lines"
        monkeypatch.setenv("KUBERANK_PROGRESS", "bars")
        assert progress.mode(log) == "bars"
        monkeypatch.setenv("KUBERANK_PROGRESS", "0")
        assert progress.mode(tty) == "off" and not progress.enabled()
    os.close(master)


def test_steady_work_writes_one_line_per_tenth():
    clock = Clock()
    bar, out = make(1000, clock)
    for _ in range(1000):  # 125 s of work, 1/8 s a step
        clock.now += 0.125
        bar.update()
    bar.close()
    got = lines(out)
    assert len(got) == 10, got
    assert got[0] == "work: 100/1000 step (10%) in 00:12, ~01:52 left"
    assert got[-1] == "work: 1000/1000 step (100%) in 02:05"


def test_a_stall_writes_nothing_and_slow_work_a_line_per_30_s_at_most():
    clock = Clock()
    bar, out = make(1000, clock)
    bar.update(5)
    for _ in range(300):  # five minutes without progress, refreshed every second (finetune)
        clock.now += 1.0
        bar.n = 5
        bar.refresh()
    # one line, 30 s in, for the 5 steps done before the stall; none while nothing moved
    assert lines(out) == ["work: 5/1000 step (0%) in 00:30, ~1:39:30 left"]
    for _ in range(20):  # then a step every 10 s: a line every 30 s (3 steps), no more
        clock.now += 10.0
        bar.update()
    assert [line.split(" step")[0] for line in lines(out)[1:]] == [
        f"work: {n}/1000" for n in (6, 9, 12, 15, 18, 21, 24)
    ]
    bar.close()
    assert lines(out)[-1] == "work: 25/1000 step (2%) in 08:20"  # the end, without an ETA


def test_fast_and_unsized_work():
    clock = Clock()
    fast, out = make(27, clock)
    for _ in range(27):  # 27 batches in 1.7 s: nothing (a terminal's bar would be gone too)
        clock.now += 0.0625
        fast.update()
    fast.close()
    assert lines(out) == []
    slower, out = make(27, clock)
    for _ in range(27):  # 27 batches in 2.5 s: a line at 2 s, the closing line
        clock.now += 0.09375
        slower.update()
    slower.set_postfix_str("int8")
    slower.close()
    slower.close()
    assert lines(out) == [
        "work: 22/27 step (81%) in 00:02, ~00:00 left",
        "work: 27/27 step (100%) in 00:02 [int8]",
    ]
    out = io.StringIO()
    for _ in progress.LineProgress(range(40), desc="encode", unit="batch", file=out, clock=clock):
        clock.now += 0.125  # 5 s: lines 2 s apart (each more than a tenth), the closing line
    assert lines(out) == [
        "encode: 16/40 batch (40%) in 00:02, ~00:03 left",
        "encode: 32/40 batch (80%) in 00:04, ~00:01 left",
        "encode: 40/40 batch (100%) in 00:05",
    ]
    unsized, out = make(None, clock)
    for _ in range(100):
        clock.now += 1.0
        unsized.update()
    unsized.close()
    assert lines(out) == [
        "work: 30 step in 00:30",
        "work: 60 step in 01:00",
        "work: 90 step in 01:30",
        "work: 100 step in 01:40",
    ]


CHILD = textwrap.dedent(
    """
    import time
    from kuberank.progress import bar
    for _ in bar(range(40), desc="encode", unit="batch"):
        time.sleep(0.06)  # 2.4 s: work under 2 s writes nothing to a log
    """
)


def _child(stderr, env_progress: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "KUBERANK_PROGRESS"}
    if env_progress is not None:
        env["KUBERANK_PROGRESS"] = env_progress
    return subprocess.Popen(
        [sys.executable, "-c", CHILD], stderr=stderr, stdout=subprocess.DEVNULL, env=env
    )


def test_a_process_logging_to_a_file_writes_lines_and_a_terminal_gets_a_bar(tmp_path):
    log = tmp_path / "task.log"
    with open(log, "w") as fh:
        assert _child(fh, None).wait(timeout=60) == 0
    text = log.read_text()
    assert "\r" not in text and 1 <= len(text.splitlines()) <= 2, text  # a line at 2 s, the end
    assert text.splitlines()[-1].startswith("encode: 40/40 batch (100%) in 00:0")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0x0 draws nothing
    drawn = b""
    try:
        child = _child(slave, None)
        os.close(slave)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # read while it draws (a full pty blocks the writer)
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                drawn += chunk
            elif child.poll() is not None:
                break
        assert child.wait(timeout=10) == 0
    finally:
        os.close(master)
    text = drawn.decode(errors="replace")
    assert "\r" in text and "encode" in text and "|" in text  # tqdm, redrawn in place
    with open(log, "w") as fh:
        assert _child(fh, "0").wait(timeout=60) == 0
    assert log.read_text() == ""


@pytest.mark.parametrize("broken", [ValueError, OSError])
def test_a_closed_log_does_not_end_the_work(broken):
    class Closed(io.StringIO):
        def write(self, s):
            raise broken("closed")

    clock = Clock()
    bar = progress.LineProgress(desc="x", total=2, file=Closed(), clock=clock)
    clock.now += 5
    bar.update(2)
    bar.close()
    assert bar.closed
