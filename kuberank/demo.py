"""The embedded demo: the whole kuberank pipeline on MovieLens-100K on one machine.

``make demo`` runs ``kuberank demo``: the Kubeflow pipeline on kfp's local runner (prepare,
fine-tune F(Q,B,I) on Ray Train within a time budget, evaluate against the baselines, compress
behind the quality gate, export to ONNX and Triton repositories, index, publish), then serves
the model store on 127.0.0.1 and benchmarks it, and writes one report,
``runs/<timestamp>/report.md``, with the quality, compression and latency tables and plots.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from kuberank import datasets, report
from kuberank.components.evaluate import evaluate

DEMO_DATASET = "movielens-100k"
DEMO_BASELINES = ("popularity", "ease", "zero-shot")
TRAIN_BUDGET_MINUTES = 4.0


def run_demo(
    out_root: str = "runs",
    split: str = "test",
    echo=print,
    pipeline: bool = True,
    serve: bool = True,
) -> Path:
    """``pipeline=False`` only evaluates the baselines (seconds; what the unit test runs)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out_root) / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    if pipeline:
        from kuberank.pipelines.pipeline import run_local

        echo(
            f"[1/3] the kuberank pipeline on kfp's local runner: prepare -> fine-tune (Ray Train, 2 workers, "
            f"<= {TRAIN_BUDGET_MINUTES:g} min) -> evaluate -> compress -> export -> index -> publish"
        )
        outputs = run_local(
            run_dir / "pipeline",
            dataset_spec=DEMO_DATASET,
            max_minutes=TRAIN_BUDGET_MINUTES,
            baselines=",".join(DEMO_BASELINES),
            eval_split=split,
        )
        echo(
            f"      done in {outputs['seconds'] / 60:.1f} min; model store {outputs['model_store']}"
        )
        rows = [dict(row) for row in outputs["quality_rows"]]
        data = datasets.load_prepared(outputs["prepared_path"])
        store = outputs["model_store"]
        served = evaluate(data, store, split)  # the exported, compressed model as served
        served["model"] = "served: distilled + ONNX"
        rows.append(served)
        sections += _compression_section(outputs, rows, data)
    else:
        data = datasets.load(DEMO_DATASET)
        echo(f"[1/1] evaluating baselines on the {split} split (full ranking, seen items excluded)")
        rows = [evaluate(data, model, split) for model in DEMO_BASELINES]
    table = report.format_table(rows, report.QUALITY_COLUMNS)
    echo("\n" + table + "\n")
    plot = report.bar_plot(
        rows,
        ["ndcg@10", "mrr@10", "hit@10"],
        run_dir / "quality.png",
        f"{DEMO_DATASET}, {split} split",
    )
    if pipeline and serve:
        from kuberank.serving.bench import format_table, serve_and_bench

        echo(
            "[3/3] serving the store on 127.0.0.1 (Ray Serve + Triton, Ray Serve + ONNX Runtime) and benchmarking"
        )
        result = serve_and_bench(
            store, levels=(1, 8, 32), requests=200, max_seconds=10.0, out_dir=run_dir / "bench"
        )
        latency = format_table(result)
        echo("\n" + latency + "\n")
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
    echo(f"report: {run_dir / 'report.md'}")
    return run_dir


def _speed_table(outputs: dict, rows: list[dict], data) -> str:
    """Batch-32 encoder throughput: the fine-tuned PyTorch model against the served ONNX
    models (fp32 and int8) of the store, on the catalogue's texts."""
    from kuberank.encoder import TextEncoder
    from kuberank.onnx_encoder import OnnxEncoder
    from kuberank.perf import encoder_throughput

    onnx_dir = Path(outputs["model_store"]) / "onnx"
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
            OnnxEncoder(onnx_dir / "model.int8.onnx", tokenizer=onnx_dir, intra_op_threads=None),
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
    return report.format_table(
        table, ("runtime", "b32 texts/s", "b32 p50 ms", "speed-up", "test ndcg@10")
    )


def _compression_section(outputs: dict, rows: list[dict], data) -> list[str]:
    model_info = json.loads((Path(outputs["model_store"]) / "model" / "kuberank.json").read_text())
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
    if compression:
        lines.append(
            f"Quality gate on {compression['split']}: compressed nDCG@10 {compression['compressed_ndcg10']:.4f} vs "
            f"teacher {compression['teacher_ndcg10']:.4f}; layers {compression['layers']}, feed-forward "
            f"{compression['intermediate_size']}, weights {compression['teacher_bytes'] / 1e6:.0f} MB -> int8 ONNX "
            f"{compression.get('int8_bytes', 0) / 1e6:.0f} MB."
        )
    else:
        lines.append("The served model is not compressed.")
    return lines + ["", _speed_table(outputs, rows, data), ""]
