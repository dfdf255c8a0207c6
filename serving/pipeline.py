"""The colocated request path: one Ingress replica runs the stages (serving/stages.py: encode,
retrieve, rank) itself, a batch at a time on its batch workers (serving/batching.py), on a
:class:`Pipeline` (everything it serves one model version with, swapped in one assignment on
reload)."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from kuberank.serving.admission import Admission, Overloaded
from kuberank.serving.encoders import EncoderUnavailableError, QueryEncoding
from kuberank.serving.loading import OpenedStore
from kuberank.serving.settings import Settings
from kuberank.serving.stages import STAGES, PipelineRequest, Stage


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
    index: Any = None  # item_index.ItemIndex; on the split path's Ingress its ItemCatalogue
    # STORE/lexical, None without one: hybrid.LexicalStage, or on the split path's Ingress its
    # hybrid.LexicalInfo (the default retrieval)
    lexical: Any = None
    stages: list[Stage] = field(default_factory=list)  # STAGES, loaded (colocated only)

    def run(
        self, reqs: list[PipelineRequest], vectors: np.ndarray | None, settings: Settings
    ) -> tuple[list, dict]:
        """Run a batch through the stages in order (``vectors``: Triton's, for the requests
        with a query); per request (ids, scores, explain) or the request's exception; and the
        seconds each stage took (and the extra ones a stage reports, e.g. lexical)."""
        if vectors is not None:
            for r, vector in zip([r for r in reqs if r.query is not None], vectors, strict=True):
                r.vector = vector
        timings = {"lexical": 0.0}
        for stage in self.stages:
            t = time.perf_counter()
            for name, seconds in stage.run_batch(reqs, settings).items():
                timings[name] = timings.get(name, 0.0) + seconds
            timings[stage.name] = time.perf_counter() - t
        return [r.result if r.error is None else r.error for r in reqs], timings


def load_pipeline(
    store: str, encoding: QueryEncoding | None, stages: list[type[Stage]] = STAGES
) -> Pipeline:
    """The colocated replica's model: ``stages`` (the request path, :data:`STAGES`), loaded
    from one opened store; without ``encoding`` (the split path's Ingress) only what its checks
    use: the index's items without their vectors (ids, attributes, popularity, the policy) and
    the lexical index's metadata (the default retrieval, not BM25)."""
    opened = OpenedStore(store)
    index = opened.index() if encoding is not None else opened.catalogue()
    tables, _ = opened.tables()
    pipe = Pipeline(
        opened.version,
        opened.embedding_fingerprint,
        tables.kind,
        tables.user_row,
        index.row,
        store,
        index,
        # each request's default retrieval; the split path's Retriever loads BM25 itself
        opened.lexical() if encoding is not None else opened.lexical_info(),
    )
    if encoding is not None:
        pipe.stages = [stage.load(opened, encoding.settings, encoding) for stage in stages]
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
        results, timings = pipe.run(reqs, vectors, settings)
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
