"""Diversity re-ranking: maximal marginal relevance (Carbonell & Goldstein, 1998).

MMR builds the list greedily: each step takes the candidate with the largest

    lambda * relevance(i) - (1 - lambda) * max_{j already chosen} cos(i, j)

with relevance min-max scaled to [0, 1] over the candidates (F's scores have no fixed scale).
lambda = 1 is the ranking itself; smaller lambdas trade relevance for intra-list diversity.
"""

from __future__ import annotations

import numpy as np

# every re-ranking (MMR, calibration, the long-tail boost) re-orders at most a list's top 100,
# offline (components/evaluate.py) and served (serving/reranking.py)
RERANK_DEPTH = 100


def mmr(
    relevance: np.ndarray, embeddings: np.ndarray, lam: float, k: int | None = None
) -> np.ndarray:
    """The MMR order (positions into ``relevance``) of the first ``k`` picks (all by default);
    ties go to the lower position. ``embeddings``: one row per candidate (normalised here)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    rel = np.asarray(relevance, dtype=np.float64)
    n = len(rel)
    k = n if k is None else min(k, n)
    if n == 0 or k == 0:
        return np.zeros(0, dtype=np.int64)
    spread = rel.max() - rel.min()
    rel = (rel - rel.min()) / spread if spread > 0 else np.zeros(n)
    vecs = np.asarray(embeddings, dtype=np.float64)
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    closest = np.full(n, -np.inf)  # max similarity to the chosen items
    chosen = np.zeros(n, dtype=bool)
    order = []
    for _ in range(k):
        penalty = np.where(np.isfinite(closest), closest, 0.0)
        value = lam * rel - (1.0 - lam) * penalty
        value[chosen] = -np.inf
        pick = int(np.argmax(value))  # first maximum: the lower position
        order.append(pick)
        chosen[pick] = True
        closest = np.maximum(closest, vecs @ vecs[pick])
    return np.asarray(order, dtype=np.int64)
