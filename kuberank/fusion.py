"""Hybrid retrieval: fusing a lexical (BM25) and a dense (F = Q·I) ranking of the same items.

Pure functions on score rows aligned by item (one row per query, one column per item), used
by ``kuberank evaluate --retrieval hybrid`` and by the index that records the fitted weight.

- ``rrf``: reciprocal rank fusion (Cormack et al., 2009), sum of 1 / (k + rank) over the two
  rankings, k = 60. No parameter to fit; ranks only, so score scales never matter.
- ``convex``: ``weight * norm(dense) + (1 - weight) * norm(lexical)``, each row min-max
  normalised to [0, 1] (Bruch et al., 2023: a convex combination of normalised scores with a
  tuned weight is at least as good as RRF once a few judged queries exist). The weight is
  chosen on the judged queries outside test (:func:`fit_on_judged`): a dozen held-out
  validation queries alone picked weights that did not hold on test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kuberank import metrics

RRF_K = 60
WEIGHT_GRID = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))
METHODS = ("rrf", "convex")


def minmax(scores: np.ndarray) -> np.ndarray:
    """Each row scaled to [0, 1]; a constant row becomes zeros (it ranks nothing)."""
    scores = np.asarray(scores, dtype=np.float64)
    low = scores.min(axis=-1, keepdims=True)
    span = scores.max(axis=-1, keepdims=True) - low
    return np.divide(scores - low, span, out=np.zeros_like(scores), where=span > 0)


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every item in its row (ties to the lower index, as in evaluation)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[-1]), scores.shape), -scores))
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(1, scores.shape[-1] + 1)[None, :], axis=-1)
    return out


def rrf(dense: np.ndarray, lexical: np.ndarray, k: int = RRF_K) -> np.ndarray:
    return 1.0 / (k + ranks(np.atleast_2d(dense))) + 1.0 / (k + ranks(np.atleast_2d(lexical)))


def convex(dense: np.ndarray, lexical: np.ndarray, weight: float) -> np.ndarray:
    return fuse(dense, lexical, "convex", weight)


def terms(
    dense: np.ndarray, lexical: np.ndarray, method: str, weight: float | None = None
) -> dict[str, np.ndarray]:
    """The two parts of the fused score, ``{"dense": ..., "lexical": ...}`` (rows as given):
    rrf's 1 / (k + rank) of each ranking, or convex's ``weight * norm(dense)`` and
    ``(1 - weight) * norm(lexical)``. Their sum is :func:`fuse`; serving explains a hybrid
    score with them."""
    dense, lexical = np.atleast_2d(dense), np.atleast_2d(lexical)
    if method == "rrf":
        return {"dense": 1.0 / (RRF_K + ranks(dense)), "lexical": 1.0 / (RRF_K + ranks(lexical))}
    if method == "convex":
        if weight is None:
            raise ValueError("convex fusion needs a weight (fit it on validation)")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
        return {"dense": weight * minmax(dense), "lexical": (1.0 - weight) * minmax(lexical)}
    raise ValueError(f"fusion method must be one of {METHODS}, got {method!r}")


def fuse(dense: np.ndarray, lexical: np.ndarray, method: str, weight: float | None = None):
    parts = terms(dense, lexical, method, weight)
    return parts["dense"] + parts["lexical"]


def fit_weight(
    dense: np.ndarray,
    lexical: np.ndarray,
    quality: Callable[[np.ndarray], float],
    grid: tuple[float, ...] = WEIGHT_GRID,
) -> tuple[float, dict[float, float]]:
    """The grid weight whose fused scores give the best ``quality`` (e.g. validation nDCG@10
    of the ranking they induce); ties go to the weight nearest 0.5 (the least committed).
    Returns the weight and the quality of every grid point."""
    curve = {w: float(quality(convex(dense, lexical, w))) for w in grid}
    best = max(curve.values())
    weight = min((w for w, q in curve.items() if q == best), key=lambda w: (abs(w - 0.5), w))
    return weight, curve


def fit_on_judged(dense, lexical, query_ids, excludes, qrels, item_ids) -> dict:
    """Fit the convex weight on judged queries outside test (the ``tuning`` split: train and
    validation): the weight whose fused ranking (seen items excluded) has the best nDCG@10.
    The record kept with the lexical index: ``default`` is ``hybrid`` only where fusion beat
    the dense ranking (weight 1) there."""
    item_ids = np.asarray(item_ids, dtype=object)

    def ndcg10(fused: np.ndarray) -> float:
        run = {
            qid: item_ids[metrics.top_k(fused[r], excludes[r], 10)].tolist()
            for r, qid in enumerate(query_ids)
        }
        return metrics.evaluate_run(run, qrels, cutoffs=(10,))["ndcg@10"]

    weight, curve = fit_weight(dense, lexical, ndcg10)
    return {
        "method": "convex",
        "weight": weight,
        "fitted_on": "tuning",
        "queries": len(query_ids),
        "tuning_ndcg10": {str(w): round(q, 4) for w, q in curve.items()},
        "default": "hybrid" if curve[weight] > curve[1.0] else "dense",
    }
