"""The ``search`` section: does search generalise beyond CISI?

For every collection (CISI when present, plus each BEIR directory in ``KUBERANK_COLLECTIONS``,
colon-separated), on its test queries with the same defaults everywhere:
BM25, the zero-shot encoder (dense), both fused (hybrid, the fusion fitted on the validation
queries only), the encoder fine-tuned with the defaults, and that model fused with BM25.
Goals (issue 18): fine-tuned >= zero-shot + 0.03 and hybrid >= max(BM25, dense) + 0.01.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kuberank import datasets, report, significance
from kuberank.components.evaluate import evaluate

FINETUNE_GAIN = 0.03
HYBRID_GAIN = 0.01


def collections(cisi: str | None) -> list[str]:
    specs = [cisi] if cisi else []
    for path in filter(None, os.environ.get("KUBERANK_COLLECTIONS", "").split(":")):
        if not Path(path, "corpus.jsonl").is_file():
            raise SystemExit(f"KUBERANK_COLLECTIONS: {path} is not a BEIR directory")
        specs.append(f"beir:{path}")
    return specs


def one_collection(spec: str, out: Path, train_kwargs: dict | None = None) -> dict:
    from kuberank.components.finetune import TrainConfig, train

    data = datasets.load(spec)
    queries = data.qrels.groupby("split")["query_id"].nunique().to_dict()
    rows = [
        evaluate(data, "bm25", "test", per_query=True),
        evaluate(data, "zero-shot", "test", per_query=True),
        evaluate(data, "zero-shot", "test", retrieval="hybrid", per_query=True),
    ]
    started = time.perf_counter()
    model = train(
        TrainConfig(dataset=spec, out=str(out / data.name), workers=2, **(train_kwargs or {}))
    )
    seconds = time.perf_counter() - started
    rows.append({**evaluate(data, str(model), "test", per_query=True), "model": "fine-tuned"})
    hybrid = evaluate(data, str(model), "test", retrieval="hybrid", per_query=True)
    rows.append({**hybrid, "model": "fine-tuned+bm25"})
    per_query = {r["model"]: r.pop("per_query_ndcg@10") for r in rows}
    ndcg = {r["model"]: r["ndcg@10"] for r in rows}
    best_single = max(("bm25", "fine-tuned"), key=lambda m: ndcg[m])
    paired = {  # paired over the test queries (kuberank/significance.py)
        "fine-tuned vs zero-shot": significance.paired_test(
            per_query["fine-tuned"], per_query["zero-shot"]
        ),
        f"fine-tuned+bm25 vs {best_single}": significance.paired_test(
            per_query["fine-tuned+bm25"], per_query[best_single]
        ),
    }
    return {
        "paired": paired,
        "collection": data.name,
        "items": len(data.items),
        "queries": queries,
        "rows": rows,
        "train_seconds": round(seconds, 1),
        "finetune_gain": ndcg["fine-tuned"] - ndcg["zero-shot"],
        "hybrid_gain": ndcg["zero-shot+bm25"] - max(ndcg["bm25"], ndcg["zero-shot"]),
        "hybrid_gain_tuned": ndcg["fine-tuned+bm25"] - max(ndcg["bm25"], ndcg["fine-tuned"]),
        "fusion_weights": [r.get("fusion", {}).get("weight") for r in rows if "fusion" in r],
    }


def search(out: Path, cisi: str | None):
    specs = collections(cisi)
    if not specs:
        return {"skipped": "no collection"}, "No search collection (CISI or KUBERANK_COLLECTIONS)."
    results, lines = [], []
    for spec in specs:
        result = one_collection(spec, out / "models" / "search")
        results.append(result)
        q = result["queries"]
        lines += [
            f"### {result['collection']} ({result['items']} documents; queries: "
            + ", ".join(f"{k} {v}" for k, v in sorted(q.items()))
            + ")",
            "",
            report.format_table(result["rows"], report.QUALITY_COLUMNS),
            "",
            f"- fine-tuned - zero-shot: {result['finetune_gain']:+.4f} "
            f"(goal +{FINETUNE_GAIN}; {'met' if result['finetune_gain'] >= FINETUNE_GAIN else 'NOT met'})",
            f"- hybrid - max(BM25, dense), zero-shot: {result['hybrid_gain']:+.4f}; fine-tuned: "
            f"{result['hybrid_gain_tuned']:+.4f} (goal +{HYBRID_GAIN}; "
            f"{'met' if min(result['hybrid_gain'], result['hybrid_gain_tuned']) >= HYBRID_GAIN else 'NOT met'})",
            f"- fusion weights fitted on the tuning queries (train + validation): "
            f"{result['fusion_weights']}; training {result['train_seconds'] / 60:.1f} min (2 workers)",
        ]
        lines += [
            f"- {name}: {p['difference']:+.4f} over {p['queries']} queries, bootstrap 95% "
            f"[{p['bootstrap_ci95'][0]:+.4f}, {p['bootstrap_ci95'][1]:+.4f}], t-test p = "
            f"{p['t_p']:.3g}"
            for name, p in result["paired"].items()
        ]
        lines.append("")
        print("\n".join(lines[-12:]), flush=True)
    return {"collections": results}, "\n".join(lines)
