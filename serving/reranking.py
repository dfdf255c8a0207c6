"""The re-ranking stage of serving: one of MMR, calibration or the long-tail boost over F's
ranked candidates, the same cores as ``kuberank evaluate --mmr-lambda / --calibration /
--tail-boost`` (kuberank/diversity.py, kuberank/calibration.py, kuberank/longtail.py).

A request names exactly one in its ``diversity`` object (``{"mmr_lambda": L}``,
``{"calibration": L}`` or ``{"tail_boost": B}``); the ``mmr_lambda``, ``calibration`` and
``tail_boost`` settings of ``build_app`` (at most one) apply to requests without one. What each
needs from the index:

- MMR: the index vectors (every index has them);
- calibration: the items' ``genres`` (STORE/index/attributes.json) and the request's history;
- the long-tail boost: the items' training popularity (STORE/index/popularity.json, written by
  ``kuberank index`` for an interaction log).

A request that asks for one its index cannot serve is answered 422 at
``diversity.<field>``; a default setting the index cannot serve refuses the model at load.
"""

from __future__ import annotations

import numpy as np

from kuberank.calibration import CALIBRATION_ATTRIBUTE, calibrate, group_matrix, target
from kuberank.diversity import RERANK_DEPTH, mmr
from kuberank.longtail import boosted_order, novelty

KINDS = ("mmr_lambda", "calibration", "tail_boost")


def missing(index, kind: str) -> str | None:
    """Why ``index`` cannot serve the re-ranking ``kind`` (None: it can)."""
    if kind not in KINDS:
        return f"one of {', '.join(KINDS)}, got {kind!r}"
    fields = (index.attributes or {}).get("fields", {})
    if kind == "calibration" and CALIBRATION_ATTRIBUTE not in fields:
        return (
            f"calibrates to the {CALIBRATION_ATTRIBUTE!r} of the history; this index holds no "
            "such item attribute"
        )
    if kind == "tail_boost" and getattr(index, "popularity", None) is None:
        return (
            "needs the items' popularity, which `kuberank index` keeps for an interaction log; "
            "this index has none"
        )
    return None


def served_schema(schema: dict, index) -> dict:
    """The OpenAPI schema of an app serving ``index``: ``Diversity`` lists only the
    re-rankings this index can serve (a request naming another is schema-invalid: 422)."""
    diversity = schema["components"]["schemas"].get("Diversity")
    if diversity is not None:
        for kind in KINDS:
            if missing(index, kind) is not None:
                diversity["properties"].pop(kind, None)
    return schema


class Reranker:
    """What the index offers the re-rankings, computed once per loaded index."""

    def __init__(self, index):
        self.index = index
        self.groups = None
        values = (index.attributes or {}).get("values", {})
        if CALIBRATION_ATTRIBUTE in values:
            self.groups = group_matrix(values[CALIBRATION_ATTRIBUTE])[1]
        popularity = getattr(index, "popularity", None)
        self.novelty = None
        if popularity is not None:
            self.novelty = novelty(np.asarray(popularity["counts"]), popularity["users"])

    def order(
        self,
        kind: str,
        value: float,
        cands: np.ndarray,
        order: np.ndarray,
        scores: np.ndarray,
        history_rows: np.ndarray,
        k: int,
        depth: int,
    ) -> np.ndarray:
        """``order`` (positions into ``cands``, F's order) re-ranked: at least its first
        ``depth`` picks as the re-ranking makes them; with MMR only those (its picks are all
        that is returned), otherwise the rest as they were."""
        if kind == "mmr_lambda":
            vectors = self.index.embeddings[cands[order]]
            return order[mmr(scores[order], vectors, value, depth)]
        head = order[: max(RERANK_DEPTH, depth)]
        if kind == "calibration":
            p = target(self.groups, history_rows)
            if p is None:  # no grouped history: nothing to calibrate to
                return order
            picks = calibrate(scores[head], self.groups[cands[head]], p, value, max(k, depth))
        else:
            picks = boosted_order(scores[head], self.novelty[cands[head]], value)
        return np.concatenate([head[picks], order[len(head) :]])
