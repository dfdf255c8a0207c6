"""The benchmark sections; each returns (result dict, Markdown)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.rec_peers import rec_peers  # noqa: E402,F401  (the rec-peers section)
from kuberank import datasets, report
from kuberank.components.evaluate import evaluate
from kuberank.perf import encoder_flops, encoder_throughput, matmul_peak_flops

ML = "movielens-100k"


def _train(spec: str, out: Path, **kwargs) -> tuple[Path, float]:
    from kuberank.components.finetune import TrainConfig, train

    started = time.perf_counter()
    path = train(TrainConfig(dataset=spec, out=str(out), **kwargs))
    return path, time.perf_counter() - started


def scored(data: datasets.Dataset, model, split: str) -> tuple[dict, dict[str, float]]:
    """What :func:`evaluate` returns and the per-query NDCG@10 of the same run, for the paired
    tests."""
    result = evaluate(data, model, split, per_query=True)
    return result, result.pop("per_query_ndcg@10")


def _history(model: Path) -> list[dict]:
    return json.loads((model / "kuberank.json").read_text())["training"]["history"]


def _training_minutes(model: Path) -> float:
    """Training time recorded by the workers (a re-run that resumes a finished run still
    reports the original training time)."""
    history = _history(model)
    return float(history[-1]["minutes"]) if history else 0.0


def quality(out: Path, cisi: str | None):
    data = datasets.load(ML)
    rows = [evaluate(data, name, "test") for name in ("popularity", "ease", "zero-shot")]
    model, seconds = _train(ML, out / "models" / "movielens", workers=2)
    tuned = evaluate(data, str(model), "test")
    tuned["model"] = "F(Q,B,I) fine-tuned"
    rows.append(tuned)
    best_base = max(r["ndcg@10"] for r in rows[:2])
    lines = [
        f"MovieLens-100K, test split, full ranking over {len(data.items)} items (943 users).",
        "",
        report.format_table(rows, report.QUALITY_COLUMNS),
        "",
        f"F(Q,B,I) / best non-sequential baseline in this run: {tuned['ndcg@10'] / best_base:.2f}x "
        f"(training {_training_minutes(model):.1f} min with 2 workers, epoch chosen on validation).",
        "The learned peers (RecBole's SASRec, GRU4Rec, LightGCN, BPR, ItemKNN) over seeds, with "
        "a paired test: the rec-peers section.",
    ]
    plot = report.bar_plot(
        rows, ["ndcg@10", "hit@10"], out / "quality-movielens.png", "MovieLens-100K test"
    )
    lines += ["", f"![movielens]({plot.name})"]
    result = {"movielens": rows, "movielens_train_seconds": seconds}
    print("\n".join(lines), flush=True)
    if cisi:
        reference = {"bm25": 0.321, "zero-shot": 0.419}  # pytrec_eval, computed independently
        checks = [evaluate(cisi, name, "all") for name in reference]
        lines += ["", "CISI `--split all` against the independent pytrec_eval reference:", ""]
        lines += [
            f"- {r['model']}: nDCG@10 {r['ndcg@10']:.4f} vs reference {reference[r['model']]:.3f} "
            f"(difference {r['ndcg@10'] - reference[r['model']]:+.4f}, tolerance 0.01)"
            for r in checks
        ]
        result["cisi_reference"] = checks
        lines += ["", "CISI's test split, fine-tuned and hybrid: the search section."]
    return result, "\n".join(lines)


def train(out: Path, cisi: str | None):
    """Training throughput (samples/s) with 1 and 2 workers, one epoch each."""
    specs = [(ML, {"epochs": 1})]
    if cisi:
        specs.append((cisi, {"epochs": 1, "max_length": 128}))
    rows = []
    for spec, extra in specs:
        for workers in (1, 2):
            model, seconds = _train(
                spec, out / "models" / f"throughput-{workers}", workers=workers, **extra
            )
            rate = _history(model)[-1]["samples_per_s"]
            rows.append(
                {
                    "model": f"{datasets.load(spec).name} x{workers}",
                    "workers": workers,
                    "samples/s": round(rate, 1),
                    "wall s": round(seconds, 1),
                }
            )
    lines = [report.format_table(rows, ("workers", "samples/s", "wall s"), first="model")]
    for i in range(0, len(rows), 2):
        lines.append(
            f"{rows[i]['model'].split(' ')[0]}: 2 workers / 1 worker = "
            f"{rows[i + 1]['samples/s'] / rows[i]['samples/s']:.2f}x (2 cores: DDP splits the same CPUs)"
        )
    print("\n".join(lines), flush=True)
    return {"rows": rows}, "\n".join(lines)


def compression(out: Path, cisi: str | None):
    """PyTorch fp32, ONNX Runtime fp32, ONNX Runtime int8 and distilled + int8: throughput at
    batch 1 and 32, latency, nDCG@10 and achieved FLOP/s against the measured matmul peak."""
    from kuberank.components.compress import CompressConfig, compress
    from kuberank.components.export import export_model
    from kuberank.model import resolve_model

    teacher = out / "models" / "movielens"
    if not teacher.is_dir():
        teacher, _ = _train(ML, teacher, workers=2)
    data = datasets.load(ML)
    store = out / "store"
    export_model(teacher, store, fp16=False)
    int8 = out / "models" / "int8"
    compress(
        CompressConfig(
            model=str(teacher),
            dataset=ML,
            out=str(int8),
            ladder=((6, 0.0),),  # int8 only
            epochs=0,
            max_ndcg_drop=1.0,
        )
    )
    distilled = out / "models" / "distilled-int8"
    gate = compress(CompressConfig(model=str(teacher), dataset=ML, out=str(distilled)))
    variants = [
        ("PyTorch fp32", teacher),
        ("ONNX Runtime fp32", store),
        ("ONNX Runtime int8", int8),
        ("distilled + int8", distilled),
    ]
    texts = data.item_texts
    peak = matmul_peak_flops()
    from transformers import AutoTokenizer

    lengths = [
        len(ids)
        for ids in AutoTokenizer.from_pretrained(teacher)(texts, truncation=True, max_length=256)[
            "input_ids"
        ]
    ]
    mean_tokens = float(np.mean(lengths))
    rows = []
    for name, path in variants:
        encoder = resolve_model(path, threads=None).query_encoder
        own = Path(path) / "config.json"
        config = json.loads((own if own.is_file() else teacher / "config.json").read_text())
        row = {"model": name}
        for batch in (1, 32):
            stats = encoder_throughput(encoder, texts, batch)
            row[f"b{batch} texts/s"] = round(stats["texts/s"], 1)
            row[f"b{batch} p50 ms"] = round(stats["p50 ms"], 2)
        flops = encoder_flops(config, row["b32 texts/s"] * mean_tokens, int(mean_tokens))
        row["FLOP/s % of peak"] = round(100 * flops / peak, 1)
        row["ndcg@10"] = evaluate(data, str(path), "test")["ndcg@10"]
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["b32 speed-up"] = round(row["b32 texts/s"] / base["b32 texts/s"], 2)
        row["ndcg@10 loss"] = round(base["ndcg@10"] - row["ndcg@10"], 4)
    columns = (
        "b1 texts/s",
        "b1 p50 ms",
        "b32 texts/s",
        "b32 p50 ms",
        "b32 speed-up",
        "ndcg@10",
        "ndcg@10 loss",
        "FLOP/s % of peak",
    )
    lines = [
        f"Encoder of the MovieLens model on its 1682 item texts; matmul peak measured here: {peak / 1e9:.1f} GFLOP/s.",
        "",
        report.format_table(rows, columns),
        "",
        f"distilled + int8 vs PyTorch fp32 at batch 32: {rows[-1]['b32 speed-up']:.2f}x (target 6x), "
        f"nDCG@10 loss {rows[-1]['ndcg@10 loss']:+.4f} (target <= 0.01). Gate: {json.dumps({k: gate[k] for k in ('teacher_ndcg10', 'compressed_ndcg10', 'split')})}",
        f"Compression level chosen by the gate: {len(gate['layers'])} layers, prune ratio "
        f"{gate['prune_ratio']:g}; levels tried: {json.dumps(gate['ladder'])}",
    ]
    plot = report.bar_plot(
        [{"model": r["model"], "b32 speed-up": r["b32 speed-up"]} for r in rows],
        ["b32 speed-up"],
        out / "compression.png",
        "batch-32 throughput vs PyTorch fp32",
    )
    lines += ["", f"![compression]({plot.name})"]
    print("\n".join(lines), flush=True)
    return {"rows": rows, "peak_flops": peak, "gate": gate}, "\n".join(lines)


def serving(out: Path, cisi: str | None):
    """(a) Ray Serve + Triton, (b) Ray Serve + in-process ONNX Runtime, (c) the naive FastAPI
    server, (d) the in-process batched limit, and bare Triton; on the CISI documents when present
    (search traffic), else on the MovieLens catalogue (recommendation traffic)."""
    from kuberank.components.export import export_model
    from kuberank.components.index import build_index
    from kuberank.config import base_model_path
    from kuberank.serving.bench import format_table, serve_and_bench
    from kuberank.serving.bench_load import generator_split

    if cisi:
        model, spec = Path(base_model_path()), cisi
    else:
        model = out / "models" / "movielens"
        if not model.is_dir():
            model, _ = _train(ML, model, workers=2)
        spec = ML
    store = out / "serving-store"
    export_model(model, store, fp16=False)
    build_index(model, spec, store)
    result = serve_and_bench(
        str(store),
        requests=2000,  # about a second at c=32: short levels measure their own start
        max_seconds=15.0,
        out_dir=out / "serving",
        model_dir=str(model),
        open_at=(0.3, 0.4, 0.5) if cisi else (),  # (d) is measured on search queries
        split=generator_split(),  # the load generator on a core of its own (2 cores: one each)
    )
    table = format_table(result)
    print(table, flush=True)
    return result, table + "\n\n![latency](serving/latency_vs_load.png)"


def images(out: Path, cisi: str | None):
    """The container images: sizes, build cold/warm, start to /readyz, /search in the container
    vs outside it, and the ingress paths side by side (benchmarks/containers.py); search
    traffic on the CISI documents with the base model."""
    from benchmarks import containers
    from kuberank.components.export import export_model
    from kuberank.components.index import build_index
    from kuberank.config import base_model_path

    if not cisi:
        return {"skipped": "needs CISI"}, "skipped: needs ../shared/datasets/cisi (search traffic)"
    model = Path(base_model_path())
    store = out / "images-store"
    export_model(model, store, fp16=False)
    build_index(model, cisi, store)
    result = containers.run(out / "images", store)
    table = containers.markdown(result)
    print(table, flush=True)
    return result, table


def overload(out: Path, cisi: str | None):
    """``kuberank serve``'s defaults under open-loop load from 0.5x to 10x its measured
    capacity, deadline-aware admission off and on: goodput, admitted latency, 503s. The base
    MiniLM over the CISI documents when present, else over the MovieLens titles (search)."""
    from kuberank.components.export import export_model
    from kuberank.components.index import build_index
    from kuberank.config import base_model_path
    from kuberank.serving.bench_load import generator_split
    from kuberank.serving.bench_overload import format_overload
    from kuberank.serving.bench_overload import overload as run_overload

    model = Path(base_model_path())
    store = out / "overload-store"
    export_model(model, store, fp16=False)
    build_index(model, cisi or ML, store)
    result = run_overload(str(store), out_dir=out / "overload", split=generator_split())
    table = format_overload(result)
    print(table, flush=True)
    return result, table + "\n\n![overload](overload/overload.png)"


def retrieval(out: Path, cisi: str | None):
    """The lexical stage's latency and throughput cost (serving/hybrid.py): one store of the
    base MiniLM over the CISI documents when present, else over the MovieLens titles, served
    with ``retrieval: dense`` and ``hybrid`` in the same run (serving/bench_retrieval.py)."""
    from kuberank.components.export import export_model
    from kuberank.components.index import build_index
    from kuberank.config import base_model_path
    from kuberank.serving.bench_load import generator_split
    from kuberank.serving.bench_retrieval import format_retrieval_cost, retrieval_cost

    model = Path(base_model_path())
    store = out / "retrieval-store"
    export_model(model, store, fp16=False)
    build_index(model, cisi or ML, store)  # STORE/index and STORE/lexical
    result = retrieval_cost(str(store), split=generator_split())
    table = format_retrieval_cost(result)
    print(table, flush=True)
    return result, table


# each re-ranking's parameter, from "as ranked" outwards (issue 16's stages)
RERANK_GRIDS = {
    "mmr": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0),  # lambda: 1 = as ranked
    "calibration": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),  # lambda: 0 = as ranked
    "tail_boost": (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5),  # beta: 0 = as ranked
}
RERANK_PARAMETER = {"mmr": "mmr_lambda", "calibration": "calibration", "tail_boost": "tail_boost"}
# what each re-ranking aims to move, for its plot
RERANK_AIM = {"mmr": "ild@10", "calibration": "miscalibration@10", "tail_boost": "exposure_tail@10"}
MAX_NDCG_LOSS = 0.05  # the goal (issue 16): at most 5% relative nDCG@10 loss


def diversity(out: Path, cisi: str | None):
    """The responsible-ranking stages on MovieLens-100K (kuberank evaluate --mmr-lambda,
    --calibration, --tail-boost): for each, the accuracy-diversity curve over its parameter on
    validation, the parameter furthest from "as ranked" whose validation nDCG@10 stays within
    5% of the plain ranking's, and what it does on test (ILD@10, exposure of the popularity
    terciles, miscalibration@10, nDCG@10). EASE always; the fine-tuned F too when the quality
    section trained it in this run."""
    from kuberank.components.evaluate import load_ranker

    data = datasets.load(ML)
    models = {"ease": "ease"}
    tuned = out / "models" / "movielens"
    if (tuned / "kuberank.json").is_file():
        models["F(Q,B,I) fine-tuned"] = str(tuned)
    curves: dict[str, dict] = {kind: {} for kind in RERANK_GRIDS}
    rows, result = [], {}
    for name, model in models.items():
        ranker = load_ranker(model)  # loaded and its items encoded once for every point
        plain = evaluate(data, ranker, "test")
        rows.append({**plain, "model": f"{name}, as ranked"})
        result[name] = {"test_plain": plain}
        for kind, grid in RERANK_GRIDS.items():
            key = RERANK_PARAMETER[kind]
            curve = [evaluate(data, ranker, "validation", **{key: value}) for value in grid]
            floor = (1 - MAX_NDCG_LOSS) * curve[0]["ndcg@10"]
            chosen = [r[key] for r in curve if r["ndcg@10"] >= floor][-1]
            after = evaluate(data, ranker, "test", **{key: chosen})
            rows.append({**after, "model": f"{name}, {kind} {chosen:g}"})
            curves[kind][name] = curve
            result[name][kind] = {"validation": curve, "chosen": chosen, "test": after}

    def ratio(key, a, b):
        return f"{b[key] / a[key]:.2f}x" if a[key] else f"{a[key]:.4f} -> {b[key]:.4f}"

    columns = (
        "ndcg@10",
        "ild@10",
        "miscalibration@10",
        "coverage@10",
        "exposure_head@10",
        "exposure_mid@10",
        "exposure_tail@10",
    )
    lines = [
        "MovieLens-100K: each re-ranking over each list's top 100 (MMR: similarity of the "
        "model's own item vectors, EASE: the item text encoded by all-MiniLM-L6-v2; ILD always "
        "on the latter). Parameter chosen on validation: the one furthest from as-ranked within "
        f"{MAX_NDCG_LOSS:.0%} of its nDCG@10. Test:",
        "",
        report.format_table(rows, columns),
        "",
    ]
    for name, res in result.items():
        before = res["test_plain"]
        for kind in RERANK_GRIDS:
            after = res[kind]["test"]
            lines.append(
                f"- {name}, {kind} {res[kind]['chosen']:g}: ILD@10 "
                f"{ratio('ild@10', before, after)}, tail-tercile exposure "
                f"{ratio('exposure_tail@10', before, after)}, miscalibration@10 "
                f"{ratio('miscalibration@10', before, after)}, nDCG@10 "
                f"{(after['ndcg@10'] / before['ndcg@10'] - 1) * 100:+.1f}% (goal: ILD +20%, "
                f"tail x1.5, nDCG at most -{MAX_NDCG_LOSS:.0%})"
            )
    for name, curve in curves["mmr"].items():  # the ceiling: lambda 0 ignores relevance
        most = max(curve, key=lambda r: r["ild@10"])
        lines.append(
            f"- {name}: the most ILD@10 that MMR finds in the top 100 (validation, mmr "
            f"{most['mmr_lambda']:g}; at 0 relevance only picks the first item): "
            f"{ratio('ild@10', curve[0], most)} for nDCG@10 "
            f"{(most['ndcg@10'] / curve[0]['ndcg@10'] - 1) * 100:+.1f}%"
        )
    # the scale of the ILD goal: lists of k items drawn at random from the catalogue
    from kuberank.beyond_accuracy import ild, item_embeddings

    vectors = item_embeddings(data)
    draw = np.random.default_rng(0)
    users = result["ease"]["test_plain"]["queries"]  # the test users every model ranked
    random_ild = ild(
        [draw.choice(len(vectors), 10, replace=False) for _ in range(users)], vectors, 10
    )
    for name in models:
        plain = result[name]["test_plain"]["ild@10"]
        lines.append(
            f"- {name}: the ILD goal (+20%) is {1.2 * plain:.4f}, {1.2 * plain / random_ild:.2f}x "
            f"the ILD@10 of 10 items drawn at random from the catalogue ({random_ild:.4f}, "
            f"{users} lists, seed 0)"
        )
    result["random_lists_ild@10"] = random_ild
    lines.append("")
    for kind, by_model in curves.items():
        plot = report.curve_plot(
            by_model,
            RERANK_AIM[kind],
            "ndcg@10",
            RERANK_PARAMETER[kind],
            out / f"diversity-{kind}-movielens.png",
            f"MovieLens-100K validation: nDCG@10 against {RERANK_AIM[kind]} over {kind}",
        )
        lines.append(f"![{kind}]({plot.name})")
    print("\n".join(lines), flush=True)
    return result, "\n".join(lines)


from benchmarks.search import search  # noqa: E402,F401 - a section of its own module
