"""The embedded demo: the whole kuberank pipeline on MovieLens-100K on one machine.

``make demo`` runs ``kuberank demo``: the Kubeflow pipeline on kfp's local runner (prepare,
fine-tune F(Q,B,I) on Ray Train within a time budget, evaluate against the baselines, compress
behind the quality gate, export to ONNX and Triton repositories, index, publish), then serves
the model store on 127.0.0.1 and benchmarks it, and writes one report,
``runs/<timestamp>/report.md``, with the quality, compression and latency tables and plots.

The console shows one line per step (name, seconds, its headline number), the tables and the
report's path; each step's own output (kfp's executor payloads, the tasks' logs, Ray, Triton)
is in ``runs/<timestamp>/logs/<step>.log`` (:mod:`kuberank.console`). ``kuberank demo
--verbose`` shows it on the console as well.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

from kuberank import datasets, report
from kuberank.components.compress import format_levels
from kuberank.components.evaluate import evaluate
from kuberank.console import StepConsole
from kuberank.encoder import TextEncoder
from kuberank.onnx_encoder import OnnxEncoder
from kuberank.perf import encoder_throughput
from kuberank.serving.bench import format_table, serve_and_bench
from kuberank.store import INT8_FILE, MODEL_DIR, ONNX_DIR, store_path

DEMO_DATASET = "movielens-100k"
DEMO_BASELINES = ("popularity", "ease", "zero-shot")
TRAIN_BUDGET_MINUTES = 4.0


def run_demo(
    out_root: str = "runs",
    split: str = "test",
    echo=None,
    pipeline: bool = True,
    serve: bool = True,
    verbose: bool = False,
) -> Path:
    """``pipeline=False`` only evaluates the baselines (seconds; what the unit test runs).

    The console gets one line per step (name, seconds, headline number), the tables and a
    closing summary; each step's own output (kfp's executor payloads, the tasks' logs, Ray and
    Triton) goes to ``RUN/logs/<step>.log``. ``verbose`` keeps that output on the console too.
    ``echo`` takes the console lines instead of standard output."""
    started = time.perf_counter()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out_root) / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    console = StepConsole(logs, verbose=verbose, echo=echo)
    try:
        return _run(console, run_dir, stamp, split, pipeline, serve, started)
    finally:
        console.close()


def _run(console, run_dir: Path, stamp: str, split: str, pipeline: bool, serve: bool, started):
    say = console.say
    logs = console.log_dir
    say(f"kuberank demo: {DEMO_DATASET} on this machine; run {run_dir}, step logs in {logs}/")
    sections: list[str] = []
    store = None
    if pipeline:
        from kuberank.pipelines.local import run_local, step_headline  # local: loads kfp

        say(
            f"[1/3] the kuberank pipeline on kfp's local runner: prepare -> fine-tune (Ray Train, "
            f"2 workers, <= {TRAIN_BUDGET_MINUTES:g} min) -> evaluate -> compress -> export -> "
            "index -> publish"
        )

        def on_step(result) -> None:
            console.done(
                result.name,
                result.seconds,
                step_headline(result.name, result.outputs),
                ok=result.ok,
                log=result.log,
            )

        with console.capture("pipeline"):
            outputs = run_local(
                run_dir / "pipeline",
                log_dir=logs,
                on_start=console.begin,
                on_step=on_step,
                tee=console.verbose,
                dataset_spec=DEMO_DATASET,
                max_minutes=TRAIN_BUDGET_MINUTES,
                baselines=",".join(DEMO_BASELINES),
                eval_split=split,
            )
        store = outputs["model_store"]
        say(f"      pipeline done in {outputs['seconds'] / 60:.1f} min; model store {store}")
        rows = [_whole_numbers(row) for row in outputs["quality_rows"]]
        data = datasets.load_prepared(outputs["prepared_path"])
        say("[2/3] the served model (distilled + ONNX) on the same split, and encoder speed")
        with console.step("evaluate-served") as step:
            served = evaluate(data, store, split)  # the exported, compressed model as served
            served["model"] = "served: distilled + ONNX"
            step.headline = f"{split} nDCG@10 {served['ndcg@10']:.4f}"
        rows.append(served)
        with console.step("encoder-speed") as step:
            section, speed = _compression_section(outputs, rows, data)
            step.headline = speed
        sections += section
    else:
        data = datasets.load(DEMO_DATASET)
        say(f"[1/1] evaluating baselines on the {split} split (full ranking, seen items excluded)")
        with console.step("baselines") as step:
            rows = [evaluate(data, model, split) for model in DEMO_BASELINES]
            best = max(rows, key=lambda r: r["ndcg@10"])
            step.headline = f"{split} nDCG@10 {best['ndcg@10']:.4f} (best: {best['model']})"
    table = report.format_table(rows, report.QUALITY_COLUMNS)
    say("\n" + table + "\n")
    plot = report.bar_plot(
        rows,
        ["ndcg@10", "mrr@10", "hit@10"],
        run_dir / "quality.png",
        f"{DEMO_DATASET}, {split} split",
    )
    if pipeline and serve:
        say(
            "[3/3] serving the store on 127.0.0.1 (Ray Serve + Triton, Ray Serve + ONNX Runtime) "
            "and a short load test"
        )
        with console.step("serve-and-bench") as step:
            result = serve_and_bench(
                store,
                levels=(1, 8, 32),
                requests=200,
                max_seconds=10.0,
                out_dir=run_dir / "bench",
            )
            step.headline = _bench_headline(result)
        latency = format_table(result)
        say("\n" + latency + "\n")
        sections += [
            "## Serving latency",
            "",
            latency,
            "",
            "![latency](bench/latency_vs_load.png)",
            "",
        ]
    (run_dir / "metrics.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    lines = [
        f"# kuberank demo — {DEMO_DATASET}",
        "",
        f"Run {stamp}. Leave-last-out split; full ranking over {len(data.items)} items, each user's seen "
        f"items excluded; {split} split.",
        "",
        "## Quality",
        "",
        table,
        "",
        f"![quality]({plot.name})",
        "",
        *sections,
    ]
    (run_dir / "report.md").write_text("\n".join(lines))
    minutes = (time.perf_counter() - started) / 60
    say(f"done in {minutes:.1f} min. report: {run_dir / 'report.md'}")
    say(f"  step logs: {logs}/" + (f"; model store: {store}" if store else ""))
    return run_dir


def _whole_numbers(row: dict) -> dict:
    """kfp hands metadata numbers back as floats: counts (queries, items) become ints again."""
    return {
        k: int(v) if k in ("queries", "items") and isinstance(v, float) and v.is_integer() else v
        for k, v in row.items()
    }


def _bench_headline(result: dict) -> str:
    best = (result.get("summary") or {}).get("best")
    if not best:
        return "no level within the p99 budget"
    return (
        f"best {best['qps']} req/s at p99 {best['p99_ms']} ms ({best['target']}, "
        f"{best['mode']} {float(best['level']):g})"
    )


def _speed_table(outputs: dict, rows: list[dict], data) -> tuple[str, str]:
    """Batch-32 encoder throughput: the fine-tuned PyTorch model against the served ONNX
    models (fp32 and int8) of the store, on the catalogue's texts."""
    onnx_dir = Path(store_path(outputs["model_store"], ONNX_DIR))
    quality = {r["model"]: r["ndcg@10"] for r in rows}
    variants = [
        (
            "fine-tuned",
            "PyTorch fp32",
            TextEncoder(outputs["model_path"]),
            quality.get("fine-tuned"),
        ),
        (
            "served",
            "ONNX Runtime fp32",
            OnnxEncoder(onnx_dir, intra_op_threads=None),
            quality.get("served: distilled + ONNX"),
        ),
        (
            "served",
            "ONNX Runtime int8",
            OnnxEncoder(onnx_dir / INT8_FILE, tokenizer=onnx_dir, intra_op_threads=None),
            None,
        ),
    ]
    table = []
    for name, runtime, encoder, ndcg in variants:
        stats = encoder_throughput(encoder, data.item_texts, 32, seconds=4.0)
        table.append(
            {
                "model": name,
                "runtime": runtime,
                "b32 texts/s": round(stats["texts/s"], 1),
                "b32 p50 ms": round(stats["p50 ms"], 1),
                "test ndcg@10": "" if ndcg is None else round(ndcg, 4),
            }
        )
    for row in table:
        row["speed-up"] = f"{row['b32 texts/s'] / table[0]['b32 texts/s']:.2f}x"
    text = report.format_table(
        table, ("runtime", "b32 texts/s", "b32 p50 ms", "speed-up", "test ndcg@10")
    )
    return (
        text,
        f"{table[-1]['runtime']} {table[-1]['speed-up']} the speed of {table[0]['runtime']}",
    )


def compression_line(compression: dict) -> str:
    """The report's sentence on the compress step's outcome (the model's ``compression``)."""
    if compression.get("compressed") is False:
        return (
            f"No level passed the quality gate on {compression['split']} (teacher nDCG@10 "
            f"{compression['teacher_ndcg10']:.4f}; levels tried: "
            f"{format_levels(compression['ladder'])}): the teacher is served uncompressed."
        )
    if compression:
        return (
            f"Quality gate on {compression['split']}: compressed nDCG@10 {compression['compressed_ndcg10']:.4f} vs "
            f"teacher {compression['teacher_ndcg10']:.4f}; layers {compression['layers']}, feed-forward "
            f"{compression['intermediate_size']}, weights {compression['teacher_bytes'] / 1e6:.0f} MB -> int8 ONNX "
            f"{compression.get('int8_bytes', 0) / 1e6:.0f} MB."
        )
    return "The served model is not compressed."


def _compression_section(outputs: dict, rows: list[dict], data) -> tuple[list[str], str]:
    """The report's fine-tuning and compression sections, and the encoder speed headline."""
    model_info = json.loads(
        Path(store_path(outputs["model_store"], MODEL_DIR, "kuberank.json")).read_text()
    )
    compression = model_info.get("compression") or {}
    training = model_info.get("training") or {}
    lines = ["## Fine-tuning", ""]
    history = [{"model": f"epoch {h['epoch'] + 1}", **h} for h in training.get("history", [])]
    if history:
        lines += [
            report.format_table(history, ("loss", "val_ndcg@10", "samples_per_s", "minutes")),
            "",
        ]
    lines += ["## Compression", ""]
    lines.append(compression_line(compression))
    speed, headline = _speed_table(outputs, rows, data)
    return lines + ["", speed, ""], headline
