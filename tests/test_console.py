"""Quiet consoles for long runs: one line per step on the terminal, everything else in log files
(kuberank.console), kfp's local runner writing one log per task (pipelines/local.py), and the
headline number of every pipeline step (pipelines/local.py)."""

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from kfp import dsl

from kuberank.console import StepConsole, format_step
from kuberank.errors import KuberankError
from kuberank.pipelines import local
from kuberank.pipelines import pipeline as pl
from kuberank.pipelines.local import init_local_runner, run_logged

# --------------------------------------------------------------------------- the console


def test_a_step_writes_one_line_and_its_output_goes_to_its_log(tmp_path, capfd):
    lines: list[str] = []
    console = StepConsole(tmp_path / "logs", echo=lines.append)
    with console.step("evaluate") as step:
        print("python print")
        sys.stderr.write("a warning\n")
        os.write(2, b"straight to fd 2\n")  # what C libraries and Ray write
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        step.headline = "test nDCG@10 0.0984"
    console.say("a table line")
    out, err = capfd.readouterr()
    assert out == err == ""  # nothing reached the terminal
    log = (tmp_path / "logs" / "evaluate.log").read_text()
    for text in ("python print", "a warning", "straight to fd 2", "a child process"):
        assert text in log
    assert len(lines) == 2 and lines[1] == "a table line"
    name, seconds, unit, *headline = lines[0].split()
    assert name == "evaluate" and float(seconds) >= 0 and unit == "s"
    assert " ".join(headline) == "test nDCG@10 0.0984"
    print("after the step")  # the descriptors are back
    assert capfd.readouterr().out == "after the step\n"


def test_a_failed_step_shows_its_log_tail_and_raises(tmp_path, capfd):
    lines: list[str] = []
    console = StepConsole(tmp_path, echo=lines.append)
    with pytest.raises(ValueError, match="bad input"), console.step("index"):
        for i in range(30):
            print(f"detail {i}")
        raise ValueError("bad input")
    assert capfd.readouterr().out == ""
    text = "\n".join(lines)
    assert "index" in lines[0] and "FAILED" in lines[0] and str(tmp_path / "index.log") in text
    assert "    | detail 29" in text and "detail 9" not in text  # the last 20 lines


def test_verbose_keeps_the_output_on_the_console(tmp_path, capfd):
    lines: list[str] = []
    console = StepConsole(tmp_path, verbose=True, echo=lines.append)
    with console.step("export") as step:
        print("visible")
        step.headline = "done"
    assert "visible" in capfd.readouterr().out
    assert lines == [format_step("export", float(lines[0].split()[1]), "done")]


def test_on_a_terminal_the_running_step_shows_its_time(tmp_path, monkeypatch):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    tty = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", tty)
    console = StepConsole(tmp_path)
    try:
        assert console.live
        with console.step("finetune") as step:
            print("to the log")
            time.sleep(2.3)
            step.headline = "validation nDCG@10 0.1188"
        console.close()
        tty.flush()
        drawn = b""
        while select.select([master], [], [], 0.2)[0]:
            drawn += os.read(master, 65536)
    finally:
        monkeypatch.undo()
        tty.close()
        os.close(master)
    text = drawn.decode()
    assert "\r\x1b[K  finetune" in text and "s  ..." in text  # the transient line, updated
    assert text.rstrip().endswith("s  validation nDCG@10 0.1188")
    assert "to the log" not in text and "to the log" in (tmp_path / "finetune.log").read_text()


# --------------------------------------------------------------------------- kfp task logs


@dsl.component(base_image="python:3.11")
def shout(word: str, note: dsl.Output[dsl.Artifact]) -> int:
    import sys

    print(f"task output: {word}")
    print("task warning", file=sys.stderr)
    with open(note.path, "w") as fh:
        fh.write(word)
    note.metadata["letters"] = len(word)
    if word == "boom":
        raise RuntimeError("the task failed on purpose")
    return len(word)


def _toy(words: tuple[str, ...]):
    @dsl.pipeline(name="toy")
    def toy():
        previous = None
        for i, word in enumerate(words):
            task = shout(word=word).set_display_name(f"step-{i}")
            if previous is not None:
                task.after(previous)
            previous = task

    return toy


@pytest.fixture
def local_root(tmp_path):
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "PATH")}
    root = init_local_runner(tmp_path / "root")
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_the_task_scratch_goes_when_the_process_exits(tmp_path):
    code = (
        "import os, pathlib, tempfile\n"
        "from kuberank.pipelines.local import init_local_runner\n"
        f"init_local_runner({str(tmp_path / 'root')!r})\n"
        "pathlib.Path(tempfile.mkdtemp(dir=os.environ['TMPDIR']), 'f').write_text('x')\n"
        "print(os.environ['TMPDIR'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    scratch = Path(done.stdout.strip())
    assert scratch.name.startswith("kuberank-kfp-") and not scratch.exists()


def test_kfp_local_runner_writes_one_log_per_task_and_reports_each_step(
    local_root, tmp_path, capfd
):
    started, steps = [], []
    logs = tmp_path / "logs"
    run_logged(_toy(("alpha", "beta")), logs, on_start=started.append, on_step=steps.append)
    out, err = capfd.readouterr()
    assert "executor_input" not in out + err and "task output" not in out + err
    assert started == ["step-0", "step-1"] and [s.name for s in steps] == started
    for step, word in zip(steps, ("alpha", "beta"), strict=True):
        assert step.ok and step.seconds > 0 and step.log == logs / f"{step.name}.log"
        assert step.outputs["Output"] == len(word)
        assert step.outputs["note"].metadata["letters"] == len(word)
        log = step.log.read_text()
        assert "executor_input" in log and f"task output: {word}" in log
        assert "task warning" in log and "\x1b[" not in log  # kfp's colours dropped
    assert "Running pipeline" in (logs / "pipeline.log").read_text()


def test_a_failed_task_names_its_step_and_log(local_root, tmp_path, capfd):
    steps = []
    with pytest.raises(KuberankError, match=r"pipeline step step-1 failed after \d+ s; its log"):
        run_logged(_toy(("fine", "boom", "never")), tmp_path / "logs", on_step=steps.append)
    assert [(s.name, s.ok) for s in steps] == [("step-0", True), ("step-1", False)]
    assert "the task failed on purpose" in steps[1].log.read_text()
    out, err = capfd.readouterr()
    assert "the task failed on purpose" not in out + err


def test_without_a_log_dir_kfp_prints_as_before(local_root, capfd):
    steps = []
    run_logged(_toy(("gamma",)), None, on_step=steps.append)
    out, _ = capfd.readouterr()
    assert "task output: gamma" in out and steps[0].ok and steps[0].log is None


# --------------------------------------------------------------------------- headlines


def _artifact(cls, path: Path, metadata: dict, content: str = "") -> dsl.Artifact:
    path.write_text(content)
    return cls(name=path.name, uri=str(path), metadata=metadata)


def test_every_step_has_its_headline_number(tmp_path):
    index_meta = {"count": 1682, "dim": 384, "ann": None, "edge_items": 1682}
    rows = [
        {"model": "popularity", "ndcg@10": 0.0253, "split": "test"},
        {"model": "ease", "ndcg@10": 0.0406, "split": "test"},
        {"model": "fine-tuned", "ndcg@10": 0.0984, "split": "test"},
    ]
    outputs = {
        pl.PREP: {
            "prepared": _artifact(
                dsl.Dataset,
                tmp_path / "p",
                {"kind": "recommendation", "rows": {"items": 1682.0, "interactions": 100000.0}},
            )
        },
        pl.FINETUNE: {
            "model": _artifact(dsl.Model, tmp_path / "m", {"val_ndcg@10": 0.11879, "kind": "x"})
        },
        pl.EVALUATE: {
            "Output": 0.0984,
            "report": _artifact(dsl.Markdown, tmp_path / "r", {"rows": rows}),
        },
        pl.COMPRESS: {
            "compressed": _artifact(
                dsl.Model,
                tmp_path / "c",
                {
                    "layers": [2.0, 5.0],
                    "prune_ratio": 0.5,
                    "compressed_ndcg10": 0.11325,
                    "teacher_ndcg10": 0.11879,
                    "split": "validation",
                },
            )
        },
        pl.EXPORT: {
            "Output": "sha256:77d3d18b3f68065803608033",
            "parity": _artifact(
                dsl.Metrics, tmp_path / "x", {"int8.cosine_min": 0.99719, "bytes.edge": 17711443}
            ),
        },
        pl.INDEX: {
            "index": _artifact(
                dsl.Artifact, tmp_path / "i", {"count": 1682.0}, json.dumps(index_meta)
            )
        },
        pl.PUBLISH: {
            "release": _artifact(dsl.Artifact, tmp_path / "l", {"version": 3.0, "store": "s/"})
        },
    }
    got = {step: local.step_headline(step, out) for step, out in outputs.items()}
    assert got == {
        pl.PREP: "1682 items, 100000 interactions (recommendation)",
        pl.FINETUNE: "validation nDCG@10 0.1188",
        pl.EVALUATE: "test nDCG@10 0.0984 (best baseline: ease 0.0406)",
        pl.COMPRESS: "level 2x0.5 (layers [2, 5]): nDCG@10 0.1133 vs teacher 0.1188 on validation",
        pl.EXPORT: "embedding sha256:77d3d18b3f68…, int8 cosine >= 0.9972, edge bundle 18 MB",
        pl.INDEX: "1682 items x 384, exact search; edge bundle 1682 items",
        pl.PUBLISH: "release 3 -> s/",
    }
    kept = {"compressed": False, "teacher_ndcg10": 0.8899, "split": "validation"}
    kept_out = {"compressed": _artifact(dsl.Model, tmp_path / "k", kept)}
    assert local.step_headline(pl.COMPRESS, kept_out) == (
        "no level within the gate on validation (teacher nDCG@10 0.8899): the teacher goes on "
        "uncompressed"
    )
    assert local.step_headline(pl.INDEX, {}) == ""  # an unexpected output never fails a run


def test_tee_keeps_the_console_and_writes_the_logs(local_root, tmp_path, capfd):
    steps = []
    run_logged(_toy(("delta",)), tmp_path / "logs", on_step=steps.append, tee=True)
    out, _ = capfd.readouterr()
    assert "task output: delta" in out and "executor_input" in out  # --verbose
    assert "task output: delta" in steps[0].log.read_text()
