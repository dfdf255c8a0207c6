"""Ends what ``kuberank serve`` started when serve dies without stopping it (SIGKILL, OOM kill).

The kernel's parent-death signal already ends tritonserver (serving/triton.py) and Ray's own
daemons (Ray starts them with one), but not their children: a SIGKILLed serve left Ray's
dashboard and runtime-env agents running for about a minute (they try to report the raylet's
death to the GCS, which died with it, for 60 s). :class:`Watchdog` is a small process that holds
the read end of a pipe from the launcher, which writes it the processes it starts
(``PID STARTTIME`` lines). When the pipe closes without ``stop`` (the launcher died), every
listed process still running (same pid and start time: never a reused pid) gets SIGTERM and,
after a grace period, SIGKILL; then the directories it was handed (``dir PATH`` lines: the
HAProxy front's configuration and admin socket, tritonserver's working directory, an S3
store's downloaded Triton repository) are removed. A clean stop writes ``stop`` and nothing is killed or removed.

    python -m kuberank.serving.watchdog      # stdin: the pipe; started by Watchdog()

Linux only (it reads /proc); elsewhere :class:`Watchdog` does nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

GRACE_S = 5.0  # SIGTERM -> SIGKILL
STOP = "stop"
DIR = "dir "  # a line "dir PATH": a directory to remove after the processes ended


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time in clock ticks since boot, state) of every process."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name (2nd field) is in parentheses and may hold spaces
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        table[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return table


def descendants(pid: int, table: dict | None = None) -> dict[int, str]:
    """pid -> start time of every live (not zombie) descendant of ``pid``."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for child, (ppid, _, state) in table.items():
        if state != "Z":
            children.setdefault(ppid, []).append(child)
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                frontier.append(child)
    return found


def alive(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` (pid -> start time) still running: not gone, not a zombie, and
    not another process that got the same pid."""
    table = process_table()
    return {
        pid: started
        for pid, started in processes.items()
        if pid in table and table[pid][1] == started and table[pid][2] != "Z"
    }


def _signal(processes, sig: int) -> None:
    for pid in processes:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end(processes: dict[int, str], grace: float = GRACE_S) -> None:
    """SIGTERM to those still running, SIGKILL to those left after ``grace`` seconds."""
    _signal(alive(processes), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(alive(processes), signal.SIGKILL)


def main() -> int:
    # the launcher's terminal and process group are not ours (start_new_session): only the
    # pipe tells us when to act
    guarded: dict[int, str] = {}
    directories: list[str] = []
    for line in sys.stdin:
        if line.startswith(DIR):
            directories.append(line[len(DIR) :].rstrip("\n"))
            continue
        words = line.split()
        if words == [STOP]:
            return 0
        if len(words) == 2 and words[0].isdigit():
            guarded[int(words[0])] = words[1]
    end(guarded)
    for directory in directories:  # after the processes that used them have ended
        shutil.rmtree(directory, ignore_errors=True)
    return 0


class Watchdog:
    """The launcher's side: ``guard_new()`` hands the watchdog every descendant of this process
    started since the watchdog was made, ``guard_dir(path)`` a directory of this run to
    remove; ``release()`` after a clean stop."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self._known: set[int] = set()
        if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
            return
        self._known = set(descendants(os.getpid()))  # not ours to end (an earlier server)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kuberank.serving.watchdog"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
        self._known.add(self.process.pid)

    def guard_new(self) -> dict[int, str]:
        """Tell the watchdog about this process's descendants that it does not know yet."""
        if self.process is None:
            return {}
        new = {p: t for p, t in descendants(os.getpid()).items() if p not in self._known}
        if new and self._tell("".join(f"{p} {t}\n" for p, t in new.items())):
            self._known.update(new)
            return new
        return {}

    def guard_dir(self, path: str | os.PathLike) -> None:
        """Have the watchdog remove ``path`` (a temporary directory of this run) if this
        process dies without :meth:`release`."""
        path = os.path.abspath(path)
        if "\n" in path:
            raise ValueError(f"watchdog: a directory name with a newline: {path!r}")
        if self.process is not None:
            self._tell(f"{DIR}{path}\n")

    def _tell(self, lines: str) -> bool:
        try:
            self.process.stdin.write(lines)
            self.process.stdin.flush()
            return True
        except (OSError, ValueError):  # the watchdog died: nothing to tell
            return False

    def release(self) -> None:
        """Everything was stopped cleanly: the watchdog exits without ending anything."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.write(STOP + "\n")
            process.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
