"""The colocated request path: one Ingress replica runs encode + retrieve + rank itself, a batch
at a time on its batch workers (serving/batching.py), on a :class:`Pipeline` (everything it
serves one model version with, swapped in one assignment on reload)."""

import asyncio
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kuberank.serving import hybrid
from kuberank.serving.admission import Admission, Overloaded
from kuberank.serving.encoders import EncoderUnavailableError, InProcessEncoder, QueryEncoding
from kuberank.serving.explain import explain_rows
from kuberank.serving.filters import Filter
from kuberank.serving.loading import load_checked_index, model_version, read_model_tables
from kuberank.serving.policies import candidate_count, policy_decisions
from kuberank.serving.settings import Settings
from kuberank.serving.stages import RankerCore, RankRequest, RetrieveRequest, retrieve_each


@dataclass
class PipelineRequest:
    """One ranking request, as both request paths take it."""

    query: str | None
    history: list[str]
    user_id: str | None
    k: int
    exclude_history: bool
    explain: bool = False
    filter: Filter | None = None
    reranking: tuple[str, float] | None = None  # serving/reranking.py
    # set by the request path: the policy's decisions on it, {(policy, action): count}
    decisions: dict | None = None
    retrieval: str = "dense"  # serving/hybrid.py


def rank_response(
    version: tuple[str, str], kind: str, ids: list[str], scores, explained: list | None = None
) -> dict:
    """The body of a /search or /recommend answer (RankResponse); ``explained``: each item's
    ``explain`` object (serving/explain.py) when the request asked for them."""
    items = [{"id": i, "score": float(s)} for i, s in zip(ids, scores, strict=True)]
    for item, why in zip(items, explained or [], strict=False):
        item["explain"] = why
    return {"model_version": version[0], "fingerprint": version[1], "kind": kind, "items": items}


class QueuedRequest(NamedTuple):
    """What the Ingress queues for its batch workers."""

    request: PipelineRequest
    queued_at: float  # time.perf_counter() at submit
    budget_s: float  # its latency budget, counted from queued_at
    pipeline: "Pipeline"  # the model version current when it arrived
    loop: asyncio.AbstractEventLoop  # the Ingress event loop: Triton's gRPC channel lives there


@dataclass
class Pipeline:
    """Everything one colocated Ingress replica serves a model version with; swapped in one
    assignment on reload, so a batch runs on one consistent version."""

    version: str
    fingerprint: str
    kind: str
    users: dict[str, int]
    items: dict[str, int]
    store: str
    index: Any = None
    ranker: RankerCore | None = None
    local: InProcessEncoder | None = None
    lexical: Any = None  # hybrid.LexicalStage: STORE/lexical, None without one

    def run(
        self,
        reqs: list[PipelineRequest],
        vectors: np.ndarray | None,
        candidates: int,
        rank_all_max: int,
    ) -> tuple[list, dict]:
        """Encode (unless ``vectors`` came from Triton) + retrieve + rank a batch; per request
        (ids, scores) or the request's exception; and the seconds each stage took."""
        timings = {"encode": 0.0, "retrieve": 0.0, "rank": 0.0, "lexical": 0.0}
        texts = [r.query for r in reqs if r.query is not None]
        t = time.perf_counter()
        if texts and vectors is None:
            vectors = self.local.encode(texts)
        timings["encode"] = time.perf_counter() - t
        queries, j = [], 0
        for r in reqs:
            if r.query is None:
                queries.append(None)
            else:
                queries.append(vectors[j])
                j += 1
        t = time.perf_counter()
        n = [candidate_count(self.index.policy, r.k, candidates) for r in reqs]
        retrieve = [
            RetrieveRequest(
                q,
                r.history,
                m,
                r.exclude_history,
                r.filter,
                text=r.query,
                retrieval=r.retrieval,
            )
            for q, r, m in zip(queries, reqs, n, strict=True)
        ]
        found = retrieve_each(self.index, retrieve, rank_all_max, self.lexical, timings)
        timings["retrieve"] = time.perf_counter() - t
        t = time.perf_counter()
        out: list = []
        for q, r, f, one in zip(queries, reqs, found, retrieve, strict=True):
            if isinstance(f, Exception):
                out.append(f)
                continue
            fused = f[1] if r.retrieval != "dense" else None
            ranked = RankRequest(q, f[0], r.history, r.user_id, r.k, r.explain, r.reranking, fused)
            rows, scores = self.ranker.rank(ranked)
            r.decisions = policy_decisions(one.policy_removed, ranked.capped)
            why = explain_rows(self.ranker, ranked, rows) if r.explain else None
            out.append(([self.index.ids[i] for i in rows], scores.tolist(), why))
        timings["rank"] = time.perf_counter() - t
        return out, timings


def load_pipeline(store: str, encoding: QueryEncoding | None) -> Pipeline:
    """The colocated replica's model: checked index, F, and the in-process encoder."""
    manifest, index = load_checked_index(store)
    tables, model_dir = read_model_tables(store, index.meta.get("kind", "search"))
    pipe = Pipeline(
        model_version(manifest),
        manifest["embedding"]["fingerprint"],
        tables.kind,
        tables.user_row,
        index.row,
        store,
        index,
    )
    if encoding is not None:
        pipe.ranker = RankerCore(store, index, tables, model_dir)
        pipe.local = encoding.load_local(store, manifest)
    pipe.lexical = hybrid.load_stage(store, index.ids)  # split path too: each request's default
    return pipe


def run_queued(
    items: list[QueuedRequest], admission: Admission, encoding: QueryEncoding, settings: Settings
) -> list:
    """The colocated request path, on the batcher's thread: one batch of encode + retrieve +
    rank; per item (its result, its seconds in the queue, the batch's meta or None). A request
    whose deadline passed while it waited is dropped here, before compute (Overloaded
    "expired")."""
    started = time.perf_counter()
    out: list = [None] * len(items)
    live = []
    for i, item in enumerate(items):
        shed = admission.expired(started - item.queued_at, item.budget_s)
        if shed is None:
            live.append(i)
        else:
            out[i] = (shed, started - item.queued_at, None)
    if not live:
        return out
    batch = [items[i] for i in live]
    pipe, loop = batch[-1].pipeline, batch[-1].loop  # the batch's newest model
    reqs = [item.request for item in batch]
    texts = [r.query for r in reqs if r.query is not None]
    vectors, remote_s, fallback = None, 0.0, 0
    try:
        if texts and encoding.triton is not None:
            vectors = encoding.remote_from_thread(texts, loop)
            remote_s = time.perf_counter() - started
            fallback = len(texts) if vectors is None else 0
        results, timings = pipe.run(reqs, vectors, settings.candidates, settings.rank_all_max)
    except (EncoderUnavailableError, Overloaded) as exc:  # Triton down or shedding
        results, timings = [exc] * len(batch), None
    admission.observe(len(batch), time.perf_counter() - started)
    meta = None
    if timings is not None:
        timings["encode"] += remote_s
        meta = {
            "batch": len(batch),
            "timings": timings,
            "fallback": fallback,
            "version": (pipe.version, pipe.fingerprint),
        }
    for i, result in zip(live, results, strict=True):
        out[i] = (result, started - items[i].queued_at, meta)
    return out
