"""The ranking application's settings: the deployment names (the chart and the canary tooling use
them), each deployment's Ray Serve options for a local run, the cores a replica may use, and
:class:`Settings`, everything ``build_app`` accepts besides ``model_store`` and ``triton_url``.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from kuberank.errors import KuberankError
from kuberank.serving.admission import DEFAULT_BUDGET_MS
from kuberank.serving.reranking import KINDS as RERANKINGS
from kuberank.serving.reranking import missing as reranking_missing
from kuberank.serving.stages import STAGES

INGRESS = "Ingress"
# the Ingress and one deployment per stage (serving/stages.py): Ingress, QueryEncoder, Retriever,
# Ranker
DEPLOYMENTS = (INGRESS, *(stage.deployment for stage in STAGES))
# The Settings fields with a deployment's (max_batch_size, batch_wait_timeout_s): the colocated
# path's and each stage's own (``Stage.batch``)
BATCHES = ("pipeline_batch", *(stage.batch for stage in STAGES))


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


def default_deployments(colocate: bool = True) -> dict[str, dict]:
    """Per-deployment Ray Serve options for a local run; the chart passes its own through
    serveConfigV2 (they override these). ``num_cpus`` 0 lets a laptop schedule every replica;
    batching deployments take many ongoing requests (the default 5 would cap the batch).
    ``max_surge_percent`` 100: a restart (new code or builder args) starts the replacement
    before the old replica stops, so a rollout never leaves a stage without a replica.

    Colocated (the default for one node): the Ingress runs the stages itself, and their
    deployments (``QueryEncoder``, ``Retriever``, ``Ranker``; the chart names them) stay in the
    application at 0 replicas until something routes to them."""
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
        **{name: stage for name in DEPLOYMENTS[1:]},
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
        for name in BATCHES:
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


def merge_options(base: dict, override: dict) -> dict:
    """A deployment's Serve options with ``override`` merged in (dicts key by key); a fixed
    ``num_replicas`` drops the autoscaling config, and ``initial_replicas`` is raised to
    ``min_replicas``."""
    out = dict(base)
    for key, value in (override or {}).items():
        out[key] = (
            merge_options(out[key], value)
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


def check_default_reranking(settings: Settings, index) -> None:
    """Refuse a store whose index cannot serve the settings' default re-ranking."""
    default = settings.reranking()
    if default is not None and reranking_missing(index, default[0]) is not None:
        raise KuberankError(f"{default[0]}: {reranking_missing(index, default[0])}")
