"""The kuberank Kubeflow pipeline: data_prep -> finetune -> evaluate -> compress -> export ->
index -> publish -> (optional) canary deploy.

:func:`build_pipeline` returns the ``@dsl.pipeline`` function for a target:

- ``target="local"``: every task runs on this machine (kfp's SubprocessRunner,
  :mod:`kuberank.pipelines.local`); fine-tuning starts a Ray cluster on 127.0.0.1 inside its
  task. No Kubernetes settings are attached (the local runner ignores them anyway).
- ``target="cluster"``: the same graph with Kubernetes settings through kfp-kubernetes:
  CPU/memory requests and limits on every task, the S3 credentials from a Secret as
  environment variables, and GPU nodes (accelerator type and limit, node selector,
  toleration) for the tasks that need one: TensorRT export always, fine-tuning when it trains
  inside its own pod (``training="pod"``). With ``training="rayjob"`` (the default) the
  fine-tuning task is a thin CPU client that creates a KubeRay ``RayJob`` whose GPU worker group
  runs ``kuberank train``, follows it to the end and copies the model into its output artifact.

Pipeline parameters default to the embedded demo (MovieLens-100K, 2 workers, a 4-minute
training budget). Caching is on for the deterministic steps (same inputs, same outputs) and off
for the ones with side effects outside the pipeline root (export/index/publish into the model
store, the canary); the long steps retry.

This module is the graph only: each task's component sits beside its step (the components/
modules; the RayJob client in :mod:`kuberank.pipelines.rayjob`; publish and canary in
:mod:`kuberank.pipelines.release`); :mod:`kuberank.pipelines.local` runs the graph on this
machine.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

from kfp import dsl, kubernetes

from kuberank.config import IMAGE
from kuberank.errors import KuberankError
from kuberank.pipelines.rayjob import finetune_rayjob_op
from kuberank.pipelines.release import canary_op, publish_op

PIPELINE_NAME = "kuberank"
TARGETS = ("local", "cluster")
TRAINING_MODES = ("rayjob", "pod")
DEMO_DATASET = "movielens-100k"
DEMO_BASELINES = "popularity,ease,zero-shot"
DEMO_STORE = "s3://kuberank-models/pipeline"

# Task names in the compiled graph (the structural tests and the docs refer to them).
PREP, FINETUNE, EVALUATE, COMPRESS, EXPORT, TENSORRT, INDEX, PUBLISH, CANARY = (
    "data-prep",
    "finetune",
    "evaluate",
    "compress",
    "export",
    "tensorrt",
    "index",
    "publish",
    "canary",
)


@dataclass(frozen=True)
class ClusterSettings:
    """Compile-time Kubernetes settings of the cluster target (kfp-kubernetes)."""

    training: str = "rayjob"  # or "pod": train inside the fine-tuning task's own pod
    accelerator_type: str = "nvidia.com/gpu"  # the resource name of the GPU
    accelerator_limit: int = 1
    gpu_node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_toleration_key: str = "nvidia.com/gpu"
    s3_secret: str = "kuberank-s3"  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    s3_secret_keys: tuple = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    image: str = IMAGE
    retries: int = 2
    retry_backoff: str = "60s"

    def __post_init__(self):
        if self.training not in TRAINING_MODES:
            raise KuberankError(
                f"--training: {self.training!r} is not one of {', '.join(TRAINING_MODES)}"
            )
        if self.accelerator_limit < 1:
            raise KuberankError("--accelerator-limit: must be at least 1")


# Per-task CPU/memory (requests = limits) on the cluster target.
TASK_RESOURCES = {
    PREP: ("2", "8G"),
    FINETUNE: ("8", "32G"),
    EVALUATE: ("4", "16G"),
    COMPRESS: ("8", "16G"),
    EXPORT: ("4", "16G"),
    TENSORRT: ("4", "16G"),
    INDEX: ("4", "16G"),
    PUBLISH: ("1", "2G"),
    CANARY: ("500m", "512M"),
}
RAYJOB_CLIENT_RESOURCES = ("1", "4G")  # the fine-tuning task when the RayJob trains
CLUSTER_ONLY_TASKS = {TENSORRT}
CACHED = {PREP, FINETUNE, EVALUATE, COMPRESS}
RETRIED = {FINETUNE, COMPRESS, EXPORT, TENSORRT, INDEX}
USES_S3 = {PREP, FINETUNE, EVALUATE, COMPRESS, EXPORT, TENSORRT, INDEX, PUBLISH, CANARY}


# --------------------------------------------------------------------------- pure helpers


def expected_tasks(target: str) -> set[str]:
    """The task names of the compiled graph for ``target``."""
    tasks = {PREP, FINETUNE, EVALUATE, COMPRESS, EXPORT, INDEX, PUBLISH, CANARY}
    return tasks | CLUSTER_ONLY_TASKS if target == "cluster" else tasks


def gpu_tasks(target: str, settings: "ClusterSettings") -> set[str]:
    """The tasks that run on a GPU node: none locally; TensorRT export on a cluster, and
    fine-tuning when it trains inside its own pod (not when a RayJob trains)."""
    if target != "cluster":
        return set()
    return {TENSORRT} | ({FINETUNE} if settings.training == "pod" else set())


# --------------------------------------------------------------------------- the pipeline


class PipelineOutputs(NamedTuple):
    """The pipeline's output artifacts (a local run returns their paths)."""

    prepared: dsl.Dataset
    model: dsl.Model
    scores: dsl.Metrics
    quality_report: dsl.Markdown
    release: dsl.Artifact
    release_report: dsl.Markdown


def build_pipeline(target: str = "local", cluster: ClusterSettings | None = None):
    """The ``@dsl.pipeline`` function for ``target`` (``local`` or ``cluster``)."""
    # local: the components' modules add ~0.65 s to this module's import (python -c timing)
    from kuberank.components.compress import compress_op
    from kuberank.components.data_prep import data_prep_op
    from kuberank.components.evaluate import evaluate_model_op
    from kuberank.components.export import export_op, tensorrt_op
    from kuberank.components.finetune import finetune_prepared_op
    from kuberank.components.index import index_op

    if target not in TARGETS:
        raise KuberankError(f"--target: {target!r} is not one of {', '.join(TARGETS)}")
    on_cluster = target == "cluster"
    settings = cluster or ClusterSettings()
    rayjob = on_cluster and settings.training == "rayjob"

    def configure(task, name: str, gpu: bool = False):
        task.set_display_name(name)
        task.set_caching_options(name in CACHED)
        if not on_cluster:
            return task

        if name in RETRIED:
            task.set_retry(
                num_retries=settings.retries,
                backoff_duration=settings.retry_backoff,
                backoff_factor=2.0,
            )
        cpu, memory = (
            RAYJOB_CLIENT_RESOURCES if (name == FINETUNE and rayjob) else TASK_RESOURCES[name]
        )
        task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(
            memory
        )
        if gpu:
            task.set_accelerator_type(settings.accelerator_type)
            task.set_accelerator_limit(settings.accelerator_limit)
            for key, value in settings.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, value)
            kubernetes.add_toleration(
                task, key=settings.gpu_toleration_key, operator="Exists", effect="NoSchedule"
            )
        if name in USES_S3:
            kubernetes.use_secret_as_env(
                task,
                secret_name=settings.s3_secret,
                secret_key_to_env={k: k for k in settings.s3_secret_keys},
            )
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="kuberank: prepare, fine-tune (Ray Train), evaluate, compress, export "
        "(ONNX/TensorRT/Triton), index, publish, canary",
    )
    def kuberank_pipeline(
        dataset_spec: str = DEMO_DATASET,
        model_store: str = DEMO_STORE,
        workers: int = 2,
        epochs: int = 0,
        max_minutes: float = 4.0,
        batch_size: int = 0,
        max_length: int = 128,
        ray_address: str = "",
        eval_split: str = "test",
        baselines: str = DEMO_BASELINES,
        compress_model: bool = True,
        compress_ladder: str = "",
        max_ndcg_drop: float = 0.01,
        ann_threshold: int = 50_000,
        deploy_canary: bool = False,
        canary_weight: int = 10,
        canary_namespace: str = "",
        rayjob_namespace: str = "kuberank",
        rayjob_scratch: str = "s3://kuberank-models/rayjobs",
    ) -> PipelineOutputs:
        prep = configure(data_prep_op(dataset_spec=dataset_spec), PREP)
        prepared = prep.outputs["prepared"]
        if rayjob:
            train = finetune_rayjob_op(
                prepared=prepared,
                scratch=rayjob_scratch,
                namespace=rayjob_namespace,
                image=settings.image,
                workers=workers,
                gpus_per_worker=settings.accelerator_limit,
                epochs=epochs,
                max_minutes=max_minutes,
                s3_secret=settings.s3_secret,
            )
            configure(train, FINETUNE)
        else:
            train = finetune_prepared_op(
                prepared=prepared,
                workers=workers,
                epochs=epochs,
                max_minutes=max_minutes,
                batch_size=batch_size,
                max_length=max_length,
                ray_address=ray_address,
            )
            configure(train, FINETUNE, gpu=FINETUNE in gpu_tasks(target, settings))
        trained = train.outputs["model"]
        quality = configure(
            evaluate_model_op(
                dataset=prepared, model=trained, split=eval_split, baselines=baselines
            ),
            EVALUATE,
        )

        def serve(model):
            """export -> (TensorRT on a GPU node) -> index, for the model that is served."""
            export = configure(export_op(model=model, store=model_store), EXPORT)
            fingerprint = export.outputs["Output"]
            if on_cluster:
                trt = configure(
                    tensorrt_op(store=model_store, fingerprint=fingerprint), TENSORRT, gpu=True
                )
                fingerprint = trt.output
            return configure(
                index_op(
                    model=model,
                    dataset=prepared,
                    store=model_store,
                    export_fingerprint=fingerprint,
                    ann_threshold=ann_threshold,
                ),
                INDEX,
            )

        with dsl.If(compress_model == True, name="compress-enabled"):  # noqa: E712 (a kfp condition)
            small = configure(
                compress_op(
                    model=trained,
                    dataset=prepared,
                    ladder=compress_ladder,
                    max_ndcg_drop=max_ndcg_drop,
                ),
                COMPRESS,
            )
            index_small = serve(small.outputs["compressed"])
        with dsl.Else(name="compress-disabled"):
            index_full = serve(trained)
        index_fingerprint = dsl.OneOf(index_small.outputs["Output"], index_full.outputs["Output"])
        release = configure(
            publish_op(
                store=model_store,
                index_fingerprint=index_fingerprint,
                scores=quality.outputs["scores"],
            ),
            PUBLISH,
        )
        with dsl.If(deploy_canary == True, name="deploy-canary"):  # noqa: E712
            configure(
                canary_op(
                    release=release.outputs["release"],
                    weight=canary_weight,
                    namespace=canary_namespace,
                ),
                CANARY,
            )
        return PipelineOutputs(
            prepared,
            trained,
            quality.outputs["scores"],
            quality.outputs["report"],
            release.outputs["release"],
            release.outputs["report"],
        )

    return kuberank_pipeline
