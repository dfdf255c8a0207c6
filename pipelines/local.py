"""Running kfp components and pipelines on this machine with kfp's local SubprocessRunner, and
:func:`task_logs`: each task's console output in a log file of its own, a callback per step."""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def init_local_runner(pipeline_root: str | os.PathLike) -> Path:
    """Initialise ``kfp.local`` to run tasks as subprocesses of this interpreter.

    Tasks run ``python3`` from PATH, so this interpreter's bin directory goes first; each task
    runs ``pip install kfp==<pinned> --no-deps``, a no-op since the pinned kfp is installed.
    Task scratch (TMPDIR) goes to one short-named directory of its own: short, because Ray
    (started by the fine-tuning task or later in this process) puts UNIX sockets under TMPDIR
    and their paths may not exceed 107 bytes.
    """
    import tempfile

    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(
        tempfile.mkdtemp(prefix="kuberank-kfp-", dir="/tmp" if Path("/tmp").is_dir() else None)
    )
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ["TMPDIR"] = str(scratch)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


# --------------------------------------------------------------------------- task logs

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class StepResult:
    """One finished task of a local run."""

    name: str  # the task's display name (data-prep, finetune, ...)
    seconds: float
    ok: bool
    outputs: dict  # kfp's outputs: artifacts (with metadata) and parameters by name
    log: Path | None  # where its console output went


class _LogWriter(io.TextIOBase):
    """A text stream into a log file (kfp's colour codes dropped), and also into ``echo``
    (verbose runs keep the console)."""

    def __init__(self, path: Path, echo=None):
        self.fh = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
        self.echo = echo

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.fh.write(ANSI.sub("", text))
        if self.echo is not None:
            self.echo.write(text)
        return len(text)

    def flush(self) -> None:
        if not self.fh.closed:
            self.fh.flush()
        if self.echo is not None:
            self.echo.flush()

    def close(self) -> None:
        super().close()
        self.fh.close()


@contextmanager
def _redirected(path: Path | None, echo=None):
    """sys.stdout and sys.stderr into ``path`` (and into ``echo`` too, if given)."""
    if path is None:
        yield
        return
    out = _LogWriter(path, echo)
    try:
        with redirect_stdout(out), redirect_stderr(out):
            yield
    finally:
        out.close()


@contextmanager
def task_logs(
    log_dir: str | os.PathLike | None = None,
    *,
    on_start: Callable[[str], None] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
    tee: bool = False,
):
    """While a local run lasts, what kfp's local runner prints goes to log files instead of the
    console: each task's executor input and output, its own output and kfp's lines about it
    to ``LOG_DIR/<task>.log`` (the task's display name), the run's own lines to
    ``LOG_DIR/pipeline.log``; ``tee`` also keeps everything on the console. ``on_start(name)``
    and ``on_step(StepResult)`` are called around each task (also without ``log_dir``).

    It wraps kfp's ``task_executor.execute_single_task`` (kfp 2.17, pinned), through which both
    of kfp's local orchestrators run every task, one at a time."""
    from kfp.local.orchestrator import task_executor

    original = task_executor.execute_single_task
    echo = sys.stdout if tee else None
    folder = Path(log_dir) if log_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def execute(task_name, task_spec, *args, **kwargs):
        name = task_spec.task_info.name or task_name
        log = folder / f"{name}.log" if folder is not None else None
        if on_start is not None:
            on_start(name)
        started = time.perf_counter()
        outputs, status = {}, None
        try:
            with _redirected(log, echo):
                outputs, status = original(task_name, task_spec, *args, **kwargs)
        finally:
            if on_step is not None:
                ok = getattr(status, "name", "") == "SUCCESS"
                on_step(StepResult(name, time.perf_counter() - started, ok, outputs or {}, log))
        return outputs, status

    task_executor.execute_single_task = execute
    try:
        with _redirected(folder / "pipeline.log" if folder is not None else None, echo):
            yield folder
    finally:
        task_executor.execute_single_task = original


def run_logged(
    run: Callable[[], T],
    log_dir: str | os.PathLike | None = None,
    *,
    on_start: Callable[[str], None] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
    tee: bool = False,
) -> T:
    """``run()`` (a local pipeline run) under :func:`task_logs`; kfp's error for a failed task
    becomes a KuberankError naming the step, its time and its log."""
    from kuberank.errors import KuberankError

    failed: list[StepResult] = []

    def step(result: StepResult) -> None:
        if not result.ok:
            failed.append(result)
        if on_step is not None:
            on_step(result)

    try:
        with task_logs(log_dir, on_start=on_start, on_step=step, tee=tee):
            return run()
    except RuntimeError as exc:
        if not failed:
            raise
        last = failed[-1]
        where = f"; its log: {last.log}" if last.log else ""
        raise KuberankError(
            f"pipeline step {last.name} failed after {last.seconds:.0f} s{where}"
        ) from exc
