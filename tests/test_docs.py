"""README's commands, run as written, so README and reality cannot drift.

Every command in README's ``bash`` blocks is either in RUN (run here, in README's order, in a
fresh directory, so its relative paths - ``store/``, ``models/ml``, ``runs/...``,
``beir:path/to/cisi`` - are the test's own) or in NOT_RUN with the reason; a new README
command fails :func:`test_every_readme_command_is_run_or_listed` until it is one or the other.
Every ``kuberank`` command also goes through the real argument parser at once (fast).

The slow test builds a small store with README's own commands: ``data prep``, the baselines
and ``bm25`` on MovieLens-100K and a BEIR collection written at ``path/to/cisi``; ``train``,
``evaluate``, ``compress`` and ``index`` on a 72-interaction log instead of MovieLens-100K
(training on it would take minutes), ``compress`` with its gate opened (a model trained for
seconds has no quality to keep); then ``export``, ``index``, ``edge query``, ``serve`` (on a
free port; README's Python client example runs against it), ``bench``, ``pipeline compile``,
``pipeline run --local`` (with parameters for the small log) and ``plan``.
"""

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import interaction_rows, write_beir, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# README commands, in the order the slow test runs them (each must be in README as written)
DATA_PREP = "kuberank data prep --dataset movielens-100k --out runs/ml100k"
EVAL_BASELINE = "kuberank evaluate --dataset movielens-100k --model popularity --json"
EVAL_BM25 = "kuberank evaluate --dataset beir:path/to/cisi --model bm25 --split all --json"
EVAL_HYBRID = (
    "kuberank evaluate --dataset beir:path/to/cisi --model zero-shot --retrieval hybrid --json"
)
TRAIN = "kuberank train --dataset movielens-100k --out models/ml --workers 2"
EVAL_MODEL = "kuberank evaluate --dataset movielens-100k --model models/ml --split test --json"
COMPRESS = "kuberank compress --model models/ml --dataset movielens-100k --out models/ml-small"
EXPORT = "kuberank export --model models/ml-small --out store/"
INDEX = "kuberank index --model models/ml-small --dataset movielens-100k --out store/"
EDGE = "kuberank edge query --bundle store/edge --text 'space opera' --k 5 --json"
SERVE = "kuberank serve --model-store store/ --port 8000"
BENCH = "kuberank bench --model-store store/ --concurrency 1,8,16,32 --out runs/bench"
COMPILE = "kuberank pipeline compile --out kuberank-pipeline.yaml"
PIPELINE = "kuberank pipeline run --local"
PLAN = "kuberank plan --qps 5000 --items 10000000"
RUN = [
    DATA_PREP,
    EVAL_BASELINE,
    EVAL_BM25,
    EVAL_HYBRID,
    TRAIN,
    EVAL_MODEL,
    COMPRESS,
    EXPORT,
    INDEX,
    EDGE,
    SERVE,
    BENCH,
    COMPILE,
    PIPELINE,
    PLAN,
]
NOT_RUN = {
    "make demo": "the demo itself (minutes of both cores); its pipeline runs here as "
    "`kuberank pipeline run --local` on a small log, its serving as `kuberank serve`",
    "make test": "the test suite, this test among it",
    "kuberank evaluate --dataset movielens-100k --model sasrec --split test --json": "trains "
    "RecBole's SASRec on MovieLens-100K until validation stops improving (hours on 2 cores); "
    "tests/test_peers.py runs this command with --max-epochs 1",
    "kuberank pipeline submit --host https://kfp.example.com": "needs a Kubeflow Pipelines "
    "endpoint (tests/test_pipeline.py submits to a loopback stand-in of its API)",
}
# commands whose model was trained on the small log read that log instead of MovieLens-100K
ON_SMALL_LOG = {TRAIN, EVAL_MODEL, COMPRESS, INDEX}
EXTRA_ARGS = {
    COMPRESS: ["--max-ndcg-drop", "1"],  # the gate opened: the model has no quality to keep
}
README_URL = "http://127.0.0.1:8000"


def readme_blocks(language: str) -> list[str]:
    text = README.read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def split_comment(line: str) -> tuple[str, str]:
    """(the command, its trailing comment): the first ``#`` outside quotes that starts a word."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :].strip()
    return line, ""


def readme_commands() -> dict[str, str]:
    """Each command line of README's bash blocks (quoting normalised) and its comment."""
    commands = {}
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            command, comment = split_comment(line)
            if command.strip():
                commands[shlex.join(shlex.split(command))] = comment
    return commands


def test_every_readme_command_is_run_or_listed():
    from kuberank.cli import build_parser

    found = readme_commands()
    listed = [shlex.join(shlex.split(c)) for c in RUN] + list(NOT_RUN)
    assert sorted(found) == sorted(listed), (
        "README's commands and this test's lists differ: "
        f"only in README {sorted(set(found) - set(listed))}, "
        f"only here {sorted(set(listed) - set(found))}"
    )
    parser = build_parser()
    for command in found:
        argv = shlex.split(command)
        if argv[0] == "kuberank":
            parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown flag or choice
    assert "also: ease, zero-shot" in found[EVAL_BASELINE]
    (example,) = [b for b in readme_blocks("python") if "kuberank.client" in b]
    assert README_URL in example and f"--port {README_URL.rsplit(':', 1)[1]}" in SERVE


def _env() -> dict:
    return {**os.environ, "KUBERANK_PROGRESS": "0", "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}


def _argv(command: str, small_log: str) -> list[str]:
    argv = shlex.split(command)
    if command in ON_SMALL_LOG:
        argv = [small_log if a == "movielens-100k" else a for a in argv]
    return [sys.executable, "-m", "kuberank.cli", *argv[1:], *EXTRA_ARGS.get(command, [])]


def _run(
    command: str, cwd: Path, small_log: str, extra=(), timeout=600
) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(
        [*_argv(command, small_log), *extra],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.monotonic() - started
    print(f"{seconds:6.1f} s  {command}")
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


def _serve_and_run_the_client_example(cwd: Path, small_log: str) -> str:
    """README's `kuberank serve` on a free port, README's client example against it, then
    SIGTERM (the way Ctrl-C stops it)."""
    from kuberank.serving.triton import free_port

    port = free_port()
    argv = [a if a != "8000" else str(port) for a in _argv(SERVE, small_log)]
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        ready, deadline = None, time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("{"):
                ready = json.loads(line)
                break
        assert ready and ready["url"] == f"http://127.0.0.1:{port}", f"serve: {ready}"
        (example,) = [b for b in readme_blocks("python") if "kuberank.client" in b]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(example.replace(README_URL, ready["url"]), "README.md", "exec"), {})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        return printed.getvalue()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_readme_commands_run_against_a_small_store(tmp_path):
    work = tmp_path / "readme"
    work.mkdir()
    write_beir(work / "path" / "to" / "cisi")
    small_log = f"interactions:{write_jsonl(tmp_path / 'log.jsonl', interaction_rows(12, 6))}"

    def run(command: str, **kwargs) -> str:
        return _run(command, work, small_log, **kwargs).stdout

    run(DATA_PREP)
    assert json.loads((work / "runs/ml100k/manifest.json").read_text())["rows"]["items"] == 1682
    assert json.loads(run(EVAL_BASELINE))["queries"] == 943
    also = readme_commands()[EVAL_BASELINE].split("also:", 1)[1]
    for model in (m.strip() for m in also.split(",")):  # the comment's other baselines
        command = EVAL_BASELINE.replace("popularity", model)
        assert json.loads(run(command))["model"] == model
    assert json.loads(run(EVAL_BM25))["ndcg@10"] > 0.5
    hybrid = json.loads(run(EVAL_HYBRID))  # six queries, no validation split: RRF, said so
    assert hybrid["model"] == "zero-shot+bm25" and hybrid["fusion"]["method"] == "rrf"

    run(TRAIN)
    assert (work / "models/ml/kuberank.json").is_file()
    assert 0.0 <= json.loads(run(EVAL_MODEL))["ndcg@10"] <= 1.0
    run(COMPRESS)
    run(EXPORT)
    assert json.loads((work / "store/manifest.json").read_text())["edge"]["path"] == "edge"
    run(INDEX)
    found = json.loads(run(EDGE))["results"]  # a complete store: the edge bundle has items
    assert len(found) == 5 and all(r["item_id"] for r in found)

    printed = _serve_and_run_the_client_example(work, small_log).splitlines()
    assert len(printed) == 5 + 1 + 1, printed  # 5 items, the recommendation, the 422
    assert printed[5].startswith("model 1: [")
    assert printed[6].startswith("422 ") and printed[6].endswith(" k")  # the field named

    run(BENCH)
    bench = json.loads((work / "runs/bench/bench.json").read_text())
    assert {"kuberank-triton", "kuberank-onnx"} <= set(bench["results"])
    run(COMPILE)
    assert (work / "kuberank-pipeline.yaml").is_file()
    params = {
        "dataset_spec": small_log,
        "workers": 1,
        "epochs": 1,
        "max_minutes": 0,
        "compress_model": "false",
        "baselines": "popularity",
    }
    extra = [x for k, v in params.items() for x in ("--param", f"{k}={v}")]
    done = _run(PIPELINE, work, small_log, extra=extra)
    assert "runs/pipeline/store (version 1)" in done.stdout
    steps = [line.split()[0] for line in done.stderr.splitlines() if line.startswith("  ")]
    assert steps[-1] == "publish" and {"data-prep", "finetune", "index"} <= set(steps)
    assert "executor_input" not in done.stderr  # kfp's payloads are in the step logs
    assert "executor_input" in (work / "runs/pipeline/logs/index.log").read_text()
    assert json.loads((work / "runs/pipeline/store/edge/bundle.json").read_text())["items"] == 8
    assert "Ray Serve ranking replicas" in run(PLAN)
