"""The re-ranking stage of serving: one of MMR, calibration or the long-tail boost over F's
ranked candidates, through the same dispatch as ``kuberank evaluate --mmr-lambda /
--calibration / --tail-boost`` (kuberank/reranking.py).

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

from kuberank import reranking
from kuberank.calibration import CALIBRATION_ATTRIBUTE, group_matrix
from kuberank.diversity import RERANK_DEPTH
from kuberank.longtail import long_tail
from kuberank.reranking import KINDS


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
    """What the index offers the re-rankings (kuberank/reranking.py), computed once per
    loaded index."""

    def __init__(self, index):
        self.index = index
        groups = None
        values = (index.attributes or {}).get("values", {})
        if CALIBRATION_ATTRIBUTE in values:
            groups = group_matrix(values[CALIBRATION_ATTRIBUTE])[1]
        popularity = getattr(index, "popularity", None)
        tail = None
        if popularity is not None:
            tail = long_tail(np.asarray(popularity["counts"]))
        self.core = reranking.Reranker(index.embeddings, groups, tail)

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
        length: int | None = None,
    ) -> np.ndarray:
        """``order`` (positions into ``cands``, F's order) re-ranked, every position once: at
        least its first ``depth`` picks as the re-ranking makes them, then the rest in F's
        order (MMR picks ``depth`` of all candidates, calibration ``max(k, depth)`` of the top
        ``max(RERANK_DEPTH, depth)``, the boost re-orders those). ``length``: only the first
        ``length`` positions of it (None: all, what the caps walk)."""
        if kind == "mmr_lambda":
            head, picks = None, depth
        else:
            head, picks = max(RERANK_DEPTH, depth), max(k, depth)
        ranked = cands[order]
        positions = self.core.order(
            kind, value, ranked, scores[order], history_rows, picks, head, length
        )
        return order[positions]
