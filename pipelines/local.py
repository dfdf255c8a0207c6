"""Running kfp components and pipelines on this machine with kfp's local SubprocessRunner,
:func:`task_logs` (each task's console output in a log file of its own, a callback per step),
and the whole pipeline run locally (:func:`run_local`) with a headline per finished step
(:func:`step_headline`)."""

from __future__ import annotations

import atexit
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kfp import local
from kfp.local.orchestrator import task_executor

from kuberank.errors import KuberankError
from kuberank.pipelines.pipeline import (
    CANARY,
    COMPRESS,
    EVALUATE,
    EXPORT,
    FINETUNE,
    INDEX,
    PREP,
    PUBLISH,
    TENSORRT,
    build_pipeline,
)

T = TypeVar("T")


def init_local_runner(pipeline_root: str | os.PathLike) -> Path:
    """Initialise ``kfp.local`` to run tasks as subprocesses of this interpreter.

    Tasks run ``python3`` from PATH, so this interpreter's bin directory goes first; each task
    runs ``pip install kfp==<pinned> --no-deps``, a no-op since the pinned kfp is installed.
    Task scratch (TMPDIR) goes to one short-named directory of its own: short, because Ray
    (started by the fine-tuning task or later in this process) puts UNIX sockets under TMPDIR
    and their paths may not exceed 107 bytes. It is removed when this process exits (after Ray,
    which registers its own shutdown later).
    """
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(
        tempfile.mkdtemp(prefix="kuberank-kfp-", dir="/tmp" if Path("/tmp").is_dir() else None)
    )
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ["TMPDIR"] = str(scratch)
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
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


# --------------------------------------------------------------------------- the pipeline, locally


def run_local(
    pipeline_root,
    *,
    log_dir=None,
    on_start=None,
    on_step=None,
    tee: bool = False,
    **params,
) -> dict:
    """Run the whole pipeline on this machine (kfp SubprocessRunner; artifacts under
    ``pipeline_root``, the model store at ``pipeline_root/store`` unless ``model_store`` is
    given). ``params`` are pipeline parameters. With ``log_dir`` what kfp prints goes to a log
    file per task there (:func:`kuberank.pipelines.local.task_logs`; ``tee`` keeps it on the
    console too); ``on_start(name)`` and ``on_step(StepResult)`` follow the steps. A failed
    step raises KuberankError naming the step and its log. Returns the output artifacts' paths,
    the model store, the fine-tuned model's metrics and the release record."""
    root = init_local_runner(pipeline_root)
    params.setdefault("model_store", str(root / "store"))
    started = time.perf_counter()
    task = run_logged(
        lambda: build_pipeline("local")(**params),
        log_dir,
        on_start=on_start,
        on_step=on_step,
        tee=tee,
    )
    out = {
        name: task.outputs[name]
        for name in ("prepared", "model", "scores", "quality_report", "release", "release_report")
    }
    release = json.loads(Path(out["release"].path).read_text())
    return {
        "pipeline_root": str(root),
        "model_store": params["model_store"],
        **{f"{name}_path": artifact.path for name, artifact in out.items()},
        "metrics": {k: v for k, v in out["scores"].metadata.items() if isinstance(v, (int, float))},
        "quality_rows": out["quality_report"].metadata.get("rows", []),
        "release": release,
        "seconds": round(time.perf_counter() - started, 1),
    }


def step_headline(step: str, outputs: dict) -> str:
    """The number that matters of a finished step, from its kfp outputs (artifacts with
    metadata, parameters): what the demo and ``kuberank pipeline run --local`` print per step.
    Never raises: an unexpected output gives ``""``."""
    try:
        return _headline(step, outputs)
    except Exception:  # a summary line must not fail a run
        return ""


def _whole(value):
    """kfp hands metadata numbers back as floats: 1.0 -> 1."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _headline(step: str, outputs: dict) -> str:
    def meta(name: str) -> dict:
        return dict(getattr(outputs.get(name), "metadata", None) or {})

    if step == PREP:
        m = meta("prepared")
        rows = ", ".join(f"{int(v)} {k}" for k, v in (m.get("rows") or {}).items())
        return f"{rows} ({m.get('kind')})"
    if step == FINETUNE:
        m = meta("model")
        scores = [f"{k[4:]} {v:.4f}" for k, v in m.items() if k.startswith("val_ndcg")]
        return f"validation {scores[0].replace('ndcg', 'nDCG')}" if scores else str(m.get("kind"))
    if step == EVALUATE:
        rows = meta("report").get("rows") or []
        tuned = next((r for r in rows if r.get("model") == "fine-tuned"), None)
        value = tuned["ndcg@10"] if tuned else float(outputs["Output"])
        text = f"{tuned['split'] if tuned else 'eval'} nDCG@10 {value:.4f}"
        baselines = [r for r in rows if r is not tuned]
        if baselines:
            best = max(baselines, key=lambda r: r["ndcg@10"])
            text += f" (best baseline: {best['model']} {best['ndcg@10']:.4f})"
        return text
    if step == COMPRESS:
        m = meta("compressed")
        if m.get("compressed") is False:  # no level passed: the teacher went on unchanged
            return (
                f"no level within the gate on {m['split']} (teacher nDCG@10 "
                f"{m['teacher_ndcg10']:.4f}): the teacher goes on uncompressed"
            )
        return (
            f"level {len(m['layers'])}x{float(m['prune_ratio']):g} (layers "
            f"{[int(x) for x in m['layers']]}): nDCG@10 {m['compressed_ndcg10']:.4f} vs teacher "
            f"{m['teacher_ndcg10']:.4f} on {m['split']}"
        )
    if step == EXPORT:
        m = meta("parity")
        text = f"embedding {str(outputs.get('Output', ''))[:19]}…"
        if "int8.cosine_min" in m:
            text += f", int8 cosine >= {m['int8.cosine_min']:.4f}"
        if "bytes.edge" in m:
            text += f", edge bundle {m['bytes.edge'] / 1e6:.0f} MB"
        return text
    if step == INDEX:
        artifact = outputs.get("index")
        m = {**json.loads(open(artifact.path).read()), **meta("index")}
        search = "ANN (HNSW)" if m.get("ann") else "exact search"
        edge = m.get("edge_items")
        text = f"{int(m['count'])} items x {int(m['dim'])}, {search}"
        if "edge_items" in m:
            text += "; no edge bundle" if edge is None else f"; edge bundle {int(edge)} items"
        return text
    if step == PUBLISH:
        m = meta("release")
        return f"release {_whole(m.get('version'))} -> {m.get('store')}"
    if step == TENSORRT:
        return "TensorRT plan built"
    if step == CANARY:
        m = meta("values")
        return f"canary weight {_whole(m.get('weight'))}% for release {_whole(m.get('version'))}"
    return ""
