"""The ranking application on Ray Serve: Ingress -> QueryEncoder -> Retriever -> Ranker.

Contract (the Helm chart's RayService and the canary tooling use it): the application builder
``kuberank.serving.app:build_app`` takes an args dict with ``model_store`` (a path or s3:// URI
of an exported store with an index), ``triton_url`` (``host:port`` of Triton's gRPC endpoint;
empty = encode queries in process with ONNX Runtime) and optional settings (see
kuberank.serving.settings.Settings); the deployments are named ``Ingress``, ``QueryEncoder``,
``Retriever`` and ``Ranker``.

This module holds the Serve deployments and the builder; what they run lives beside it:
settings.py (Settings, deployment names and options), loading.py (reading the store),
encoders.py (Triton, in-process ONNX Runtime), stages.py (STAGES: encode, retrieve, rank, and
their core), pipeline.py (the colocated path), split.py (the calls to the stage deployments) and
http_api.py (schema, errors, middleware). Serve pickles the deployment classes by value: a function they use that is defined
here must be defined before them (an imported one is pickled by reference).

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
deployment, one ``StageDeployment`` per stage of ``STAGES`` named by the stage (the Ingress
calls them in the list's order):

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
import os
import sys
import time

from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kuberank.errors import KuberankError
from kuberank.serving import admission, hybrid, json_routes
from kuberank.serving.admission import Admission, Overloaded
from kuberank.serving.batching import BatcherStopped, DynamicBatcher
from kuberank.serving.encoders import EncoderUnavailableError, QueryEncoding
from kuberank.serving.filters import attribute_table, served_schema
from kuberank.serving.http_api import (
    ERRORS,
    ErrorResponse,
    RankResponse,
    RecommendRequest,
    RequestProblem,
    SearchRequest,
    answer_json,
    check_not_blank,
    checked_state,
    chosen_reranking,
    chosen_retrieval,
    error_response,
    new_api,
    screen_query,
    unknown_items_problem,
)
from kuberank.serving.loading import OpenedStore, check_store
from kuberank.serving.metrics import replica_metrics
from kuberank.serving.pipeline import (
    Pipeline,
    PipelineRequest,
    QueuedRequest,
    load_pipeline,
    rank_response,
    run_queued,
)
from kuberank.serving.reranking import served_schema as reranking_schema
from kuberank.serving.settings import (
    BATCHES,
    INGRESS,
    Settings,
    check_default_reranking,
    default_deployments,
    merge_options,
)
from kuberank.serving.split import StagePath
from kuberank.serving.stages import STAGES, UnknownItemsError

api = new_api()


def set_batching(batch_method, size_and_wait: tuple[int, float]) -> None:
    """Apply a Settings ``(max_batch_size, batch_wait_timeout_s)`` to a ``@serve.batch`` method."""
    size, wait = size_and_wait
    batch_method.set_max_batch_size(size)
    batch_method.set_batch_wait_timeout_s(wait)


try:
    from ray import serve
except ImportError:  # pragma: no cover - ray is a dependency; keeps the pure core importable
    serve = None


if serve is not None:

    @serve.deployment
    class StageDeployment:
        """One stage of STAGES (serving/stages.py) as its own deployment, named by the stage
        (``QueryEncoder``, ``Retriever``, ``Ranker``): Serve batches its calls with the stage's
        batch setting, the stage runs each batch; a reconfigure loads the stage anew."""

        def __init__(self, deployment: str, settings: dict, triton_url: str = ""):
            self.settings = Settings(**settings)
            self.kind = next(s for s in STAGES if s.deployment == deployment)
            self.encoding = QueryEncoding(triton_url, self.settings)
            self.stage = None
            set_batching(self._run_batch, getattr(self.settings, self.kind.batch))

        async def reconfigure(self, config: dict):
            # loads off the event loop: requests keep being served by the old stage meanwhile
            store = OpenedStore(config["model_store"])
            self.stage = await asyncio.to_thread(
                self.kind.load, store, self.settings, self.encoding
            )

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
        async def _run_batch(self, items: list[tuple[PipelineRequest, float]]) -> list:
            started = time.perf_counter()
            extra = await self.stage.run_batch_async([r for r, _ in items], self.settings)
            return [(r, {"batch": len(items), "queue_s": started - t0, **extra}) for r, t0 in items]

        async def run(self, request: PipelineRequest) -> tuple[PipelineRequest, dict]:
            """The request with this stage's part filled in, and the batch's meta (its size,
            this request's wait, the stage's extra seconds); a request's own error raised."""
            request, meta = await self._run_batch((request, time.perf_counter()))
            if request.error is not None:
                raise request.error
            return request, meta

    @serve.deployment(name=INGRESS)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, stages: dict, settings: dict, triton_url: str = ""):
            self.settings = Settings(**settings)
            # One registry per replica process, shared with the HTTP middleware (Serve pickles
            # this class by value, so a module global here would be a copy).
            self.metrics = replica_metrics()
            # the split path: calls to the stage deployments, {name: handle} (serving/split.py)
            self.stages = StagePath(stages, self.settings, self.metrics)
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
            """The colocated request path, on the batcher's thread (serving/pipeline.py)."""
            return run_queued(items, self.admission, self.encoding, self.settings)

        # -- plumbing

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
                answer = await self.stages.rank(state, request)
            finally:
                concurrency = self.in_flight
                self.in_flight -= 1
            # Little's law: with `concurrency` requests in flight, each costs latency/concurrency
            # of the stages' capacity
            seconds = time.perf_counter() - arrived
            self.admission.observe(1, seconds / max(1, concurrency))
            self.metrics.observe_admitted(seconds)
            return answer

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
            first = True  # the first stage of the request's path also waited in the queue
            for stage in STAGES:
                if not stage.wants(request):
                    continue
                waited = queue_s if first else 0.0
                self.metrics.observe_stage(stage.name, timings[stage.name] + waited, batch, waited)
                for part in stage.extras(request):  # e.g. retrieve's BM25 + fusion
                    self.metrics.observe_stage(part, timings[part], batch)
                first = False
            if query is not None and meta["fallback"]:
                self.metrics.encoder_fallbacks(1)
            self.metrics.policy_decisions(request.decisions)
            ids, scores, explained = result
            return rank_response(meta["version"], state.kind, ids, scores, explained)

        # -- routes

        # The routes: FastAPI serves them (and their OpenAPI schema); a JSON POST with a body
        # takes the JsonRoutes fast path to the same _search / _recommend.

        async def _search(self, body: SearchRequest) -> dict:
            check_not_blank(body.query)
            state = checked_state(self.state, body.user_id, body.history, False, body.filter)
            # every field checked before the policy
            reranking = chosen_reranking(state, body, self.settings)
            retrieval = chosen_retrieval(state, body)
            query = screen_query(state, body.query, self.metrics)
            if query is None:  # the policy cut every term of the query: nothing to search
                return rank_response((state.version, state.fingerprint), state.kind, [], [])
            request = PipelineRequest(
                query, body.history, body.user_id, body.k, False, body.explain, body.filter
            )
            request.reranking, request.retrieval = reranking, retrieval
            return await self._rank(state, request, body.deadline_ms)

        async def _recommend(self, body: RecommendRequest) -> dict:
            state = checked_state(self.state, body.user_id, body.history, True, body.filter)
            request = PipelineRequest(
                None, body.history, body.user_id, body.k, True, body.explain, body.filter
            )
            request.reranking = chosen_reranking(state, body, self.settings)
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
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def build_app(args: dict):
    """Ray Serve application builder (``kuberank.serving.app:build_app``).

    ``args``: ``model_store`` (required), ``triton_url`` ("" = in-process ONNX Runtime) and any
    Settings field (serving/settings.py). The store is checked here (manifest, index
    fingerprints, policy, default re-ranking: from the index's metadata, each replica loads
    the index itself) so that a bad store fails the deploy, not the first request.
    """
    if serve is None:  # pragma: no cover
        raise KuberankError("ray[serve] is not installed")
    args = dict(args or {})
    store = str(args.get("model_store") or "")
    if not store:
        raise KuberankError("build_app: model_store is required (a path or s3:// URI)")
    triton_url = str(args.get("triton_url") or "")
    settings = Settings.from_args(args)
    # refuse a mismatched store before any replica starts (from the index's metadata: each
    # replica loads the index itself)
    check_default_reranking(settings, check_store(store))
    plain = dataclasses.asdict(settings)
    for name in BATCHES:
        plain[name] = list(getattr(settings, name))
    user_config = {"model_store": store, "revision": settings.revision}
    options = {
        name: merge_options(opts, settings.deployments.get(name, {}))
        for name, opts in default_deployments(settings.colocate).items()
    }

    def bind(deployment, name, *init):
        return deployment.options(user_config=user_config, **options[name]).bind(*init)

    stages = {
        stage.deployment: StageDeployment.options(
            name=stage.deployment, user_config=user_config, **options[stage.deployment]
        ).bind(stage.deployment, plain, triton_url)
        for stage in STAGES
    }
    return bind(Ingress, INGRESS, stages, plain, triton_url)


def describe(args: dict) -> dict:
    """What build_app would deploy (for the launcher and docs): settings and options."""
    settings = Settings.from_args(args)
    return {
        "settings": dataclasses.asdict(settings),
        "deployments": {
            n: merge_options(o, settings.deployments.get(n, {}))
            for n, o in default_deployments(settings.colocate).items()
        },
        "pid": os.getpid(),
    }
