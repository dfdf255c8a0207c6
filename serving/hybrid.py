"""Lexical and hybrid retrieval in serving: BM25 over the store's lexical index (STORE/lexical,
:mod:`kuberank.lexical`) fused with Q·I (:mod:`kuberank.fusion`), as a retrieval stage of its
own beside the dense one (kuberank/item_index.py).

A /search request retrieves with ``retrieval``: ``dense`` (Q·I, top-n from the item index),
``bm25`` (BM25 alone) or ``hybrid`` (both fused with the store's recorded fusion: convex with
the weight fitted on the tuning queries by ``kuberank index``, or RRF where there were none).
Unset, the store decides: ``hybrid`` where its lexical index recorded ``default: hybrid``
(fusion beat dense on the tuning queries), else ``dense``.

The fused scores are computed over every item, exactly as ``kuberank evaluate --retrieval
hybrid`` does (min-max normalisation and ranks are over the whole row), then the request's
excluded rows (filter, history) are removed and the top n kept. The rank stage orders these
candidates by their fused score (F is not applied to them: the fusion weight was fitted on
Q·I, and the offline evaluation ranks by the fused score too); MMR and filters work as with
dense candidates, and ``explain`` gives the two terms of the fused score, ``dense`` and
``lexical``, which sum to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from kuberank import fusion
from kuberank.errors import KuberankError
from kuberank.lexical import META_FILE, LexicalIndex, read_meta
from kuberank.metrics import top_k
from kuberank.serving.policies import among_found
from kuberank.storage import materialize_if_present
from kuberank.store import LEXICAL_DIR, store_path

RETRIEVALS = ("dense", "bm25", "hybrid")
BUILD_HINT = "build it with `kuberank index --model DIR --dataset SPEC --out STORE`"


class RetrievalUnavailable(KuberankError):
    """A request asked for lexical retrieval from a store without a lexical index."""


@dataclass
class Fused:
    """The retrieval scores of a lexical or hybrid request's candidate rows (what ranks them)
    and the terms that sum to each (``dense``, ``lexical``; for ``explain``)."""

    rows: np.ndarray
    scores: np.ndarray
    terms: dict[str, np.ndarray]

    def explain(self, rows: np.ndarray) -> list[dict]:
        where = {int(r): i for i, r in enumerate(self.rows)}
        picked = [where[int(r)] for r in rows]
        return [{name: float(v[i]) for name, v in self.terms.items()} for i in picked]


class LexicalInfo:
    """What a store's lexical index says of itself (its lexical.json): the fusion ``kuberank
    index`` recorded and the store's default retrieval. The split path's Ingress needs only
    this (:func:`load_info`); the stage that retrieves loads BM25 too (:class:`LexicalStage`)."""

    def __init__(self, meta: dict):
        self.fusion = dict(meta.get("fusion") or {"method": "rrf", "default": "dense"})
        self.default = self.fusion.get("default", "dense")


class LexicalStage(LexicalInfo):
    """A store's lexical index, ready to serve: BM25 over the index's items (same order) and
    the fusion ``kuberank index`` recorded."""

    def __init__(self, lexical, ids: list[str]):
        if list(lexical.ids) != list(ids):
            raise KuberankError(
                "STORE/lexical: its items are not the dense index's (same ids, same order); "
                + BUILD_HINT
            )
        super().__init__(lexical.meta)
        self.lexical = lexical

    def terms(self, dense: np.ndarray, lexical: np.ndarray) -> dict[str, np.ndarray]:
        return fusion.terms(dense, lexical, self.fusion["method"], self.fusion.get("weight"))


def load_stage(store: str, ids: list[str]) -> LexicalStage | None:
    """STORE/lexical for the items ``ids`` (the dense index's), or None when the store has none."""
    directory = materialize_if_present(store_path(store, LEXICAL_DIR))  # denied: raises
    if directory is None or not (directory / META_FILE).is_file():
        return None
    return LexicalStage(LexicalIndex.load(directory), ids)


def load_info(store: str) -> LexicalInfo | None:
    """STORE/lexical's :class:`LexicalInfo` from its lexical.json alone (from S3, that file
    alone), or None when the store has no lexical index."""
    meta_file = materialize_if_present(store_path(store, LEXICAL_DIR, META_FILE))
    if meta_file is None:
        return None
    return LexicalInfo(read_meta(meta_file))


def served_schema(schema: dict, stage: LexicalInfo | None) -> dict:
    """The OpenAPI schema of an app serving a store with (or without) a lexical index: without
    one, ``SearchRequest.retrieval`` offers ``dense`` only (bm25/hybrid are schema-invalid
    there, and answered 422)."""
    if stage is not None:
        return schema
    prop = schema["components"]["schemas"]["SearchRequest"]["properties"]["retrieval"]
    for option in prop.get("anyOf", []):
        if "enum" in option:
            option["enum"] = ["dense"]
    return schema


def choose(requested: str | None, stage: LexicalInfo | None) -> str:
    """A /search request's retrieval: the one it asked for, else the store's default."""
    if requested is None:
        return stage.default if stage is not None else "dense"
    if requested not in RETRIEVALS:
        raise RetrievalUnavailable(f"one of {', '.join(RETRIEVALS)}, got {requested!r}")
    if requested != "dense" and stage is None:
        raise RetrievalUnavailable(
            f"{requested!r} needs the store's lexical index (STORE/lexical), which this store "
            f"has not; {BUILD_HINT}"
        )
    return requested


def retrieve(
    index,
    stage: LexicalStage,
    requests: list,
    excludes: list[np.ndarray],
    blocked: np.ndarray | None = None,
) -> tuple[list[tuple[np.ndarray, Fused]], float]:
    """Candidates of lexical and hybrid requests (kuberank.serving.stages.RetrieveRequest with
    ``text``, ``retrieval`` and, for hybrid, the query vector): per request its top ``n`` rows
    by fused score without ``excludes[i]`` and the policy's ``blocked`` rows, and their
    :class:`Fused`; and the seconds taken. Each request's ``policy_removed``: the blocked rows
    (not otherwise excluded) that would have been among its n."""
    started = time.perf_counter()
    lexical = stage.lexical.scores([r.text for r in requests])
    hybrid = [i for i, r in enumerate(requests) if r.retrieval == "hybrid"]
    dense = {}
    if hybrid:
        vectors = np.stack([np.asarray(requests[i].query, dtype=np.float32) for i in hybrid])
        dense = dict(zip(hybrid, vectors @ index.embeddings.T, strict=True))
    out = []
    for i, req in enumerate(requests):
        if req.retrieval == "hybrid":
            parts = {k: v[0] for k, v in stage.terms(dense[i], lexical[i]).items()}
            scores = parts["dense"] + parts["lexical"]
        else:  # bm25
            scores = lexical[i].astype(np.float64)
            parts = {"lexical": scores}
        exclude = excludes[i]
        if blocked is not None and len(blocked):
            own = np.setdiff1d(blocked, exclude)
            exclude = np.union1d(exclude, own)
        rows = top_k(scores, exclude, req.n)
        if blocked is not None and len(blocked):
            req.policy_removed = among_found(scores[own], scores[rows], req.n)
        out.append((rows, Fused(rows, scores[rows], {k: v[rows] for k, v in parts.items()})))
    return out, time.perf_counter() - started
