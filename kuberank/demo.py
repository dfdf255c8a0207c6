"""The embedded demo: MovieLens-100K end to end on one machine, with a report.

``make demo`` runs ``kuberank demo``: prepare the data, evaluate the baselines, fine-tune the
F(Q,B,I) ranker on Ray Train within a time budget, compare before and after, and write
``runs/<timestamp>/report.md`` with plots.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from kuberank import datasets, report
from kuberank.components.data_prep import prepare
from kuberank.components.evaluate import evaluate

DEMO_DATASET = "movielens-100k"
DEMO_BASELINES = ("popularity", "ease", "zero-shot")
TRAIN_BUDGET_MINUTES = 4.0


def run_demo(out_root: str = "runs", split: str = "test", echo=print, train: bool = True,
             workers: int = 2, serve: bool = True) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out_root) / stamp
    prepared = run_dir / "data"
    steps = 2 + (1 if train else 0) + (2 if train and serve else 0)
    echo(f"[1/{steps}] preparing {DEMO_DATASET} -> {prepared}")
    manifest = prepare(DEMO_DATASET, str(prepared))
    echo(f"      {manifest['rows']} rows, splits {manifest['splits']}")
    data = datasets.load_prepared(str(prepared))
    echo(f"[2/{steps}] evaluating baselines on the {split} split (full ranking, seen items excluded)")
    rows = [evaluate(data, model, split) for model in DEMO_BASELINES]
    training = None
    if train:
        from kuberank.components.finetune import TrainConfig
        from kuberank.components.finetune import train as fine_tune
        from kuberank.model import read_info

        echo(f"[3/{steps}] fine-tuning F(Q,B,I) on Ray Train ({workers} workers, budget {TRAIN_BUDGET_MINUTES:g} min)")
        model_dir = fine_tune(TrainConfig(dataset=f"prepared:{prepared}", out=str(run_dir / "model"),
                                          workers=workers, max_minutes=TRAIN_BUDGET_MINUTES))
        tuned = evaluate(data, str(model_dir), split)
        tuned["model"] = "F(Q,B,I) fine-tuned"
        rows.append(tuned)
        training = read_info(model_dir).training
    extra_sections: list[str] = []
    if train and serve:
        extra_sections = _compress_serve_and_bench(run_dir, model_dir, prepared, rows, echo, steps)
    table = report.format_table(rows, report.QUALITY_COLUMNS)
    echo("\n" + table + "\n")
    if training:
        before = next(r for r in rows if r["model"] == "zero-shot")["ndcg@10"]
        echo(f"before/after: zero-shot nDCG@10 {before:.4f} -> fine-tuned {rows[-1]['ndcg@10']:.4f} "
             f"({training['epochs_run']} epochs, best on validation: epoch {training['chosen_epoch'] + 1})")
    plot = report.bar_plot(rows, ["ndcg@10", "mrr@10", "hit@10"], run_dir / "quality.png",
                           f"{DEMO_DATASET}, {split} split")
    (run_dir / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"# kuberank demo — {DEMO_DATASET}",
        "",
        f"Run {stamp}. Leave-last-out split: {manifest['splits']}. Full ranking over "
        f"{manifest['rows']['items']} items; each user's seen items are excluded.",
        "",
        "## Quality",
        "",
        table,
        "",
        f"![quality]({plot.name})",
        "",
    ]
    if training:
        lines += ["## Fine-tuning", "", report.format_table(
            [{"model": f"epoch {h['epoch'] + 1}", **h} for h in training["history"]],
            ("loss", "val_ndcg@10", "samples_per_s", "minutes")), ""]
    lines += extra_sections
    (run_dir / "report.md").write_text("\n".join(lines))
    echo(f"report: {run_dir / 'report.md'}")
    return run_dir


def _compress_serve_and_bench(run_dir: Path, model_dir: Path, prepared: Path, rows: list[dict], echo,
                              steps: int) -> list[str]:
    """Compress behind the quality gate, export to a model store, index the catalogue, then
    serve it on 127.0.0.1 and benchmark it against the naive server and the in-process limit."""
    from kuberank.components.compress import CompressConfig, QualityGateError, compress
    from kuberank.components.export import export_model
    from kuberank.serving.bench import format_table, serve_and_bench
    from kuberank.serving.index import build_index

    spec = f"prepared:{prepared}"
    echo(f"[4/{steps}] compressing (distil 6->3 layers, prune, int8) behind the quality gate")
    served, lines = model_dir, ["## Compression", ""]
    try:
        gate = compress(CompressConfig(model=str(model_dir), dataset=spec, out=str(run_dir / "compressed")))
        served = run_dir / "compressed"
        tuned = evaluate(datasets.load_prepared(str(prepared)), str(served), "test")
        tuned["model"] = "F(Q,B,I) distilled + int8"
        rows.append(tuned)
        lines.append(f"Accepted: nDCG@10 on {gate['split']} {gate['compressed_ndcg10']:.4f} vs teacher "
                     f"{gate['teacher_ndcg10']:.4f}; layers {gate['layers']}, weights "
                     f"{gate['teacher_bytes'] / 1e6:.0f} MB -> int8 ONNX {gate.get('int8_bytes', 0) / 1e6:.0f} MB.")
    except QualityGateError as exc:
        lines.append(f"Refused by the quality gate, serving the uncompressed model: {exc}")
    echo("      " + lines[-1])
    echo(f"[5/{steps}] exporting, indexing, serving on 127.0.0.1 and benchmarking")
    store = run_dir / "store"
    export_model(served, store, fp16=False)
    build_index(served, spec, store)
    result = serve_and_bench(str(store), targets=("kuberank-onnx", "naive", "limit"), levels=(1, 8, 32),
                             requests=200, max_seconds=10.0, out_dir=run_dir / "bench", model_dir=str(served))
    latency = format_table(result)
    echo("\n" + latency + "\n")
    return lines + ["", "## Serving latency", "", latency, "", "![latency](bench/latency_vs_load.png)", ""]
