"""The request path as a list of stages, and its pure core.

:data:`STAGES` (encode, retrieve, rank) is the request path's order, in one place: the colocated
path (serving/pipeline.py) runs ``for stage in stages: stage.run_batch(batch, settings)`` and
the split path (serving/split.py) calls one deployment per stage in the same order, each one the
generic ``StageDeployment`` of serving/app.py named by ``stage.deployment``. A :class:`Stage` is
loaded from an opened store (``load``) and reads and fills the shared per-request object
(:class:`PipelineRequest`) of a batch (``run_batch``).

The core: retrieval (top-n candidates over the item index, BM25 and hybrid through
serving/hybrid.py, the policy's blocklist and a request's filter excluded) and ranking
(F(Q, B, I) of the store's model over the candidates, then a re-ranking and the policy's caps).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kuberank.errors import KuberankError
from kuberank.serving import hybrid
from kuberank.serving.explain import explain_rows
from kuberank.serving.filters import Filter, blocked_rows
from kuberank.serving.loading import ModelTables, OpenedStore
from kuberank.serving.policies import CAP_DEPTH, candidate_count, policy_decisions
from kuberank.serving.reranking import Reranker


class UnknownItemsError(KuberankError):
    def __init__(self, ids: list[str]):
        self.ids = ids
        super().__init__(f"unknown item ids: {ids[:10]}")


def history_query(index, history_rows: np.ndarray) -> np.ndarray:
    """Recommendation without query text: the normalised mean of the history's item vectors."""
    if len(history_rows) == 0:
        return np.zeros(index.dim, dtype=np.float32)
    mean = index.embeddings[history_rows].mean(0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-9)).astype(np.float32)


@dataclass
class RetrieveRequest:
    query: np.ndarray | None  # [D] or None (recommendation)
    history: list[str]
    n: int
    exclude_history: bool
    filter: Filter | None = None  # serving/filters.py: the rows it blocks are excluded
    text: str | None = None  # the query text (bm25, hybrid)
    retrieval: str = "dense"  # dense | bm25 | hybrid (serving/hybrid.py)
    policy_removed: int = 0  # set by retrieve_batch: blocked items (policy) among the candidates


def retrieve_batch(
    index, requests: list[RetrieveRequest], rank_all_max: int, lexical=None, timings=None
) -> list[tuple[np.ndarray, Any]]:
    """Candidate rows and their Q·I (or history-mean) scores for each request; a bm25 or
    hybrid request's from the ``lexical`` stage (serving/hybrid.py: a Fused instead of the
    scores; its seconds added to ``timings["lexical"]``). The policy's blocklist is excluded
    like a filter's rows."""
    vectors, excludes, others, out = [], [], [], [None] * len(requests)
    todo, fused, fused_excludes = [], [], []
    policy = getattr(index, "policy", None)  # its blocklist: excluded rows
    blocklist = policy is not None and len(policy.rows) > 0
    for i, req in enumerate(requests):
        rows, unknown = index.rows_of(req.history)
        if unknown:
            raise UnknownItemsError(unknown)
        exclude = rows if req.exclude_history else np.zeros(0, dtype=np.int64)
        if req.filter is not None:
            exclude = np.union1d(exclude, blocked_rows(index, req.filter))
        if req.retrieval != "dense":
            fused.append(i)  # the blocklist is excluded (and counted) by hybrid.retrieve
            fused_excludes.append(exclude)
            continue
        if req.query is None and len(index) <= rank_all_max:
            if blocklist:
                req.policy_removed = policy.removed(index, exclude, None, None, req.n)
                exclude = np.union1d(exclude, policy.rows)
            everything = np.setdiff1d(np.arange(len(index)), exclude)
            out[i] = (everything, np.zeros(len(everything), dtype=np.float32))
            continue
        vectors.append(req.query if req.query is not None else history_query(index, rows))
        excludes.append(np.union1d(exclude, policy.rows) if blocklist else exclude)
        others.append(exclude)
        todo.append(i)
    if todo:
        found_rows, found_scores = index.search(
            np.stack(vectors), max(r.n for r in requests), excludes
        )
        for j, i in enumerate(todo):
            n = requests[i].n
            out[i] = (found_rows[j][:n], found_scores[j][:n])
            if blocklist:
                requests[i].policy_removed = policy.removed(
                    index, others[j], vectors[j], out[i][1], n
                )
    if fused:
        found, seconds = hybrid.retrieve(
            index,
            lexical,
            [requests[i] for i in fused],
            fused_excludes,
            policy.rows if blocklist else None,
        )
        for i, result in zip(fused, found, strict=True):
            out[i] = result
        if timings is not None:
            timings["lexical"] = timings.get("lexical", 0.0) + seconds
    return out


def retrieve_each(index, requests: list[RetrieveRequest], *args) -> list:
    """:func:`retrieve_batch` (``args`` after the requests); when a request of the batch names
    unknown items, the good requests are answered one by one and each bad one gets its
    UnknownItemsError in its place."""
    try:
        return retrieve_batch(index, requests, *args)
    except UnknownItemsError:
        found: list = []
        for one in requests:
            try:
                found.append(retrieve_batch(index, [one], *args)[0])
            except UnknownItemsError as exc:
                found.append(exc)
        return found


@dataclass
class RankRequest:
    query: np.ndarray | None
    candidates: np.ndarray  # index rows
    history: list[str]
    user_id: str | None
    k: int
    explain: bool = False  # also the terms of F behind each returned score (serving/explain.py)
    # one re-ranking of the candidates (serving/reranking.py): (kind, value); None = off
    reranking: tuple[str, float] | None = None
    fused: Any = None  # bm25/hybrid: the candidates' hybrid.Fused scores rank them, not F
    capped: int = 0  # set by RankerCore.rank: items the policy's caps moved out of the top k


class RankerCore:
    """F(Q, B, I) over candidate rows; Q·I when the store has no kuberank model."""

    def __init__(self, index, tables: ModelTables, model_dir: Path | None):
        import torch  # local: heavy, the PyTorch scorer only

        torch.set_num_threads(1)
        self.torch, self.index, self.tables = torch, index, tables
        self.reranker = Reranker(index)  # MMR, calibration, the long-tail boost
        self.scorer = None
        if tables.info is not None:
            from kuberank.model import load_scorer

            self.scorer = load_scorer(model_dir, tables.info)
            model_items = {iid: i for i, iid in enumerate(tables.info.item_ids)}
            unknown = tables.info.scorer.n_items
            self.model_rows = torch.tensor(
                [model_items.get(i, unknown) for i in index.ids], dtype=torch.long
            )
            self.text = torch.from_numpy(index.embeddings)
            # the items' behaviour vectors depend on the model only: once per load, not per
            # request (they were more than half of a recommendation's ranking time)
            self.item_behaviour = None
            if tables.info.scorer.use_behaviour:
                with torch.no_grad():
                    self.item_behaviour = self.scorer.behaviour_vectors(self.text, self.model_rows)

    def rank(self, req: RankRequest) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        cands = np.asarray(req.candidates, dtype=np.int64)
        if len(cands) == 0:
            return cands, np.zeros(0, dtype=np.float32)
        if req.fused is not None:
            scores = req.fused.scores
        elif self.scorer is None:
            if req.query is None:
                query = history_query(self.index, self.index.rows_of(req.history)[0])
            else:
                query = req.query
            scores = self.index.embeddings[cands] @ query
        else:
            with torch.no_grad():
                scores = self.scorer(**self.scorer_inputs(req, cands)[0])[0].numpy()
        scores = np.asarray(scores, dtype=np.float64)
        order = np.lexsort((cands, -scores))
        policy = getattr(self.index, "policy", None)
        caps = policy is not None and bool(policy.rules.caps)
        if req.reranking is not None:  # serving/reranking.py; the caps walk the new order
            kind, value = req.reranking
            depth = min(len(order), CAP_DEPTH * req.k) if caps else req.k
            history = self.index.rows_of(req.history)[0]
            length = None if caps else req.k  # without caps only the first k are read
            order = self.reranker.order(
                kind, value, cands, order, scores, history, req.k, depth, length
            )
        if caps:  # the policy's caps per group (serving/policies.py)
            top, req.capped = policy.cap(cands, order, req.k)
        else:
            top = order[: req.k]
        return cands[top], scores[top].astype(np.float32)

    def scorer_inputs(self, req: RankRequest, cands: np.ndarray) -> tuple[dict, np.ndarray]:
        """F's arguments for one request over candidate rows, and the history's index rows
        as F sees them ([1, L], right-aligned, -1 = padding)."""
        from kuberank.model import pad_histories

        torch, info = self.torch, self.tables.info
        hist_rows = self.index.rows_of(req.history)[0]
        padded = pad_histories([hist_rows], info.scorer.max_history)
        hist = torch.from_numpy(padded)
        hist_model = torch.where(
            hist >= 0, self.model_rows[hist.clamp(min=0)], torch.full_like(hist, -1)
        )
        user = (
            self.tables.user_row.get(req.user_id, info.scorer.n_users)
            if req.user_id
            else info.scorer.n_users
        )
        cand_t = torch.from_numpy(np.asarray(cands, dtype=np.int64))
        query = None if req.query is None else torch.from_numpy(np.asarray(req.query)[None, :])
        inputs = {
            "item_text": self.text[cand_t],
            "item_index": self.model_rows[cand_t],
            "query": query,
            "history": hist_model,
            "history_text": self.text[hist.clamp(min=0)],
            "users": torch.tensor([user], dtype=torch.long),
            "item_behaviour": None if self.item_behaviour is None else self.item_behaviour[cand_t],
        }
        return inputs, padded


@dataclass
class PipelineRequest:
    """One ranking request, as both request paths take it; the stages read it and fill it in
    (the split path sends it from deployment to deployment)."""

    query: str | None
    history: list[str]
    user_id: str | None
    k: int
    exclude_history: bool
    explain: bool = False
    filter: Filter | None = None
    reranking: tuple[str, float] | None = None  # serving/reranking.py
    # set by the rank stage: the policy's decisions on it, {(policy, action): count}
    decisions: dict | None = None
    retrieval: str = "dense"  # serving/hybrid.py
    # filled by the stages
    vector: np.ndarray | None = None  # encode (or Triton, colocated): the query's vector
    fallback: bool = False  # encode: encoded in process because Triton failed
    candidates: np.ndarray | None = None  # retrieve: index rows
    found: Any = None  # retrieve: their Q·I (or history-mean) scores, or a hybrid.Fused
    policy_removed: int = 0  # retrieve: blocked items (policy) among the candidates
    result: tuple | None = None  # rank: (ids, scores, each item's explain or None)
    version: tuple[str, str] | None = None  # rank: (model version, fingerprint) it ranked with
    error: Exception | None = None  # a stage's answer for this request alone (unknown items)


class Stage:
    """One step of the request path. ``load`` builds it from an opened store (each part read
    once per replica, shared by the stages that use it); ``run_batch`` reads and fills a batch
    of requests (skipping those with an ``error``) and returns extra seconds to report (e.g.
    ``{"lexical": s}``), or ``{}``. ``run_batch_async`` is what its own deployment awaits."""

    name = ""  # its metric stage label (serving/metrics.py)
    deployment = ""  # its Serve deployment in the split path (the chart names it)
    batch = "ranker_batch"  # the Settings field with its deployment's (max_batch_size, wait)

    @classmethod
    def load(cls, store: OpenedStore, settings, encoding) -> "Stage":
        raise NotImplementedError

    @staticmethod
    def wants(request: PipelineRequest) -> bool:
        """Whether ``request`` goes through this stage (its metric and its call)."""
        return True

    @staticmethod
    def extras(request: PipelineRequest) -> tuple[str, ...]:
        """The extra seconds of ``run_batch`` that concern ``request`` (each observed under
        its own stage label)."""
        return ()

    def run_batch(self, requests: list[PipelineRequest], settings) -> dict[str, float]:
        raise NotImplementedError

    async def run_batch_async(self, requests: list[PipelineRequest], settings) -> dict:
        return self.run_batch(requests, settings)


class Encode(Stage):
    """Query texts -> vectors, in process (ONNX Runtime). Colocated, Triton's vectors come
    before the stages run (serving/pipeline.py, on the event loop); the QueryEncoder deployment
    awaits Triton here (``run_batch_async``), with the ``triton_fallback`` policy."""

    name, deployment, batch = "encode", "QueryEncoder", "encoder_batch"
    _pool: ThreadPoolExecutor | None = None  # the deployment's in-process encodes, one at a time

    def __init__(self, encoding, local):
        self.encoding, self.local = encoding, local

    @classmethod
    def load(cls, store, settings, encoding):
        return cls(encoding, encoding.load_local(store.uri, store.manifest))

    @staticmethod
    def wants(request):
        return request.query is not None

    @staticmethod
    def _todo(requests):
        return [r for r in requests if r.error is None and r.query is not None and r.vector is None]

    def run_batch(self, requests, settings):
        todo = self._todo(requests)
        if todo:
            for r, vector in zip(todo, self.local.encode([r.query for r in todo]), strict=True):
                r.vector = vector
        return {}

    async def run_batch_async(self, requests, settings):
        todo = self._todo(requests)
        texts = [r.query for r in todo]
        vectors = await self.encoding.remote(texts)
        if vectors is None:
            if Encode._pool is None:
                Encode._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
            loop = asyncio.get_running_loop()
            vectors = await loop.run_in_executor(Encode._pool, self.local.encode, texts)
            for r in todo:
                r.fallback = self.encoding.triton is not None
        for r, vector in zip(todo, vectors, strict=True):
            r.vector = vector
        return {}


class Retrieve(Stage):
    """Top-n candidates per request (:func:`retrieve_each`); a request naming unknown items
    gets its UnknownItemsError as its ``error``."""

    name, deployment, batch = "retrieve", "Retriever", "retriever_batch"

    def __init__(self, index, lexical):
        self.index, self.lexical = index, lexical

    @classmethod
    def load(cls, store, settings, encoding):
        return cls(store.index(), store.lexical())

    @staticmethod
    def extras(request):
        return ("lexical",) if request.retrieval != "dense" else ()  # BM25 + fusion

    def run_batch(self, requests, settings):
        live = [r for r in requests if r.error is None]
        policy, timings = self.index.policy, {"lexical": 0.0}
        asks = [
            RetrieveRequest(
                r.vector,
                r.history,
                candidate_count(policy, r.k, settings.candidates),
                r.exclude_history,
                r.filter,
                text=r.query,
                retrieval=r.retrieval,
            )
            for r in live
        ]
        args = (settings.rank_all_max, self.lexical, timings)
        for r, ask, found in zip(live, asks, retrieve_each(self.index, asks, *args), strict=True):
            if isinstance(found, Exception):
                r.error = found
            else:
                r.candidates, r.found = found
                r.policy_removed = ask.policy_removed
        return timings


class Rank(Stage):
    """F(Q, B, I) over each request's candidates (:class:`RankerCore`), its explanation when
    asked, and the policy's decisions."""

    name, deployment, batch = "rank", "Ranker", "ranker_batch"

    def __init__(self, core: "RankerCore", version: tuple[str, str]):
        self.core, self.version = core, version

    @classmethod
    def load(cls, store, settings, encoding):
        index = store.index()
        tables, model_dir = store.tables()
        version = (store.version, store.embedding_fingerprint)
        return cls(RankerCore(index, tables, model_dir), version)

    def run_batch(self, requests, settings):
        core = self.core
        for r in requests:
            if r.error is not None:
                continue
            fused = r.found if r.retrieval != "dense" else None
            ask = RankRequest(
                r.vector, r.candidates, r.history, r.user_id, r.k, r.explain, r.reranking, fused
            )
            rows, scores = core.rank(ask)
            r.decisions = policy_decisions(r.policy_removed, ask.capped)
            why = explain_rows(core, ask, rows) if r.explain else None
            r.result = ([core.index.ids[i] for i in rows], scores.tolist(), why)
            r.version = self.version
        return {}


# The request path, in order. A new stage: one Stage subclass and its entry here.
STAGES: list[type[Stage]] = [Encode, Retrieve, Rank]
