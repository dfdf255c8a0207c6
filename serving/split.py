"""The split request path: the Ingress calls the stage deployments (QueryEncoder, Retriever,
Ranker: serving/stages.py's STAGES, each the generic StageDeployment of serving/app.py) one
after another, passing the request from one to the next; each call bounded by
``stage_timeout_s``, retried when its replica died, and its failures answered as the HTTP
problems of serving/http_api.py (back-pressure and an unavailable stage: 503)."""

import asyncio
import time

from kuberank.serving.admission import Overloaded
from kuberank.serving.encoders import EncoderUnavailableError
from kuberank.serving.http_api import RequestProblem, unknown_items_problem
from kuberank.serving.pipeline import Pipeline, PipelineRequest, rank_response
from kuberank.serving.settings import Settings
from kuberank.serving.stages import STAGES, UnknownItemsError


async def _await(response):
    return await response


class StagePath:
    """The Ingress's handles to the stage deployments, with its settings and metrics."""

    def __init__(self, handles: dict, settings: Settings, metrics):
        self.handles = handles  # {stage.deployment: its handle} for each of STAGES
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
        """One request through the stage deployments, in STAGES order (each stage the request
        goes through); each stage's latency and the policy's decisions observed."""
        for stage in STAGES:
            if not stage.wants(request):
                continue
            t = time.perf_counter()
            handle = self.handles[stage.deployment]
            request, meta = await self.call(stage.name, handle.run, request)
            seconds = time.perf_counter() - t
            self.metrics.observe_stage(stage.name, seconds, meta["batch"], meta["queue_s"])
            for part in stage.extras(request):  # e.g. retrieve's BM25 + fusion
                self.metrics.observe_stage(part, meta[part], meta["batch"])
        if request.fallback:
            self.metrics.encoder_fallbacks(1)
        self.metrics.policy_decisions(request.decisions)
        ids, scores, explained = request.result
        return rank_response(request.version, state.kind, ids, scores, explained)
