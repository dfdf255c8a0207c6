"""Ranking metrics with trec_eval's definitions (checked against pytrec_eval in tests).

A run maps a query id to its ranked item ids (best first); qrels map a query id to
{item id: relevance}. An item is relevant when its relevance is >= 1 (trec_eval's default
relevance level). nDCG uses the relevance value as gain and log2(rank + 1) as discount.
Queries without any relevant judgment are not scored (trec_eval skips them too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_CUTOFFS = (1, 5, 10, 100)


def ndcg_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    dcg = sum(max(rels.get(doc, 0), 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    for i, doc in enumerate(ranked[:k]):
        if rels.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    relevant = sum(1 for r in rels.values() if r > 0)
    if relevant == 0:
        return 0.0
    return sum(1 for doc in ranked[:k] if rels.get(doc, 0) > 0) / relevant


def hit_rate_at_k(ranked: Sequence[str], rels: Mapping[str, int], k: int) -> float:
    return 1.0 if any(rels.get(doc, 0) > 0 for doc in ranked[:k]) else 0.0


def average_precision(ranked: Sequence[str], rels: Mapping[str, int]) -> float:
    relevant = sum(1 for r in rels.values() if r > 0)
    if relevant == 0:
        return 0.0
    hits, total = 0, 0.0
    for i, doc in enumerate(ranked):
        if rels.get(doc, 0) > 0:
            hits += 1
            total += hits / (i + 1)
    return total / relevant


def per_query(
    ranked: Sequence[str], rels: Mapping[str, int], cutoffs: Sequence[int] = DEFAULT_CUTOFFS
) -> dict[str, float]:
    scores = {"map": average_precision(ranked, rels)}
    for k in cutoffs:
        scores[f"ndcg@{k}"] = ndcg_at_k(ranked, rels, k)
        scores[f"mrr@{k}"] = mrr_at_k(ranked, rels, k)
        scores[f"recall@{k}"] = recall_at_k(ranked, rels, k)
        scores[f"hit@{k}"] = hit_rate_at_k(ranked, rels, k)
    return scores


def evaluate_run(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    cutoffs: Sequence[int] = DEFAULT_CUTOFFS,
) -> dict[str, float]:
    """Mean of every metric over the judged queries (those with a relevant item); a judged
    query missing from the run scores 0. Adds ``queries``, the number averaged over."""
    judged = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    totals: dict[str, float] = {}
    for qid in judged:
        for name, value in per_query(run.get(qid, []), qrels[qid], cutoffs).items():
            totals[name] = totals.get(name, 0.0) + value
    means = {name: value / len(judged) for name, value in totals.items()} if judged else {}
    means["queries"] = len(judged)
    return means


def top_k(scores: np.ndarray, exclude: np.ndarray, depth: int) -> np.ndarray:
    """Indices of the ``depth`` best items, excluded ones removed; ties go to the lower
    index so runs are deterministic."""
    scores = np.array(scores, dtype=np.float64)
    if len(exclude):
        scores[exclude] = -np.inf
    depth = min(depth, int(np.isfinite(scores).sum()))
    if depth == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.argpartition(-scores, depth - 1)[:depth]
    return candidates[np.lexsort((candidates, -scores[candidates]))]
