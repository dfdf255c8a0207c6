"""Explanations: the terms of F(Q, B, I) behind each returned item's score.

``"explain": true`` on /search and /recommend adds to each item an ``explain`` object with the
terms as they entered its score (they sum to ``score``):

- ``relevance``: w_rel * Q·I (a store without a kuberank model: Q·I, the whole score),
- ``behaviour``: w_beh * sum_k a_k B_k·I, with ``history``: the history items that contributed
  most (at most :data:`TOP_HISTORY`, largest contribution first), each with its attention
  weight a_k and its contribution w_beh a_k B_k·I (a store without a kuberank model ranks a
  recommendation by the mean of the history's vectors: each item weighs 1/n),
- ``collaborative``: w_cf * (U·V + b).

A term is present only when it entered the score: a /search on a search model explains with
``relevance`` only. A /search with ``retrieval`` bm25 or hybrid is ranked by its fused score
(serving/hybrid.py) and explains it with ``dense`` and ``lexical`` instead. Both request paths (colocated and the stage deployments), with query vectors
from Triton or from ONNX Runtime in process, score on the Ranker's :class:`RankerCore`; the
explanation is computed there from the same parts (:meth:`kuberank.model.Scorer.terms`), for
the k returned items only.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from kuberank.errors import KuberankError
from kuberank.serving.hybrid import choose
from kuberank.serving.policies import BlockedQuery

TOP_HISTORY = 3
FUSION_TERMS = ("dense", "lexical")  # a bm25/hybrid score's terms (kuberank.fusion.terms)


def explain_rows(core, req, rows: np.ndarray) -> list[dict]:
    """The ``explain`` object of each of ``rows`` (index rows, the ranked answer of ``req``, a
    kuberank.serving.stages.RankRequest) on ``core`` (a RankerCore)."""
    from kuberank.model import TERMS  # (torch: imported when an explanation is asked for)

    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    if req.fused is not None:  # bm25/hybrid: the fused score's terms (serving/hybrid.py)
        return req.fused.explain(rows)
    index = core.index
    if core.scorer is None:  # F = Q·I, or the history's mean vector · I
        if req.query is not None:
            relevance = index.embeddings[rows] @ np.asarray(req.query, dtype=np.float32)
            return [{"relevance": float(x)} for x in relevance]
        hist_rows = index.rows_of(req.history)[0]
        if len(hist_rows) == 0:
            return [{"behaviour": 0.0, "history": []} for _ in rows]
        vecs = index.embeddings[hist_rows].astype(np.float64)
        norm = max(float(np.linalg.norm(vecs.mean(0))), 1e-9)
        contribution = vecs @ index.embeddings[rows].T.astype(np.float64) / (len(vecs) * norm)
        attention = np.full_like(contribution, 1.0 / len(vecs))
        terms = {"behaviour": contribution.sum(0)}
        return _items(terms, hist_rows, attention, contribution, index.ids)
    import torch

    inputs, padded = core.scorer_inputs(req, rows)
    with torch.no_grad():
        parts = {
            name: value[0].double().numpy() for name, value in core.scorer.terms(**inputs).items()
        }
    terms = {name: parts[name] for name in TERMS if name in parts}
    positions = padded[0]
    return _items(terms, positions, parts.get("attention"), parts.get("contribution"), index.ids)


def _items(terms, history_rows, attention, contribution, ids) -> list[dict]:
    """Per item, its terms and (with a behaviour term) its top history items; history
    positions holding the same item are merged (weights and contributions added)."""
    n = len(next(iter(terms.values())))
    out = []
    for j in range(n):
        item = {name: float(values[j]) for name, values in terms.items()}
        if "behaviour" in terms and attention is not None:
            merged: dict[int, list[float]] = {}
            for pos, row in enumerate(history_rows):
                if row < 0:
                    continue
                entry = merged.setdefault(int(row), [0.0, 0.0])
                entry[0] += float(attention[pos, j])
                entry[1] += float(contribution[pos, j])
            top = sorted(merged.items(), key=lambda kv: (-kv[1][1], kv[0]))[:TOP_HISTORY]
            item["history"] = [
                {"id": ids[row], "attention": a, "contribution": c} for row, (a, c) in top
            ]
        out.append(item)
    return out


def total(explanation: dict) -> float:
    """The sum of an explanation's terms (what the item's score is)."""
    from kuberank.model import TERMS

    return sum(explanation.get(name, 0.0) for name in (*TERMS, *FUSION_TERMS))


def explain_offline(
    store: str, query: str | None = None, history=(), user_id: str | None = None, k: int = 10
) -> dict:
    """``kuberank explain``: the answer /search (with ``query``) or /recommend (without) gives
    with ``"explain": true``, computed in this process on the store's in-process encoder,
    index and F (no server)."""
    # local: circular (stages imports this module; these import stages)
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import PipelineRequest, load_pipeline, rank_response
    from kuberank.serving.settings import Settings

    if query is not None and not query.strip():
        raise KuberankError("--query: blank")
    if query is None and not history and user_id is None:
        raise KuberankError("--history or --user-id: a recommendation needs a signal")
    if k < 1:
        raise KuberankError(f"--k: need >= 1, got {k}")
    settings = Settings()
    pipe = load_pipeline(store, QueryEncoding("", settings))
    unknown = [h for h in history if h not in pipe.items]
    if unknown:
        raise KuberankError(f"--history: unknown item ids {unknown[:20]}")
    if user_id is not None and (pipe.users or query is None) and user_id not in pipe.users:
        raise KuberankError(f"--user-id: {user_id!r} is not a user of this model")
    if query is not None:  # the store's policy screens the query as /search does
        query = screened(pipe.index.policy, query)
        if query is None:  # the policy cut every term of the query: nothing to search
            return rank_response((pipe.version, pipe.fingerprint), pipe.kind, [], [])
    request = PipelineRequest(query, list(history), user_id, k, query is None, True)
    if query is not None:  # a search retrieves as /search does by default (serving/hybrid.py)
        request.retrieval = choose(None, pipe.lexical)
    [(ids, scores, why)], _ = pipe.run([request], None, settings)
    return rank_response((pipe.version, pipe.fingerprint), pipe.kind, ids, scores, why)


def screened(policy, query: str) -> str | None:
    """``query`` as the store's policy (serving/policies.py) lets /search through: unchanged,
    with the blocked terms cut out (``filter``; None when nothing is left), or refused with a
    CLI error naming the policy (``reject``, where /search answers 422 at ``query``)."""
    if policy is None:
        return query
    try:
        return policy.screen(query)[0]
    except BlockedQuery as exc:
        raise KuberankError(
            f"--query: {exc} (policy {policy.version}, fingerprint {policy.fingerprint}, "
            f"on_blocked_term: {policy.rules.on_blocked_term})"
        ) from None


# --------------------------------------------------------------------------- response schema


class HistoryContribution(BaseModel):
    id: str = Field(description="a history item")
    attention: float = Field(description="its attention weight over this item (a_k)")
    contribution: float = Field(description="its share of the behaviour term: w_beh a_k B_k·I")


class Explanation(BaseModel):
    """The terms of F(Q, B, I) as they entered the item's score; present terms sum to it."""

    relevance: float | None = Field(None, description="w_rel * Q·I (absent without query text)")
    behaviour: float | None = Field(
        None, description="w_beh * attention-weighted history similarity (absent without it)"
    )
    collaborative: float | None = Field(
        None, description="w_cf * (U·V + b) (absent for a model without the term)"
    )
    dense: float | None = Field(
        None,
        description="retrieval hybrid: the dense part of the fused score (convex: weight * "
        "min-max normalised Q·I; rrf: 1 / (60 + its Q·I rank))",
    )
    lexical: float | None = Field(
        None,
        description="retrieval bm25: the BM25 score; hybrid: the lexical part of the fused "
        "score (convex: (1 - weight) * min-max normalised BM25; rrf: 1 / (60 + its BM25 rank))",
    )
    history: list[HistoryContribution] | None = Field(
        None,
        description=f"with behaviour: the (at most {TOP_HISTORY}) history items that "
        "contributed most, largest first",
    )
