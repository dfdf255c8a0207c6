"""Small datasets written on the fly (tests never need ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

DOCS = {
    "d1": ("Neural ranking", "Transformers rank documents for search queries."),
    "d2": ("Cooking pasta", "Boil water, add salt and cook the pasta until al dente."),
    "d3": ("Kubernetes", "Pods, deployments and services run containers on a cluster."),
    "d4": ("Gardening", "Tomatoes need sun, water and good soil to grow."),
    "d5": ("GPU inference", "Triton serves models on GPUs with dynamic batching."),
    "d6": ("Recommendation", "Collaborative filtering learns from user interactions."),
}
QUERIES = {
    "q1": "how do transformers rank search results",
    "q2": "how to cook pasta",
    "q3": "run containers on a cluster",
    "q4": "serve models on gpu",
    "q5": "grow tomatoes",
    "q6": "recommend items from user history",
}
QRELS = {"q1": "d1", "q2": "d2", "q3": "d3", "q4": "d5", "q5": "d4", "q6": "d6"}
# An items table with one attribute column of each type (and one of two types: not kept).
ITEMS = pd.DataFrame(
    {
        "item_id": ["a", "b", "c", "d"],
        "text": ["", "", "", ""],
        "genres": [["Comedy", "Drama"], ["Drama"], np.array(["Action"]), []],
        "year": [1995.0, 2001.0, float("nan"), 1990.0],
        "studio": ["x", "y", None, "x"],
        "kids": [True, False, False, True],
        "mixed": [1, "one", None, None],  # two types: not an attribute
    }
)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_beir(root: Path, qrels_files: dict[str, dict[str, str]] | None = None) -> Path:
    write_jsonl(
        root / "corpus.jsonl", [{"_id": k, "title": t, "text": x} for k, (t, x) in DOCS.items()]
    )
    write_jsonl(root / "queries.jsonl", [{"_id": k, "text": v} for k, v in QUERIES.items()])
    for name, pairs in (qrels_files or {"test": QRELS}).items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in pairs.items()]
        (root / "qrels").mkdir(parents=True, exist_ok=True)
        (root / "qrels" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


def interaction_rows(users: int = 4, per_user: int = 5):
    """Each user watches items in id order; user u starts at item u."""
    rows = []
    for u in range(users):
        for t in range(per_user):
            item = (u + t) % 8
            rows.append(
                {
                    "user_id": f"u{u}",
                    "item_id": str(item),
                    "timestamp": 1000 + t,
                    "rating": 4,
                    "item_text": f"item number {item}",
                }
            )
    return rows
