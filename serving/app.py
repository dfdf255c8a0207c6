"""The ranking application on Ray Serve: Ingress -> QueryEncoder -> Retriever -> Ranker.

Contract (the Helm chart's RayService and the canary tooling use it): the application builder
``kuberank.serving.app:build_app`` takes an args dict with ``model_store`` (a path or s3:// URI
of an exported store with an index), ``triton_url`` (``host:port`` of Triton's gRPC endpoint;
empty = encode queries in process with ONNX Runtime) and optional settings (see
:class:`Settings`); the deployments are named ``Ingress``, ``QueryEncoder``, ``Retriever`` and
``Ranker``.

HTTP API (OpenAPI schema at ``/openapi.json``):

- ``POST /search``    {query, user_id?, history?, k}  -> {model_version, fingerprint, kind, items}
- ``POST /recommend`` {user_id?, history, k}          -> the same shape, history items excluded
- ``GET /healthz`` (process up), ``GET /readyz`` (model loaded), ``GET /metrics`` (Prometheus)

Every response carries the model version and each item's score F(Q, B, I). Bad input gets a
4xx JSON body ``{"error": {"status", "message", "details"?}}``; overload gets a fast 503 with
Retry-After from deadline-aware admission (kuberank.serving.admission: a request that cannot be
answered within its latency budget is shed at once), and downstream back-pressure maps to 503.

Request path: colocated (``colocate``, the default for one node) the Ingress itself runs
encode + retrieve + rank, batched by worker threads (kuberank.serving.batching; one process, no
handle hops; the three stage deployments stay in the application at 0 replicas), and JSON POSTs
skip FastAPI's routing (kuberank.serving.json_routes); otherwise each stage is its own
deployment:

- QueryEncoder: ``@serve.batch`` of query texts; Triton's ``query_encoder`` ensemble over gRPC
  (one ``tritonclient.grpc.aio`` client per replica, so the channel is reused) or in-process
  ONNX Runtime (int8 by default). When Triton fails, ``triton_fallback`` decides: ``onnx``
  encodes in process (and skips Triton for ``triton_retry_s``), ``error`` answers 503.
- Retriever: ``@serve.batch`` top-n over the item matrix, exact below the index's ANN threshold
  and faiss HNSW above it; for recommendation (no query text) the query vector is the mean of
  the history's item vectors, and small catalogues (``rank_all_max``) skip retrieval entirely.
- Ranker: ``@serve.batch`` F(Q, B, I) of the model (kuberank.model.Scorer) over the candidates;
  a store without a kuberank model manifest (the base MiniLM) is scored by Q·I.

A model version is picked up with ``reconfigure`` (Serve ``user_config`` ``{"model_store",
"revision"}``): each replica loads the new store beside the old one and swaps it in one
assignment, so in-flight requests finish on the old one and none is dropped. A redeploy that
Serve treats as new code replaces replicas; ``max_surge_percent: 100`` starts each replacement
before its old replica stops. Start-up (and
reconfigure) refuses an index whose fingerprints differ from the store's encoder.
"""

import asyncio
import dataclasses
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kuberank.errors import KuberankError
from kuberank.serving import admission, hybrid, json_routes
from kuberank.serving.admission import DEFAULT_BUDGET_MS, Admission, Overloaded
from kuberank.serving.batching import BatcherStopped, DynamicBatcher, run_on_loop
from kuberank.serving.explain import Explanation, explain_rows
from kuberank.serving.filters import (
    Filter,
    FilterError,
    attribute_table,
    blocked_rows,
    served_schema,
)
from kuberank.serving.metrics import replica_metrics
from kuberank.serving.policies import (
    CAP_DEPTH,
    BlockedQuery,
    candidate_count,
    load_policy,
    policy_decisions,
)
from kuberank.serving.reranking import KINDS as RERANKINGS
from kuberank.serving.reranking import Reranker
from kuberank.serving.reranking import missing as reranking_missing
from kuberank.serving.reranking import served_schema as reranking_schema
from kuberank.store import ENCODER_FILE, INDEX_DIR, INT8_FILE, MODEL_DIR, ONNX_DIR

INGRESS, ENCODER, RETRIEVER, RANKER = "Ingress", "QueryEncoder", "Retriever", "Ranker"
DEPLOYMENTS = (INGRESS, ENCODER, RETRIEVER, RANKER)

# Request limits (part of the OpenAPI schema)
MAX_QUERY_CHARS = 512
MAX_K = 100
MAX_HISTORY = 200
MAX_ID_CHARS = 128
MAX_BODY_BYTES = 64 * 1024
MAX_DEADLINE_MS = 60_000
MALFORMED_BODY = "malformed JSON body"


# --------------------------------------------------------------------------- settings


STAGE_ENV = {
    # user code on the replica's own event loop: one loop hop less per request (the heavy work
    # runs in a worker thread, never on the loop)
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # the retrieval product and F are small per batch; BLAS/OpenMP pools would only contend with
    # ONNX Runtime's own intra-op threads
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _default_deployments(colocate: bool = True) -> dict[str, dict]:
    """Per-deployment Ray Serve options for a local run; the chart passes its own through
    serveConfigV2 (they override these). ``num_cpus`` 0 lets a laptop schedule every replica;
    batching deployments take many ongoing requests (the default 5 would cap the batch).
    ``max_surge_percent`` 100: a restart (new code or builder args) starts the replacement
    before the old replica stops, so a rollout never leaves a stage without a replica.

    Colocated (the default for one node): the Ingress runs encode + retrieve + rank itself, and
    ``QueryEncoder``/``Retriever``/``Ranker`` stay in the application (the chart names them) at
    0 replicas until something routes to them."""
    scale = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 10, "downscale_delay_s": 60}
    actor = {"num_cpus": 0, "runtime_env": {"env_vars": dict(STAGE_ENV)}}
    # one log line per request costs the replica CPU; Serve builds the access-log record (caller
    # lookup included) before its filter drops it, unless the level is above INFO
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    stage = {
        "max_ongoing_requests": 256,
        "max_queued_requests": -1,
        "max_surge_percent": 100,
        "autoscaling_config": {**scale, "target_ongoing_requests": 64},
        "ray_actor_options": actor,
        "logging_config": quiet,
    }
    if colocate:
        stage = {
            **stage,
            "autoscaling_config": {
                **scale,
                "min_replicas": 0,
                "initial_replicas": 0,
                "target_ongoing_requests": 64,
            },
        }
    return {
        INGRESS: {
            "max_ongoing_requests": 256,
            "max_queued_requests": 512,
            "max_surge_percent": 100,
            "autoscaling_config": {**scale, "target_ongoing_requests": 64},
            "ray_actor_options": actor,
            "logging_config": quiet,
        },
        ENCODER: stage,
        RETRIEVER: stage,
        RANKER: stage,
    }


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (a Kubernetes CPU limit) when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def onnx_thread_count(requested: int, streams: int = 1) -> int:
    """``requested`` intra-op threads, or (0) this process's cores shared among the ``streams``
    batches that run at once."""
    if requested > 0:
        return requested
    return max(1, usable_cores() // max(1, streams))


@dataclass
class Settings:
    """Everything ``build_app`` accepts besides ``model_store`` and ``triton_url``."""

    triton_model: str = "query_encoder"
    triton_timeout_s: float = 2.0
    triton_fallback: str = "onnx"  # "onnx": encode in process when Triton fails; "error": 503
    triton_retry_s: float = 5.0  # after a Triton failure, go straight to the fallback this long
    onnx_precision: str = "int8"  # in-process encoder: "int8" (model.int8.onnx) or "fp32"
    # ONNX Runtime intra-op threads; 0 = the replica's cores shared among its concurrent batches
    onnx_threads: int = 0
    # True: the Ingress runs encode + retrieve + rank itself, batched on worker threads (one
    # process, no handle hops); False: each stage is its own deployment, scaled separately
    colocate: bool = True
    candidates: int = 100  # retrieved per request before F re-ranks them
    rank_all_max: int = 5000  # recommendation: score every item with F up to this catalogue size
    # (max_batch_size, batch_wait_timeout_s): chosen by measurement (docs/serving.md)
    pipeline_batch: tuple[int, float] = (16, 0.002)  # colocated: the whole request path
    # colocated: batches run at once, one worker thread each (0 = one per core; the launcher's
    # direct replicas set their share). On small
    # batches ONNX Runtime gets more from one thread per batch and batches side by side than
    # from several threads on one batch (docs/serving.md, batching)
    pipeline_workers: int = 0
    # colocated: the replica's GIL switch interval (sys.setswitchinterval; Python's default
    # 0.005); 0 = leave it
    switch_interval_s: float = 0.0005
    encoder_batch: tuple[int, float] = (32, 0.003)
    retriever_batch: tuple[int, float] = (32, 0.001)
    ranker_batch: tuple[int, float] = (32, 0.001)
    stage_timeout_s: float = 5.0  # one downstream call; past it the request gets 503
    # deadline-aware admission (serving/admission.py): a request whose estimated wait exceeds
    # its budget (this, or the client's smaller ``deadline_ms``) gets 503 at once, and one whose
    # deadline passed while queued is dropped before compute; False = queue up to Serve's limits
    admission: bool = True
    latency_budget_ms: float = DEFAULT_BUDGET_MS
    retries: int = 1  # retries of a downstream call whose replica died
    revision: int = 0  # bump (user_config) to reload the same store URI
    # the default re-ranking of F's candidates (serving/reranking.py; a request's `diversity`
    # overrides it), at most one: MMR's lambda, calibration's lambda, the long-tail boost's
    # beta; None = off
    mmr_lambda: float | None = None
    calibration: float | None = None
    tail_boost: float | None = None
    deployments: dict = field(default_factory=dict)  # per-deployment Serve option overrides

    def __post_init__(self):
        if self.triton_fallback not in ("onnx", "error"):
            raise KuberankError(
                f"triton_fallback: {self.triton_fallback!r} is not 'onnx' or 'error'"
            )
        if self.onnx_precision not in ("int8", "fp32"):
            raise KuberankError(f"onnx_precision: {self.onnx_precision!r} is not 'int8' or 'fp32'")
        for name in ("pipeline_batch", "encoder_batch", "retriever_batch", "ranker_batch"):
            size, wait = getattr(self, name)
            if int(size) < 1 or float(wait) < 0:
                raise KuberankError(
                    f"{name}: need (max_batch_size >= 1, batch_wait_timeout_s >= 0)"
                )
            setattr(self, name, (int(size), float(wait)))
        self.colocate = bool(self.colocate)
        if int(self.pipeline_workers) < 0:
            raise KuberankError("pipeline_workers: need >= 0 (0 = one per core)")
        self.pipeline_workers = int(self.pipeline_workers)
        self.switch_interval_s = float(self.switch_interval_s)
        self.admission = bool(self.admission)
        self.latency_budget_ms = float(self.latency_budget_ms)
        if not self.latency_budget_ms > 0:
            raise KuberankError("latency_budget_ms: need > 0 (milliseconds)")
        if self.switch_interval_s < 0:
            raise KuberankError("switch_interval_s: need >= 0 (0 = Python's default)")
        chosen = [kind for kind in RERANKINGS if getattr(self, kind) is not None]
        for kind in chosen:
            if not 0.0 <= float(getattr(self, kind)) <= 1.0:
                raise KuberankError(f"{kind}: {getattr(self, kind)} is not in [0, 1]")
        if len(chosen) > 1:
            raise KuberankError(f"{' and '.join(chosen)}: at most one default re-ranking")
        unknown = set(self.deployments) - set(DEPLOYMENTS)
        if unknown:
            raise KuberankError(f"deployments: unknown {sorted(unknown)}; expected {DEPLOYMENTS}")

    def reranking(self) -> tuple[str, float] | None:
        """The default re-ranking (serving/reranking.py), or None."""
        for kind in RERANKINGS:
            if getattr(self, kind) is not None:
                return kind, float(getattr(self, kind))
        return None

    def batch_streams(self) -> int:
        """Batches the colocated Ingress runs at once: its pipeline workers."""
        return self.pipeline_workers or usable_cores()

    @classmethod
    def from_args(cls, args: dict) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - names - {"model_store", "triton_url"}
        if unknown:
            raise KuberankError(f"build_app: unknown arguments {sorted(unknown)}")
        return cls(**{k: v for k, v in args.items() if k in names})


# --------------------------------------------------------------------------- pure core


class UnknownItemsError(KuberankError):
    def __init__(self, ids: list[str]):
        self.ids = ids
        super().__init__(f"unknown item ids: {ids[:10]}")


class EncoderUnavailableError(KuberankError):
    """Triton failed and the fallback is off."""


def _store_part(store: str, part: str) -> Path:
    from kuberank.storage import is_s3, materialize

    return materialize(
        "/".join([store.rstrip("/"), part]) if is_s3(store) else str(Path(store) / part)
    )


def read_store_manifest(store: str) -> dict:
    from kuberank.store import read_manifest

    return read_manifest(store)


def model_version(manifest: dict) -> str:
    return str(manifest.get("version", "0"))


@dataclass
class ModelTables:
    """What the Ingress and the Ranker need from STORE/model/kuberank.json."""

    kind: str
    user_row: dict[str, int]
    info: Any | None  # kuberank.model.ModelInfo, None for a plain encoder (F = Q·I)


def read_model_tables(store: str, index_kind: str) -> tuple[ModelTables, Path | None]:
    from kuberank.model import MANIFEST, MODEL_FORMAT, read_info

    try:
        model_dir = _store_part(store, MODEL_DIR)
    except KuberankError:
        return ModelTables(index_kind, {}, None), None
    manifest = model_dir / MANIFEST
    if not manifest.is_file() or json.loads(manifest.read_text()).get("format") != MODEL_FORMAT:
        return ModelTables(index_kind, {}, None), None
    info = read_info(model_dir)
    return ModelTables(info.kind, {u: i for i, u in enumerate(info.user_ids)}, info), model_dir


def load_checked_index(store: str):
    """The store's manifest and index (with the store's policy), refusing an index made by
    another encoder or a policy that cannot be served."""
    from kuberank.item_index import check_index, load_index

    manifest = read_store_manifest(store)
    index = load_index(store)
    check_index(index.meta, manifest, where=f"{store}/{INDEX_DIR}")
    index.policy = load_policy(store, index)
    return manifest, index


class InProcessEncoder:
    """ONNX Runtime on the store's exported model, without progress bars (hot path). Safe to
    call from several threads at once (the tokenizer and the session are)."""

    def __init__(self, store: str, manifest: dict, precision: str = "int8", threads: int = 1):
        from kuberank.onnx_encoder import OnnxEncoder

        onnx_dir = _store_part(store, ONNX_DIR)
        name = INT8_FILE if precision == "int8" else ENCODER_FILE
        self.encoder = OnnxEncoder(
            onnx_dir / name,
            tokenizer=onnx_dir / "tokenizer.json",
            max_length=int(manifest["embedding"]["max_length"]),
            intra_op_threads=threads,
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        from kuberank.onnx_encoder import tokenize

        ids, mask = tokenize(self.encoder.tokenizer, texts)
        return np.asarray(self.encoder._run(ids, mask), dtype=np.float32)


class TritonEncoder:
    """The ``query_encoder`` ensemble over gRPC; one aio client (one channel) per replica."""

    def __init__(
        self,
        url: str,
        model: str = "query_encoder",
        timeout_s: float = 2.0,
        queue_timeout_us: int | None = None,
    ):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        # Triton rejects a request still queued after this long (its queue policy, with
        # allow_timeout_override): the latency budget; None = the model's default
        self.queue_timeout_us = queue_timeout_us
        self._client = None

    def _get_client(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(self.url)
        return self._client

    async def encode(self, texts: list[str]) -> np.ndarray:
        import tritonclient.grpc.aio as grpcclient

        client = self._get_client()
        data = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
        text = grpcclient.InferInput("TEXT", list(data.shape), "BYTES")
        text.set_data_from_numpy(data)
        result = await asyncio.wait_for(
            client.infer(
                self.model,
                [text],
                outputs=[grpcclient.InferRequestedOutput("EMBEDDING")],
                client_timeout=self.timeout_s,
                timeout=self.queue_timeout_us,
            ),
            self.timeout_s + 0.5,
        )
        return np.asarray(result.as_numpy("EMBEDDING"), dtype=np.float32)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.close()
            except Exception:
                pass


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

    def __init__(self, store: str, index, tables: ModelTables, model_dir: Path | None):
        import torch

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
        if req.reranking is not None:  # serving/reranking.py: MMR's picks, or a new order
            kind, value = req.reranking
            depth = min(len(order), CAP_DEPTH * req.k) if caps else req.k
            history = self.index.rows_of(req.history)[0]
            picked = self.reranker.order(kind, value, cands, order, scores, history, req.k, depth)
            if kind == "mmr_lambda" and caps:  # the caps walk MMR's picks, then F's order
                picked = np.concatenate([picked, order[~np.isin(order, picked)]])
            order = picked
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


def _triton_queue_timeout(exc: Exception) -> bool:
    """Triton rejected the request because it waited past the model's queue timeout
    (``default_queue_policy``): the server works, it is busy."""
    return "timeout expired" in str(exc).lower()


class QueryEncoding:
    """Query texts -> vectors for one replica: Triton (when configured and not failed within
    ``triton_retry_s``) or in-process ONNX Runtime, with the ``triton_fallback`` policy. Shared by
    the QueryEncoder deployment and the colocated Ingress. ``streams``: batches the replica
    encodes at once (the in-process encoder's cores are shared among them)."""

    def __init__(self, triton_url: str, settings: Settings, streams: int = 1):
        self.settings, self.streams = settings, streams
        self.triton = (
            TritonEncoder(
                triton_url,
                settings.triton_model,
                settings.triton_timeout_s,
                int(settings.latency_budget_ms * 1000) if settings.admission else None,
            )
            if triton_url
            else None
        )
        self.triton_down_until = 0.0

    def needs_local(self) -> bool:
        return self.triton is None or self.settings.triton_fallback == "onnx"

    def load_local(self, store: str, manifest: dict) -> "InProcessEncoder | None":
        if not self.needs_local():
            return None
        return InProcessEncoder(store, manifest, self.settings.onnx_precision, self.onnx_threads())

    def onnx_threads(self) -> int:
        return onnx_thread_count(self.settings.onnx_threads, self.streams)

    async def remote(self, texts: list[str]) -> np.ndarray | None:
        """Triton's vectors, or None: encode in process (no Triton, or it failed and the
        fallback is on). Raises EncoderUnavailableError when it failed and the fallback is off."""
        if self.triton is None:
            return None
        if time.monotonic() >= self.triton_down_until:
            try:
                return await self.triton.encode(texts)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # this request was cancelled, not the call
                # another batch's failure closed the channel under this call
                failure: Exception = ConnectionError("channel closed during the call")
            except Exception as exc:
                if _triton_queue_timeout(exc):  # Triton shed it (its queue policy): not a fault
                    budget = self.settings.latency_budget_ms / 1000.0
                    raise Overloaded("expired", budget, budget) from None
                failure = exc
            try:
                # marked down before the channel is closed: no batch opens a new one meanwhile
                return self.after_failure(failure)
            finally:
                await self.triton.close()
        return self.after_failure(None)

    def remote_from_thread(
        self, texts: list[str], loop: asyncio.AbstractEventLoop
    ) -> np.ndarray | None:
        """:meth:`remote` from a batch worker thread: the gRPC client lives on ``loop``; a
        call the loop does not finish in time counts as a Triton failure."""
        timeout = self.settings.triton_timeout_s + 1
        try:
            return run_on_loop(self.remote(texts), loop, timeout)
        except TimeoutError:
            return self.after_failure(TimeoutError(f"no answer within {timeout}s"))

    def after_failure(self, exc: Exception | None) -> None:
        """After a Triton failure (``exc``; None: one within ``triton_retry_s``): skip Triton
        for ``triton_retry_s``, then None (encode in process), or raise EncoderUnavailableError
        when the fallback is off."""
        if exc is not None:
            self.triton_down_until = time.monotonic() + self.settings.triton_retry_s
        if self.settings.triton_fallback != "onnx":
            problem = f": {exc}" if exc is not None else " failed recently"
            raise EncoderUnavailableError(f"Triton at {self.triton.url}{problem}")
        return None


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
        args = (rank_all_max, self.lexical, timings)
        try:
            found: list = retrieve_batch(self.index, retrieve, *args)
        except UnknownItemsError:  # answer the good requests of the batch one by one
            found = []
            for one in retrieve:
                try:
                    found.append(retrieve_batch(self.index, [one], *args)[0])
                except UnknownItemsError as exc:
                    found.append(exc)
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


# --------------------------------------------------------------------------- HTTP schema

QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]
# A query needs a character that is not whitespace: what str.isspace() calls whitespace (what
# str.strip() removes), spelled out, since \s differs between regex engines (ECMA-262's, which
# JSON Schema patterns use, leaves out U+001C-U+001F and U+0085). The schema's pattern and the
# server's check (Ingress._search) are this one expression.
NOT_BLANK = (
    r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)
_NOT_BLANK = re.compile(NOT_BLANK)
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


def _integral(value):
    """JSON has one number type: 3.0 is the integer 3 (JSON Schema's ``integer``); strict
    validation still refuses "3", true and 3.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# the bounds before the validator, so that the schema keeps them (minimum, maximum)
TopK = Annotated[int, Field(ge=1, le=MAX_K), BeforeValidator(_integral)]
DeadlineMs = Annotated[int, Field(ge=1, le=MAX_DEADLINE_MS), BeforeValidator(_integral)]


def _one_reranking_schema(schema: dict) -> None:
    # exactly one property, none of them null (their Python default None is not a value)
    schema.update(minProperties=1, maxProperties=1)
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)


class Diversity(BaseModel):
    """One re-ranking of F's candidates (serving/reranking.py): MMR (each pick maximises
    lambda * relevance - (1 - lambda) * its largest cosine to the items already picked),
    calibration to the genre shares of the history (Steck 2018), or the long-tail boost."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_reranking_schema)
    mmr_lambda: float = Field(
        None,
        ge=0.0,
        le=1.0,
        description="MMR: 1 is F's order; smaller: more diverse lists (items stay scored by F)",
    )
    calibration: float = Field(
        None,
        ge=0.0,
        le=1.0,
        description="calibration: 0 is F's order; larger: closer to the genre shares of the "
        "history (needs an index with genres)",
    )
    tail_boost: float = Field(
        None,
        ge=0.0,
        le=1.0,
        description="long-tail boost: (1 - B) relevance + B novelty; 0 is F's order (needs an "
        "index of an interaction log)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "Diversity":
        if len(self.model_fields_set) != 1:
            raise ValueError("exactly one of mmr_lambda, calibration, tail_boost")
        return self

    def reranking(self) -> tuple[str, float]:
        (kind,) = self.model_fields_set
        return kind, float(getattr(self, kind))


class _UserContext(BaseModel):
    """What both routes take besides the query: the user, the history and k."""

    model_config = ConfigDict(extra="forbid", strict=True)
    history: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description="item ids the user interacted with, most recent last",
    )
    k: TopK = Field(10, description="number of items to return")
    deadline_ms: DeadlineMs | None = Field(
        None,
        description="this request's latency budget in milliseconds, when smaller than the "
        "server's (latency_budget_ms): a request that cannot be answered within it gets 503 "
        "with Retry-After at once",
    )
    explain: StrictBool = Field(
        False, description="add to each item the terms of F behind its score (`explain`)"
    )
    filter: Filter | None = Field(
        None, description="which items may be returned, applied before top-k (serving/filters.py)"
    )
    diversity: Diversity | None = Field(
        None, description="re-ranking for diversity; without it, the server's default"
    )


class SearchRequest(_UserContext):
    query: QueryText = Field(
        description="query text (1-512 characters, at least one of them not whitespace)",
        # enforced by Ingress._search (a 422 that says "blank")
        json_schema_extra={"pattern": NOT_BLANK},
    )
    user_id: ItemId | None = Field(
        None,
        description="a user the model knows (personalisation; 404 when the model has users and "
        "this is not one of them, ignored by a model without users)",
    )
    retrieval: Literal["dense", "bm25", "hybrid"] | None = Field(
        None,
        description="how candidates are retrieved: dense (Q·I), bm25 (the store's lexical "
        "index) or hybrid (both fused with the store's fitted fusion; `score` is then the fused "
        "score and `explain` gives its `dense` and `lexical` terms). Default: the store's "
        "recorded retrieval (hybrid only where fusion beat dense on its tuning queries). "
        "bm25/hybrid on a store without a lexical index: 422 (`kuberank index` builds it)",
    )


class RecommendRequest(_UserContext):
    """A recommendation needs a signal: at least one history item, or a user_id (422 without
    either)."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["history"], "properties": {"history": {"minItems": 1}}},
                {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
            ]
        }
    )
    user_id: ItemId | None = Field(
        None,
        description="a user the model knows (404 when it does not: when the model has users, "
        "or when the history is empty and the user is the only signal)",
    )

    @model_validator(mode="after")
    def _needs_a_signal(self) -> "RecommendRequest":
        if not self.history and self.user_id is None:
            # a ValidationError at ``history``, so the 422 names the field
            problem = PydanticCustomError(
                "history_or_user_id", "give at least one item id, or a user_id"
            )
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=problem, loc=("history",), input=self.history)],
            )
        return self


class ScoredItem(BaseModel):
    id: str
    score: float
    explain: Explanation | None = Field(None, description="with `explain: true` only")


class RankResponse(BaseModel):
    model_version: str
    fingerprint: str
    kind: str
    items: list[ScoredItem]


class ErrorBody(BaseModel):
    status: int
    message: str
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(
    status: int, message: str, details: list | None = None, headers: dict | None = None
) -> JSONResponse:
    body: dict = {"status": status, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class RequestProblem(Exception):
    def __init__(
        self, status: int, message: str, details: list | None = None, retry_after_s: int = 1
    ):
        self.status, self.message, self.details = status, message, details
        self.retry_after_s = retry_after_s
        super().__init__(message)

    @classmethod
    def shed(cls, exc: Overloaded) -> "RequestProblem":
        return cls(503, str(exc), retry_after_s=exc.retry_after_s)


def unknown_items_problem(ids: list[str]) -> RequestProblem:
    """404 for history item ids the model does not know, naming each (at most 20): a
    well-formed request about items that are not in this model's catalogue, like an unknown
    user_id. Every path that meets unknown ids (Ingress._check, the stages, the colocated
    batch) answers with this."""
    return RequestProblem(
        404,
        "history: unknown item ids",
        [{"field": "history", "problem": f"unknown item id {i!r}"} for i in ids[:20]],
    )


RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}

ERRORS = {
    400: {"model": ErrorResponse, "description": "the body is not JSON"},
    404: {
        "model": ErrorResponse,
        "description": "a user_id or history item id this model does not know",
    },
    413: {"model": ErrorResponse, "description": f"a body over {MAX_BODY_BYTES} bytes"},
    422: {"model": ErrorResponse, "description": "a field is invalid (the error names it)"},
    503: {
        "model": ErrorResponse,
        "description": "overloaded: the request cannot be answered within its latency budget "
        "(the server's, or the client's deadline_ms), or the model is not loaded yet or a stage "
        "is unavailable; retry after Retry-After",
        "headers": RETRY_AFTER,
    },
}

api = FastAPI(
    title="kuberank", version="1", description="Real-time search and recommendation ranking"
)


def invalid_request_response(problems: list[dict], loc_start: int = 0) -> JSONResponse:
    """400 for a body that is not JSON, else 422 naming each invalid field. ``loc_start``: how
    many leading parts of each error's location to drop (FastAPI puts ``body`` first)."""
    if any(p.get("type") == "json_invalid" for p in problems):
        return error_response(400, MALFORMED_BODY)
    details = [
        {
            "field": ".".join(str(x) for x in p.get("loc", ())[loc_start:]) or "body",
            "problem": str(p.get("msg", "invalid")),
            "type": str(p.get("type", "")),
        }
        for p in problems
    ]
    fields = ", ".join(d["field"] for d in details)
    return error_response(422, f"invalid request: {fields}", details)


def problem_response(exc: RequestProblem) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.status == 503 else None
    return error_response(exc.status, exc.message, exc.details, headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    return invalid_request_response(exc.errors(), loc_start=1)


@api.exception_handler(RequestProblem)
async def _request_problem(request: Request, exc: RequestProblem):
    return problem_response(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_problem(request: Request, exc: StarletteHTTPException):
    """FastAPI's own refusals (404 unknown path, 405 method, 400 unparseable body) in the app's
    error shape. FastAPI raises 400 only when it cannot parse the body at all."""
    message = MALFORMED_BODY if exc.status_code == 400 else str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def answer_json(raw: bytes, model: type[BaseModel], route) -> JSONResponse:
    """What a FastAPI route with a ``model`` body answers, without FastAPI (JsonRoutes): parse
    the JSON, validate it with ``model``, ``await route(body)``, render the dict or the error."""
    try:
        # from_attributes as FastAPI validates bodies, so a non-object body gets its error
        body = model.model_validate(json.loads(raw), from_attributes=True)
    except ValidationError as exc:
        return invalid_request_response(exc.errors())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser
        return error_response(400, MALFORMED_BODY)
    try:
        return JSONResponse(await route(body))
    except RequestProblem as exc:
        return problem_response(exc)


ROUTES = {"/search", "/recommend", "/healthz", "/readyz", "/metrics", "/openapi.json"}


class _BodyTooLarge(Exception):
    pass


RANKED = ("/search", "/recommend")  # the routes admission sheds


async def _send_shed(send, shed: Overloaded) -> None:
    """The 503 of a shed request, straight to the ASGI server (the same JSON error shape)."""
    body = json.dumps({"error": {"status": 503, "message": str(shed)}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(shed.retry_after_s).encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LimitsAndMetrics:
    """Pure ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs a task group and memory
    streams per request): 413 for bodies over MAX_BODY_BYTES (declared or streamed), a JSON 500
    for a bug, and every answered request counted per route and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = json_routes.route_path(scope)
        route = path if path in ROUTES else "other"
        status = 0

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        if route in RANKED and scope["method"] == "POST":  # shed before reading the body
            shed = admission.gate()
            if shed is not None:
                replica_metrics().shed(shed.reason)
                await _send_shed(send, shed)
                replica_metrics().observe_request(route, 503, time.perf_counter() - started)
                return
        too_big = f"request body over {MAX_BODY_BYTES} bytes"
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await error_response(413, too_big)(scope, receive, counted_send)
        else:
            try:
                await self.app(scope, bounded_receive if length is None else receive, counted_send)
            except _BodyTooLarge:
                if not status:
                    await error_response(413, too_big)(scope, receive, counted_send)
            except Exception as exc:  # a bug, not the client's fault: JSON 500, counted, logged
                import logging

                logging.getLogger("ray.serve").exception("kuberank: request failed")
                if not status:
                    problem = f"internal error: {type(exc).__name__}"
                    await error_response(500, problem)(scope, receive, counted_send)
        if route != "/metrics":  # requests refused before a route runs (413, 400, 422) count too
            replica_metrics().observe_request(route, status or 500, time.perf_counter() - started)


# Starlette runs the last added outermost: limits and metrics wrap the JSON fast path
api.add_middleware(json_routes.JsonRoutes)
api.add_middleware(LimitsAndMetrics)


# --------------------------------------------------------------------------- deployments


def set_batching(batch_method, size_and_wait: tuple[int, float]) -> None:
    """Apply a Settings ``(max_batch_size, batch_wait_timeout_s)`` to a ``@serve.batch`` method."""
    size, wait = size_and_wait
    batch_method.set_max_batch_size(size)
    batch_method.set_batch_wait_timeout_s(wait)


async def _await(response):
    return await response


try:
    from ray import serve
except ImportError:  # pragma: no cover - ray is a dependency; keeps the pure core importable
    serve = None


def check_default_reranking(settings: Settings, index) -> None:
    """Refuse a store whose index cannot serve the settings' default re-ranking. (Defined
    before the deployments: Serve pickles them by value, with the module globals known then.)"""
    default = settings.reranking()
    if default is not None and reranking_missing(index, default[0]) is not None:
        raise KuberankError(f"{default[0]}: {reranking_missing(index, default[0])}")


if serve is not None:

    @serve.deployment(name=ENCODER)
    class QueryEncoder:
        def __init__(self, triton_url: str, settings: dict):
            self.settings = Settings(**settings)
            self.encoding = QueryEncoding(triton_url, self.settings)
            self.local: InProcessEncoder | None = None
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
            self.state = None
            set_batching(self._encode_batch, self.settings.encoder_batch)

        async def reconfigure(self, config: dict):
            # loads off the event loop: requests keep being served by the old state meanwhile
            await asyncio.to_thread(self._load, config["model_store"])

        def _load(self, store: str):
            manifest = read_store_manifest(store)
            local = self.encoding.load_local(store, manifest)
            self.local, self.state = local, {"version": model_version(manifest)}

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.003)
        async def _encode_batch(self, items: list[tuple[str, float]]) -> list[tuple]:
            started = time.perf_counter()
            texts = [t for t, _ in items]
            vectors = await self.encoding.remote(texts)
            fallback = 0
            if vectors is None:
                local = self.local
                vectors = await asyncio.get_running_loop().run_in_executor(
                    self.pool, local.encode, texts
                )
                fallback = len(texts) if self.encoding.triton is not None else 0
            return [
                (
                    vectors[i],
                    {
                        "batch": len(items),
                        "queue_s": started - t0,
                        "fallback": fallback / len(items),
                    },
                )
                for i, (_, t0) in enumerate(items)
            ]

        async def encode(self, text: str) -> tuple[np.ndarray, dict]:
            return await self._encode_batch((text, time.perf_counter()))

    @serve.deployment(name=RETRIEVER)
    class Retriever:
        def __init__(self, settings: dict):
            self.settings = Settings(**settings)
            self.index, self.lexical = None, None
            set_batching(self._retrieve_batch, self.settings.retriever_batch)

        async def reconfigure(self, config: dict):
            store = config["model_store"]
            _, index = await asyncio.to_thread(load_checked_index, store)
            lexical = await asyncio.to_thread(hybrid.load_stage, store, index.ids)
            self.index, self.lexical = index, lexical

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
        async def _retrieve_batch(self, items: list[tuple[RetrieveRequest, float]]) -> list:
            started = time.perf_counter()
            index, timings = self.index, {"lexical": 0.0}
            reqs = [r for r, _ in items]
            args = (self.settings.rank_all_max, self.lexical, timings)
            try:
                results = retrieve_batch(index, reqs, *args)
            except UnknownItemsError:  # answer the good requests of the batch one by one
                results = []
                for req in reqs:
                    try:
                        results.append(retrieve_batch(index, [req], *args)[0])
                    except UnknownItemsError as exc:
                        results.append(exc)
            out = []
            for result, (req, t0) in zip(results, items, strict=True):
                if isinstance(result, Exception):
                    out.append(result)
                else:
                    meta = {
                        "batch": len(items),
                        "queue_s": started - t0,
                        "policy_removed": req.policy_removed,
                        **timings,
                    }
                    out.append((result[0], result[1], meta))
            return out

        async def retrieve(self, req: RetrieveRequest):
            result = await self._retrieve_batch((req, time.perf_counter()))
            if isinstance(result, Exception):
                raise result
            return result

    @serve.deployment(name=RANKER)
    class Ranker:
        def __init__(self, settings: dict):
            self.settings = Settings(**settings)
            self.core = None
            set_batching(self._rank_batch, self.settings.ranker_batch)

        async def reconfigure(self, config: dict):
            self.core, self.version = await asyncio.to_thread(self._load, config["model_store"])

        @staticmethod
        def _load(store: str):
            manifest, index = load_checked_index(store)
            tables, model_dir = read_model_tables(store, index.meta.get("kind", "search"))
            core = RankerCore(store, index, tables, model_dir)
            return core, (model_version(manifest), manifest["embedding"]["fingerprint"])

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
        async def _rank_batch(self, items: list[tuple[RankRequest, float]]) -> list:
            started = time.perf_counter()
            core, version = self.core, self.version
            out = []
            for req, t0 in items:
                rows, scores = core.rank(req)
                meta = {"batch": len(items), "queue_s": started - t0, "capped": req.capped}
                if req.explain:
                    meta["explain"] = explain_rows(core, req, rows)
                out.append(([core.index.ids[r] for r in rows], scores.tolist(), version, meta))
            return out

        async def rank(self, req: RankRequest):
            return await self._rank_batch((req, time.perf_counter()))

    @serve.deployment(name=INGRESS)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, encoder, retriever, ranker, settings: dict, triton_url: str = ""):
            self.settings = Settings(**settings)
            self.encoder, self.retriever, self.ranker = encoder, retriever, ranker
            # One registry per replica process, shared with the HTTP middleware (Serve pickles
            # this class by value, so a module global here would be a copy).
            self.metrics = replica_metrics()
            self.state: Pipeline | None = None
            # colocated: batches run side by side (0: the stages do the work)
            self.batch_workers = self.settings.batch_streams() if self.settings.colocate else 0
            self.encoding = (
                QueryEncoding(triton_url, self.settings, self.batch_workers)
                if self.settings.colocate
                else None
            )
            # colocated: worker threads (one per core by default) form the batches and run
            # encode + retrieve + rank (ONNX Runtime, numpy and torch release the GIL), so a
            # free worker starts the next batch while the event loop parses and answers
            # requests (docs/serving.md, "The colocated request path")
            if self.settings.colocate and self.settings.switch_interval_s > 0:
                # the workers and the event loop hand the GIL back and forth on every ONNX
                # Runtime / numpy call; waiting Python's default 5 ms for it idles a core
                sys.setswitchinterval(self.settings.switch_interval_s)
            # deadline-aware admission; colocated: the batch workers are its servers; split: the
            # requests in flight through the stage deployments (serving/admission.py)
            self.admission = Admission(
                self.settings.latency_budget_ms / 1000.0,
                servers=max(1, self.batch_workers),
                enabled=self.settings.admission,
                floor=max(1, self.batch_workers) * self.settings.pipeline_batch[0],
                max_batch=self.settings.pipeline_batch[0] if self.settings.colocate else 1,
            )
            self.in_flight = 0  # split path: requests between admission and their answer
            self.batcher = (
                DynamicBatcher(
                    self._pipeline_batch,
                    *self.settings.pipeline_batch,
                    name="pipeline",
                    workers=self.batch_workers,
                )
                if self.settings.colocate
                else None
            )
            # the HTTP middleware sheds on the default budget before it reads a body
            budget_s = self.admission.budget_s
            admission.set_gate(
                (lambda: self.admission.check(self.batcher.pending(), budget_s))
                if self.settings.colocate
                else (lambda: self.admission.check(self.in_flight, budget_s))
            )
            # the JSON fast path of this process (json_routes) answers with the same methods
            json_routes.register(
                "/search", lambda raw: answer_json(raw, SearchRequest, self._search)
            )
            json_routes.register(
                "/recommend", lambda raw: answer_json(raw, RecommendRequest, self._recommend)
            )

        async def reconfigure(self, config: dict):
            # loads in a thread beside the old model; requests keep running on the old one
            state = await asyncio.to_thread(load_pipeline, config["model_store"], self.encoding)
            # the served schema lists what this store serves: the attributes its index holds
            # (Filter.where), its re-rankings (Diversity), its retrievals (SearchRequest)
            self.app.openapi_schema = None
            check_default_reranking(self.settings, state.index)  # the old model keeps serving
            schema = served_schema(self.app.openapi(), attribute_table(state.index).fields)
            schema = hybrid.served_schema(reranking_schema(schema, state.index), state.lexical)
            self.app.openapi_schema = schema
            self.state = state
            self.metrics.set_model(state.version, state.fingerprint, state.kind)

        def __del__(self):
            if getattr(self, "batcher", None) is not None:
                self.batcher.stop(timeout=0)

        def _pipeline_batch(self, items: list[QueuedRequest]) -> list:
            """The colocated request path, on the batcher's thread: one batch of encode +
            retrieve + rank. A request whose deadline passed while it waited is dropped here,
            before compute (Overloaded "expired")."""
            started = time.perf_counter()
            out: list = [None] * len(items)
            live = []
            for i, item in enumerate(items):
                shed = self.admission.expired(started - item.queued_at, item.budget_s)
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
                if texts and self.encoding.triton is not None:
                    vectors = self.encoding.remote_from_thread(texts, loop)
                    remote_s = time.perf_counter() - started
                    fallback = len(texts) if vectors is None else 0
                results, timings = pipe.run(
                    reqs, vectors, self.settings.candidates, self.settings.rank_all_max
                )
            except (EncoderUnavailableError, Overloaded) as exc:  # Triton down or shedding
                results, timings = [exc] * len(batch), None
            self.admission.observe(len(batch), time.perf_counter() - started)
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

        # -- plumbing

        async def _call(self, stage: str, method, *args):
            """One downstream call: bounded by stage_timeout_s, retried when its replica
            died, back-pressure and unavailability mapped to 503."""
            from ray.exceptions import (
                ActorDiedError,
                ActorUnavailableError,
                RayActorError,
                RayTaskError,
            )
            from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

            attempts = 1 + max(0, self.settings.retries)
            for attempt in range(attempts):
                response = method.remote(*args)
                try:
                    return await asyncio.wait_for(_await(response), self.settings.stage_timeout_s)
                except TimeoutError:
                    response.cancel()
                    self.metrics.error(stage, "timeout")
                    raise RequestProblem(
                        503, f"{stage}: no answer within {self.settings.stage_timeout_s}s"
                    ) from None
                except (BackPressureError, DeploymentUnavailableError):
                    self.metrics.error(stage, "overloaded")
                    raise RequestProblem(503, f"{stage}: overloaded, retry later") from None
                except (ActorDiedError, ActorUnavailableError, RayActorError):
                    self.metrics.error(stage, "replica_died")
                    if attempt + 1 >= attempts:
                        raise RequestProblem(503, f"{stage}: replica unavailable") from None
                except EncoderUnavailableError as exc:
                    self.metrics.error(stage, "triton_unavailable")
                    raise RequestProblem(503, f"query encoder unavailable: {exc}") from None
                except Overloaded as exc:  # Triton's queue policy shed it
                    self.metrics.shed(exc.reason)
                    raise RequestProblem.shed(exc) from None
                except RayTaskError as exc:  # a stage's own error that Ray could not re-type
                    if isinstance(exc.cause, Overloaded):
                        self.metrics.shed(exc.cause.reason)
                        raise RequestProblem.shed(exc.cause) from None
                    self.metrics.error(stage, type(exc.cause).__name__ if exc.cause else "error")
                    if isinstance(exc.cause, EncoderUnavailableError):
                        raise RequestProblem(
                            503, f"query encoder unavailable: {exc.cause}"
                        ) from None
                    if isinstance(exc.cause, UnknownItemsError):
                        raise unknown_items_problem(getattr(exc.cause, "ids", [])) from None
                    raise
                except UnknownItemsError as exc:
                    raise unknown_items_problem(exc.ids) from None

        def _check(
            self, user_id: str | None, history: list[str], need_signal: bool, flt=None
        ) -> Pipeline:
            state = self.state
            if state is None:
                raise RequestProblem(503, "model not loaded yet")
            if flt is not None and flt.where:  # a predicate the index cannot answer: 422
                try:
                    attribute_table(state.index).check(flt)
                except FilterError as exc:
                    detail = {"field": exc.field, "problem": exc.problem, "type": "filter"}
                    raise RequestProblem(422, f"invalid request: {exc.field}", [detail]) from None
            unknown = [h for h in history if h not in state.items]
            if unknown:
                raise unknown_items_problem(unknown)
            # a user_id the model does not know: 404 when the model has users, or when it is
            # the request's only signal (a recommendation with an empty history; RecommendRequest
            # requires history or user_id); a search model without users ignores it otherwise
            only_signal = need_signal and not history
            if user_id is not None and (state.users or only_signal) and user_id not in state.users:
                problem = "not a user of this model" + ("" if state.users else " (it has none)")
                raise RequestProblem(
                    404,
                    f"unknown user_id {user_id!r}",
                    [{"field": "user_id", "problem": problem}],
                )
            return state

        def _admit(self, ahead: int, budget_s: float) -> None:
            """Admission's decision for a request with ``ahead`` requests in front of it: a
            shed is counted and answered 503 with Retry-After."""
            try:
                self.admission.check(ahead, budget_s)
            except Overloaded as exc:
                self.metrics.shed(exc.reason)
                raise RequestProblem.shed(exc) from None

        async def _rank(
            self, state: Pipeline, request: PipelineRequest, deadline_ms: int | None
        ) -> dict:
            """Admission, then the request path (colocated or through the stage deployments);
            the admitted request's latency is observed."""
            arrived = time.perf_counter()
            budget_s = self.admission.budget(deadline_ms)
            if self.settings.colocate:
                answer = await self._rank_colocated(state, request, budget_s)
                self.metrics.observe_admitted(time.perf_counter() - arrived)
                return answer
            self._admit(self.in_flight, budget_s)
            self.in_flight += 1
            try:
                answer = await self._rank_stages(state, request)
            finally:
                concurrency = self.in_flight
                self.in_flight -= 1
            # Little's law: with `concurrency` requests in flight, each costs latency/concurrency
            # of the stages' capacity
            seconds = time.perf_counter() - arrived
            self.admission.observe(1, seconds / max(1, concurrency))
            self.metrics.observe_admitted(seconds)
            return answer

        async def _rank_stages(self, state: Pipeline, request: PipelineRequest) -> dict:
            query, history, k = request.query, request.history, request.k
            vector = None
            if query is not None:
                t = time.perf_counter()
                vector, meta = await self._call("encode", self.encoder.encode, query)
                self.metrics.observe_stage(
                    "encode", time.perf_counter() - t, meta["batch"], meta["queue_s"]
                )
                if meta.get("fallback"):
                    self.metrics.encoder_fallbacks(1)
            n = candidate_count(state.index.policy, k, self.settings.candidates)
            mode = request.retrieval
            t = time.perf_counter()
            rows, found, meta = await self._call(
                "retrieve",
                self.retriever.retrieve,
                RetrieveRequest(
                    vector,
                    history,
                    n,
                    request.exclude_history,
                    request.filter,
                    text=query,
                    retrieval=mode,
                ),
            )
            removed = meta["policy_removed"]
            self.metrics.observe_stage(
                "retrieve", time.perf_counter() - t, meta["batch"], meta["queue_s"]
            )
            if mode != "dense":
                self.metrics.observe_stage("lexical", meta["lexical"], meta["batch"])
            t = time.perf_counter()
            ids, scores, version, meta = await self._call(
                "rank",
                self.ranker.rank,
                RankRequest(
                    vector,
                    rows,
                    history,
                    request.user_id,
                    k,
                    request.explain,
                    request.reranking,
                    found if mode != "dense" else None,
                ),
            )
            self.metrics.observe_stage(
                "rank", time.perf_counter() - t, meta["batch"], meta["queue_s"]
            )
            self.metrics.policy_decisions(policy_decisions(removed, meta["capped"]))
            return rank_response(version, state.kind, ids, scores, meta.get("explain"))

        async def _rank_colocated(
            self, state: Pipeline, request: PipelineRequest, budget_s: float
        ) -> dict:
            query = request.query
            self._admit(self.batcher.pending(), budget_s)
            queued_at = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.stage_timeout_s):  # no task per call
                    result, queue_s, meta = await self.batcher.submit(
                        QueuedRequest(
                            request, queued_at, budget_s, state, asyncio.get_running_loop()
                        )
                    )
            except TimeoutError:
                self.metrics.error("pipeline", "timeout")
                raise RequestProblem(
                    503, f"no answer within {self.settings.stage_timeout_s}s"
                ) from None
            except BatcherStopped:  # the replica is shutting down: another one will answer
                self.metrics.error("pipeline", "stopped")
                raise RequestProblem(503, "replica shutting down, retry") from None
            if isinstance(result, Overloaded):
                self.metrics.shed(result.reason)
                raise RequestProblem.shed(result)
            if isinstance(result, EncoderUnavailableError):
                self.metrics.error("encode", "triton_unavailable")
                raise RequestProblem(503, f"query encoder unavailable: {result}")
            if isinstance(result, UnknownItemsError):
                raise unknown_items_problem(result.ids)
            timings, batch = meta["timings"], meta["batch"]
            for stage in (
                ("encode", "retrieve", "rank") if query is not None else ("retrieve", "rank")
            ):
                first = stage == "encode" or (query is None and stage == "retrieve")
                self.metrics.observe_stage(
                    stage,
                    timings[stage] + (queue_s if first else 0.0),
                    batch,
                    queue_s if first else 0.0,
                )
            if request.retrieval != "dense":  # BM25 + fusion, a part of retrieve
                self.metrics.observe_stage("lexical", timings["lexical"], batch)
            if query is not None and meta["fallback"]:
                self.metrics.encoder_fallbacks(1)
            self.metrics.policy_decisions(request.decisions)
            ids, scores, explained = result
            return rank_response(meta["version"], state.kind, ids, scores, explained)

        # -- routes

        # The routes: FastAPI serves them (and their OpenAPI schema); a JSON POST with a body
        # takes the JsonRoutes fast path to the same _search / _recommend.

        async def _search(self, body: SearchRequest) -> dict:
            if _NOT_BLANK.search(body.query) is None:
                raise RequestProblem(
                    422, "query: blank", [{"field": "query", "problem": "must contain text"}]
                )
            state = self._check(body.user_id, body.history, need_signal=False, flt=body.filter)
            reranking = self._reranking(state, body)  # every field checked before the policy
            try:
                retrieval = hybrid.choose(body.retrieval, state.lexical)
            except hybrid.RetrievalUnavailable as exc:
                detail = {"field": "retrieval", "problem": str(exc), "type": "retrieval"}
                raise RequestProblem(422, "invalid request: retrieval", [detail]) from None
            query = self._screen(state, body.query)
            if query is None:  # the policy cut every term of the query: nothing to search
                return rank_response((state.version, state.fingerprint), state.kind, [], [])
            request = PipelineRequest(
                query, body.history, body.user_id, body.k, False, body.explain, body.filter
            )
            request.reranking, request.retrieval = reranking, retrieval
            return await self._rank(state, request, body.deadline_ms)

        def _screen(self, state: Pipeline, query: str) -> str | None:
            """The query as the policy lets it through (serving/policies.py), counted."""
            policy = state.index.policy
            if policy is None:
                return query
            try:
                query, decision = policy.screen(query)
            except BlockedQuery as exc:
                self.metrics.policy_decisions({("blocked_terms", "rejected"): 1})
                detail = {"field": "query", "problem": str(exc), "type": "policy"}
                raise RequestProblem(422, "invalid request: query", [detail]) from None
            if decision is not None:
                self.metrics.policy_decisions({("blocked_terms", decision): 1})
            return query

        def _reranking(self, state: Pipeline, body) -> tuple[str, float] | None:
            """The request's re-ranking, else the server's default; 422 at
            ``diversity.<kind>`` when the index cannot serve it."""
            if body.diversity is None:
                return self.settings.reranking()  # checked against the index at load
            kind, value = body.diversity.reranking()
            why = reranking_missing(state.index, kind)
            if why is not None:
                field_name = f"diversity.{kind}"
                detail = {"field": field_name, "problem": why, "type": "reranking"}
                raise RequestProblem(422, f"invalid request: {field_name}", [detail])
            return kind, value

        async def _recommend(self, body: RecommendRequest) -> dict:
            state = self._check(body.user_id, body.history, need_signal=True, flt=body.filter)
            request = PipelineRequest(
                None, body.history, body.user_id, body.k, True, body.explain, body.filter
            )
            request.reranking = self._reranking(state, body)
            return await self._rank(state, request, body.deadline_ms)

        @api.post(
            "/search",
            response_model=RankResponse,
            responses=ERRORS,
            response_model_exclude_none=True,
        )
        async def search(self, body: SearchRequest) -> dict:
            return await self._search(body)

        @api.post(
            "/recommend",
            response_model=RankResponse,
            responses=ERRORS,
            response_model_exclude_none=True,
        )
        async def recommend(self, body: RecommendRequest) -> dict:
            return await self._recommend(body)

        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @api.get("/readyz", responses={503: {"model": ErrorResponse}})
        async def readyz(self):
            state = self.state
            if state is None:
                return error_response(503, "model not loaded yet")
            return {
                "status": "ready",
                "model_version": state.version,
                "fingerprint": state.fingerprint,
                "kind": state.kind,
                # the serving policy of this version (serving/policies.py), or null
                "policy": state.index.policy.info() if state.index.policy else None,
                # how this replica is sized: batches it runs side by side, and ONNX Runtime
                # threads per batch (0 when queries are encoded elsewhere)
                "batch_workers": self.batch_workers,
                "onnx_threads": (
                    self.encoding.onnx_threads()
                    if self.encoding and self.encoding.needs_local()
                    else 0
                ),
            }

        @api.get(
            "/metrics",
            response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}},
        )
        async def metrics(self) -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in (override or {}).items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    if "num_replicas" in (override or {}):
        out.pop("autoscaling_config", None)
    scale = out.get("autoscaling_config")
    if (
        isinstance(scale, dict)
        and scale.get("initial_replicas") is not None
        and scale["initial_replicas"] < scale.get("min_replicas", 1)
    ):
        out["autoscaling_config"] = {**scale, "initial_replicas": scale.get("min_replicas", 1)}
    return out


def build_app(args: dict):
    """Ray Serve application builder (``kuberank.serving.app:build_app``).

    ``args``: ``model_store`` (required), ``triton_url`` ("" = in-process ONNX Runtime) and any
    :class:`Settings` field. The store is checked here (manifest, index fingerprints) so that a
    bad store fails the deploy, not the first request.
    """
    if serve is None:  # pragma: no cover
        raise KuberankError("ray[serve] is not installed")
    args = dict(args or {})
    store = str(args.get("model_store") or "")
    if not store:
        raise KuberankError("build_app: model_store is required (a path or s3:// URI)")
    triton_url = str(args.get("triton_url") or "")
    settings = Settings.from_args(args)
    _, index = load_checked_index(store)  # refuse a mismatched index before any replica starts
    check_default_reranking(settings, index)
    plain = dataclasses.asdict(settings)
    for name in ("pipeline_batch", "encoder_batch", "retriever_batch", "ranker_batch"):
        plain[name] = list(getattr(settings, name))
    user_config = {"model_store": store, "revision": settings.revision}
    options = {
        name: _merge(opts, settings.deployments.get(name, {}))
        for name, opts in _default_deployments(settings.colocate).items()
    }

    def bind(deployment, name, *init):
        return deployment.options(user_config=user_config, **options[name]).bind(*init)

    encoder = bind(QueryEncoder, ENCODER, triton_url, plain)
    retriever = bind(Retriever, RETRIEVER, plain)
    ranker = bind(Ranker, RANKER, plain)
    return bind(Ingress, INGRESS, encoder, retriever, ranker, plain, triton_url)


def describe(args: dict) -> dict:
    """What build_app would deploy (for the launcher and docs): settings and options."""
    settings = Settings.from_args(args)
    return {
        "settings": dataclasses.asdict(settings),
        "deployments": {
            n: _merge(o, settings.deployments.get(n, {}))
            for n, o in _default_deployments(settings.colocate).items()
        },
        "pid": os.getpid(),
    }
