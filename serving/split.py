"""The split request path: the Ingress calls the QueryEncoder, Retriever and Ranker deployments
one after another, each call bounded by ``stage_timeout_s``, retried when its replica died, and
its failures answered as the HTTP problems of serving/http_api.py (back-pressure and an
unavailable stage: 503)."""

import asyncio
import time

from kuberank.serving.admission import Overloaded
from kuberank.serving.encoders import EncoderUnavailableError
from kuberank.serving.http_api import RequestProblem, unknown_items_problem
from kuberank.serving.pipeline import Pipeline, PipelineRequest, rank_response
from kuberank.serving.policies import candidate_count, policy_decisions
from kuberank.serving.settings import Settings
from kuberank.serving.stages import RankRequest, RetrieveRequest, UnknownItemsError


async def _await(response):
    return await response


class StagePath:
    """The Ingress's handles to the stage deployments, with its settings and metrics."""

    def __init__(self, encoder, retriever, ranker, settings: Settings, metrics):
        self.encoder, self.retriever, self.ranker = encoder, retriever, ranker
        self.settings, self.metrics = settings, metrics

    async def call(self, stage: str, method, *args):
        """One downstream call: bounded by stage_timeout_s, retried when its replica
        died, back-pressure and unavailability mapped to 503."""
        # ray imported here, as app.py imports serve: the module stays importable without it
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
                    raise RequestProblem(503, f"query encoder unavailable: {exc.cause}") from None
                if isinstance(exc.cause, UnknownItemsError):
                    raise unknown_items_problem(getattr(exc.cause, "ids", [])) from None
                raise
            except UnknownItemsError as exc:
                raise unknown_items_problem(exc.ids) from None

    async def rank(self, state: Pipeline, request: PipelineRequest) -> dict:
        """One request through the QueryEncoder (with a query), Retriever and Ranker
        deployments; each stage's latency and the policy's decisions observed."""
        query, history, k = request.query, request.history, request.k
        vector = None
        if query is not None:
            t = time.perf_counter()
            vector, meta = await self.call("encode", self.encoder.encode, query)
            self.metrics.observe_stage(
                "encode", time.perf_counter() - t, meta["batch"], meta["queue_s"]
            )
            if meta.get("fallback"):
                self.metrics.encoder_fallbacks(1)
        n = candidate_count(state.index.policy, k, self.settings.candidates)
        mode = request.retrieval
        t = time.perf_counter()
        rows, found, meta = await self.call(
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
        ids, scores, version, meta = await self.call(
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
        self.metrics.observe_stage("rank", time.perf_counter() - t, meta["batch"], meta["queue_s"])
        self.metrics.policy_decisions(policy_decisions(removed, meta["capped"]))
        return rank_response(version, state.kind, ids, scores, meta.get("explain"))
