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

The components defined here are the pipeline's glue (a model artifact in place of a model
path, the RayJob client, the release record, the canary values); each calls a pure function
of this module or a step module. Like every step's wrapper they use
:func:`kuberank.kfp_component.step_component`, so this module imports inside a running task.
"""

import json
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from kfp import dsl

from kuberank.config import IMAGE
from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component

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


def parse_baselines(text: str) -> list[str]:
    """``"popularity, ease"`` -> ``["popularity", "ease"]`` (empty entries dropped)."""
    return [b.strip() for b in text.split(",") if b.strip()]


def quality_report(rows: list[dict], split: str, dataset: str) -> str:
    """The evaluate step's Markdown: the fine-tuned model against the baselines."""
    from kuberank import report

    return "\n".join(
        [
            f"# Quality on {dataset} ({split} split)",
            "",
            "Full ranking over all items; each user's seen items are excluded.",
            "",
            report.format_table(rows, report.QUALITY_COLUMNS),
            "",
        ]
    )


def release_record(manifest: dict, index_meta: dict, store: str, quality: dict) -> dict:
    """What ``publish`` writes to STORE/release.json: the served version and its evidence."""
    return {
        "format": "kuberank-release/1",
        "store": store,
        "version": manifest.get("version"),
        "model_fingerprint": (manifest.get("model") or {}).get("fingerprint"),
        "embedding_fingerprint": (manifest.get("embedding") or {}).get("fingerprint"),
        "triton": {
            k: (manifest.get("triton") or {}).get(k)
            for k in ("repository", "local_repository", "encoder_backend", "precision")
        },
        "index": {k: index_meta.get(k) for k in ("count", "dim", "kind", "ann", "edge_items")},
        "compression": (manifest.get("model") or {}).get("compression"),
        "parity": manifest.get("parity"),
        "sizes": manifest.get("sizes"),
        "quality": quality,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def release_report(release: dict) -> str:
    """The publish step's Markdown: what was published, sizes, parity, compression."""
    lines = [
        f"# Release {release['version']} -> {release['store']}",
        "",
        f"- model fingerprint `{release['model_fingerprint']}`",
        f"- embedding fingerprint `{release['embedding_fingerprint']}`",
        f"- Triton: {release['triton']}",
        f"- index: {release['index']}",
        "",
        "## Sizes (bytes)",
        "",
        "| part | bytes |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in (release.get("sizes") or {}).items()]
    lines += ["", "## Parity", "", "```json", json.dumps(release.get("parity"), indent=2), "```"]
    if release.get("compression"):
        comp = release["compression"]
        lines += [
            "",
            "## Compression",
            "",
            "| teacher nDCG@10 | compressed nDCG@10 | layers | int8 bytes |",
            "|---|---|---|---|",
            f"| {comp.get('teacher_ndcg10')} | {comp.get('compressed_ndcg10')} | "
            f"{comp.get('layers')} | {comp.get('int8_bytes')} |",
        ]
    return "\n".join(lines) + "\n"


def step_headline(step: str, outputs: dict) -> str:
    """The number that matters of a finished step, from its kfp outputs (artifacts with
    metadata, parameters): what the demo and ``kuberank pipeline run --local`` print per step.
    Never raises: an unexpected output gives ``""``."""
    try:
        return _headline(step, outputs)
    except Exception:  # a summary line must not fail a run
        return ""


def _whole(value):
    """kfp hands metadata numbers back as floats: 1.0 -> 1."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _headline(step: str, outputs: dict) -> str:
    def meta(name: str) -> dict:
        return dict(getattr(outputs.get(name), "metadata", None) or {})

    if step == PREP:
        m = meta("prepared")
        rows = ", ".join(f"{int(v)} {k}" for k, v in (m.get("rows") or {}).items())
        return f"{rows} ({m.get('kind')})"
    if step == FINETUNE:
        m = meta("model")
        scores = [f"{k[4:]} {v:.4f}" for k, v in m.items() if k.startswith("val_ndcg")]
        return f"validation {scores[0].replace('ndcg', 'nDCG')}" if scores else str(m.get("kind"))
    if step == EVALUATE:
        rows = meta("report").get("rows") or []
        tuned = next((r for r in rows if r.get("model") == "fine-tuned"), None)
        value = tuned["ndcg@10"] if tuned else float(outputs["Output"])
        text = f"{tuned['split'] if tuned else 'eval'} nDCG@10 {value:.4f}"
        baselines = [r for r in rows if r is not tuned]
        if baselines:
            best = max(baselines, key=lambda r: r["ndcg@10"])
            text += f" (best baseline: {best['model']} {best['ndcg@10']:.4f})"
        return text
    if step == COMPRESS:
        m = meta("compressed")
        return (
            f"level {len(m['layers'])}x{float(m['prune_ratio']):g} (layers "
            f"{[int(x) for x in m['layers']]}): nDCG@10 {m['compressed_ndcg10']:.4f} vs teacher "
            f"{m['teacher_ndcg10']:.4f} on {m['split']}"
        )
    if step == EXPORT:
        m = meta("parity")
        text = f"embedding {str(outputs.get('Output', ''))[:19]}…"
        if "int8.cosine_min" in m:
            text += f", int8 cosine >= {m['int8.cosine_min']:.4f}"
        if "bytes.edge" in m:
            text += f", edge bundle {m['bytes.edge'] / 1e6:.0f} MB"
        return text
    if step == INDEX:
        artifact = outputs.get("index")
        m = {**json.loads(open(artifact.path).read()), **meta("index")}
        search = "ANN (HNSW)" if m.get("ann") else "exact search"
        edge = m.get("edge_items")
        text = f"{int(m['count'])} items x {int(m['dim'])}, {search}"
        if "edge_items" in m:
            text += "; no edge bundle" if edge is None else f"; edge bundle {int(edge)} items"
        return text
    if step == PUBLISH:
        m = meta("release")
        return f"release {_whole(m.get('version'))} -> {m.get('store')}"
    if step == TENSORRT:
        return "TensorRT plan built"
    if step == CANARY:
        m = meta("values")
        return f"canary weight {_whole(m.get('weight'))}% for release {_whole(m.get('version'))}"
    return ""


def canary_values(store: str, version, weight: int) -> dict:
    """Helm values that add the new model as the chart's canary track (``helm upgrade -f``)."""
    if not 1 <= weight <= 100:
        raise KuberankError(f"canary_weight: must be between 1 and 100, got {weight}")
    del version  # recorded in the values artifact's metadata; the chart reads the store's manifest
    return {"canary": {"enabled": True, "weight": weight, "modelStoreUri": store}}


def rayjob_name(run_id: str) -> str:
    """A DNS-1123 RayJob name from a pipeline run/task id."""
    safe = "".join(c if c.isalnum() else "-" for c in run_id.lower()).strip("-")
    return ("kuberank-ft-" + safe)[:52].rstrip("-")


def rayjob_manifest(
    name: str,
    *,
    image: str,
    dataset: str,
    out: str,
    workers: int,
    gpus_per_worker: int,
    epochs: int = 0,
    max_minutes: float = 0.0,
    s3_secret: str = "kuberank-s3",
    service_account: str = "kuberank-training",
    worker_cpu: str = "8",
    worker_memory: str = "32Gi",
    gpu_resource: str = "nvidia.com/gpu",
) -> dict:
    """A KubeRay RayJob (ray.io/v1) running ``kuberank train`` on ``workers`` worker pods
    (one Ray Train worker each, ``gpus_per_worker`` GPUs per pod; 0 = CPU), deleted when the
    job finishes. Same shape and security settings as manifests/base/rayjob-finetune.yaml."""
    import shlex

    if workers < 1:
        raise KuberankError("workers: must be at least 1")
    args = [
        "python",
        "-m",
        "kuberank.cli",
        "train",
        "--dataset",
        dataset,
        "--out",
        out,
        "--workers",
        str(workers),
        "--storage",
        f"{out.rstrip('/')}.checkpoints",
    ]
    if epochs:
        args += ["--epochs", str(epochs)]
    if max_minutes:
        args += ["--max-minutes", str(max_minutes)]
    args += ["--use-gpu"] if gpus_per_worker else ["--no-use-gpu"]
    security = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod_security = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 100,
        "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    env = [{"name": "HOME", "value": "/tmp/home"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    ]
    labels = {"app.kubernetes.io/name": "kuberank", "app.kubernetes.io/component": "training"}

    def pod(container: str, cpu: str, memory: str, gpus: int, ports=None) -> dict:
        resources = {"cpu": cpu, "memory": memory, **({gpu_resource: str(gpus)} if gpus else {})}
        spec = {
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "securityContext": pod_security,
            "containers": [
                {
                    "name": container,
                    "image": image,
                    "env": env,
                    "resources": {"requests": resources, "limits": resources},
                    "securityContext": security,
                    "volumeMounts": [
                        {"name": "dshm", "mountPath": "/dev/shm"},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                    **({"ports": ports} if ports else {}),
                }
            ],
            "volumes": [
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "16Gi"}},
            ],
        }
        if gpus:
            spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
            spec["tolerations"] = [
                {"key": gpu_resource, "operator": "Exists", "effect": "NoSchedule"}
            ]
        return {"metadata": {"labels": labels}, "spec": spec}

    head_ports = [
        {"name": "gcs", "containerPort": 6379, "protocol": "TCP"},
        {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"},
        {"name": "client", "containerPort": 10001, "protocol": "TCP"},
    ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "entrypoint": shlex.join(args),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": 21600,
            "backoffLimit": 1,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": pod("ray-head", "2", "8Gi", 0, head_ports),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "train-gpu" if gpus_per_worker else "train",
                        "replicas": workers,
                        "minReplicas": workers,
                        "maxReplicas": workers,
                        "rayStartParams": {},
                        "template": pod("ray-worker", worker_cpu, worker_memory, gpus_per_worker),
                    }
                ],
            },
        },
    }


TERMINAL_JOB_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}


def rayjob_outcome(status: dict) -> str | None:
    """``None`` while the RayJob runs; ``"SUCCEEDED"``; or a failure message from its status
    (``jobStatus``, ``jobDeploymentStatus``, ``message``)."""
    job = (status or {}).get("jobStatus", "")
    deployment = (status or {}).get("jobDeploymentStatus", "")
    if job == "SUCCEEDED":
        return "SUCCEEDED"
    if job in TERMINAL_JOB_STATUSES or deployment in ("Failed", "ValidationFailed"):
        return f"RayJob {job or deployment}: {status.get('message') or status.get('reason') or 'no message'}"
    return None


def run_rayjob(
    manifest: dict,
    namespace: str,
    *,
    timeout_s: float = 6 * 3600,
    poll_s: float = 15.0,
    api=None,
    echo=print,
) -> dict:
    """Create the RayJob in ``namespace`` with the in-cluster service account (the
    kuberank-pipeline-runner Role allows it), follow it until it ends and return its status.
    Raises KuberankError on failure or timeout."""
    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    name = manifest["metadata"]["name"]
    api.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", manifest)
    echo(f"created RayJob {namespace}/{name}: {manifest['spec']['entrypoint']}")
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        obj = api.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name)
        status = obj.get("status") or {}
        now = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if now != last:
            echo(f"RayJob {name}: deployment {now[0] or '-'}, job {now[1] or '-'}")
            last = now
        outcome = rayjob_outcome(status)
        if outcome == "SUCCEEDED":
            return status
        if outcome:
            raise KuberankError(outcome)
        if time.monotonic() > deadline:
            raise KuberankError(f"RayJob {name}: not finished after {timeout_s:.0f} s")
        time.sleep(poll_s)


def s3_uri(uri: str) -> str:
    """An artifact URI as kuberank storage reads it: KFP's ``minio://bucket/key`` is S3."""
    return "s3://" + uri[len("minio://") :] if uri.startswith("minio://") else uri


# --------------------------------------------------------------------------- components


@step_component()
def finetune_prepared_op(
    prepared: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    workers: int = 2,
    epochs: int = 0,
    max_minutes: float = 0.0,
    batch_size: int = 0,
    max_length: int = 128,
    ray_address: str = "",
):
    """Fine-tune on the prepared dataset artifact inside this task: a local Ray cluster on
    127.0.0.1, or the Ray cluster at ``ray_address``."""
    import json

    from kuberank.components.finetune import TrainConfig, train

    out = train(
        TrainConfig(
            dataset=f"prepared:{prepared.path}",
            out=model.path,
            workers=workers,
            epochs=epochs or None,
            max_minutes=max_minutes or None,
            batch_size=batch_size or None,
            max_length=max_length,
            ray_address=ray_address or None,
        )
    )
    info = json.loads((out / "kuberank.json").read_text())
    model.metadata.update(
        {"fingerprint": info["fingerprint"], "kind": info["kind"], **info["metrics"]}
    )


@step_component()
def finetune_rayjob_op(
    prepared: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    scratch: str,
    namespace: str = "kuberank",
    image: str = "",
    workers: int = 2,
    gpus_per_worker: int = 1,
    epochs: int = 0,
    max_minutes: float = 0.0,
    s3_secret: str = "kuberank-s3",
    timeout_minutes: float = 360.0,
):
    """Train on a throw-away KubeRay cluster: create a RayJob running ``kuberank train`` on the
    prepared dataset (read from the artifact store, s3://), wait for it, copy the model from
    ``scratch`` (an s3:// prefix) into this task's output artifact."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    from kuberank.config import IMAGE
    from kuberank.pipelines.pipeline import rayjob_manifest, rayjob_name, run_rayjob, s3_uri
    from kuberank.storage import materialize

    # One RayJob per task execution: named after the output artifact's URI (unique per run).
    name = rayjob_name(hashlib.sha256(model.uri.encode()).hexdigest()[:16])
    out = f"{scratch.rstrip('/')}/{name}/model"
    manifest = rayjob_manifest(
        name,
        image=image or IMAGE,
        dataset=f"prepared:{s3_uri(prepared.uri)}",
        out=out,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        epochs=epochs,
        max_minutes=max_minutes,
        s3_secret=s3_secret,
    )
    run_rayjob(manifest, namespace, timeout_s=timeout_minutes * 60)
    shutil.copytree(materialize(out), model.path, dirs_exist_ok=True)
    info = json.loads((Path(model.path) / "kuberank.json").read_text())
    model.metadata.update(
        {
            "fingerprint": info["fingerprint"],
            "kind": info["kind"],
            "rayjob": name,
            **info["metrics"],
        }
    )


@step_component()
def evaluate_model_op(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    scores: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    split: str = "test",
    baselines: str = "popularity,ease,zero-shot",
) -> float:
    """The fine-tuned model against the baselines on ``split``; the model's metrics are logged,
    the table of all rows is the Markdown report. Returns the model's nDCG@10."""
    import json

    from kuberank import datasets
    from kuberank.components.evaluate import evaluate
    from kuberank.pipelines.pipeline import parse_baselines, quality_report

    data = datasets.load(f"prepared:{dataset.path}")
    rows = [evaluate(data, name, split) for name in parse_baselines(baselines)]
    tuned = evaluate(data, model.path, split)
    tuned["model"] = "fine-tuned"
    rows.append(tuned)
    for name, value in tuned.items():
        if isinstance(value, (int, float)):
            scores.log_metric(name, value)
    with open(report.path, "w") as fh:
        fh.write(quality_report(rows, split, data.name))
    report.metadata["rows"] = json.loads(json.dumps(rows, default=str))
    return float(tuned["ndcg@10"])


@step_component()
def tensorrt_op(store: str, fingerprint: str) -> str:
    """On a GPU node: build the TensorRT plan from the store's ONNX and switch the production
    Triton repository to it. ``fingerprint`` (export's output) orders it after the export and
    is checked against the store. Returns the fingerprint."""
    from kuberank.components.export import export_tensorrt
    from kuberank.errors import KuberankError
    from kuberank.store import read_manifest

    found = read_manifest(store)["embedding"]["fingerprint"]
    if found != fingerprint:
        raise KuberankError(
            f"store {store}: holds embedding {found}, export produced {fingerprint}"
        )
    export_tensorrt(store)
    return fingerprint


@step_component()
def publish_op(
    store: str,
    index_fingerprint: str,
    scores: dsl.Input[dsl.Metrics],
    release: dsl.Output[dsl.Artifact],
    report: dsl.Output[dsl.Markdown],
):
    """Check the store is complete and consistent (manifest, Triton repositories, an index
    embedded by this encoder, the one the index step reported, an edge bundle holding its
    items), then write STORE/release.json:
    the record deploys read. (The join of the two branches is this string, not the index
    artifact: kfp's local runner resolves ``dsl.OneOf`` for parameters only.)"""
    import json
    import tempfile
    from pathlib import Path

    from kuberank.components.edge import BUNDLE_FILE
    from kuberank.item_index import check_index, load_index
    from kuberank.pipelines.pipeline import release_record, release_report
    from kuberank.storage import materialize, publish
    from kuberank.store import EDGE_DIR, INDEX_DIR, RELEASE_FILE, TRITON_PARTS, read_manifest

    manifest = read_manifest(store)
    meta = load_index(store).meta
    check_index(meta, manifest, where=f"{store}/{INDEX_DIR}")
    if meta["embedding_fingerprint"] != index_fingerprint:
        raise ValueError(
            f"{store}/{INDEX_DIR}: embedding {meta['embedding_fingerprint']}, the index step "
            f"built {index_fingerprint}: another run wrote the store meanwhile"
        )
    for part in TRITON_PARTS:
        root = Path(materialize(f"{store.rstrip('/')}/{part}"))
        if not (root / "query_encoder" / "config.pbtxt").is_file():
            raise FileNotFoundError(
                f"{store}/{part}: no query_encoder ensemble; export did not finish"
            )
    edge_dir = Path(materialize(f"{store.rstrip('/')}/{EDGE_DIR}"))
    edge = json.loads((edge_dir / BUNDLE_FILE).read_text())
    if edge.get("items") != meta["count"] or edge.get("fingerprint") != index_fingerprint:
        raise ValueError(
            f"{store}/{EDGE_DIR}: {edge.get('items')} items of embedding {edge.get('fingerprint')}, the "
            f"index holds {meta['count']} of {index_fingerprint}; the index step did not finish"
        )
    quality = {k: v for k, v in scores.metadata.items() if isinstance(v, (int, float))}
    record = release_record(manifest, meta, store, quality)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RELEASE_FILE
        path.write_text(json.dumps(record, indent=2) + "\n")
        publish(path, f"{store.rstrip('/')}/{RELEASE_FILE}")
    Path(release.path).write_text(json.dumps(record, indent=2) + "\n")
    release.metadata.update(
        {
            "store": store,
            "version": record["version"],
            "embedding_fingerprint": record["embedding_fingerprint"],
        }
    )
    Path(report.path).write_text(release_report(record))


@step_component()
def canary_op(
    release: dsl.Input[dsl.Artifact],
    values: dsl.Output[dsl.Artifact],
    weight: int = 10,
    namespace: str = "",
    kubectl_args: str = "",
):
    """Helm values adding the release as the chart's canary track (apply them with ``helm
    upgrade -f`` or a GitOps repository). With ``namespace`` set, also set the HTTPRoute's first
    canary weight there (``kubectl kuberank canary start --no-wait``; the analysis loop continues
    from ``kubectl kuberank canary analyze --apply``)."""
    import json
    import shlex
    from pathlib import Path

    import yaml

    from kuberank.deploy import canary
    from kuberank.pipelines.pipeline import canary_values

    record = json.loads(Path(release.path).read_text())
    Path(values.path).write_text(
        yaml.safe_dump(canary_values(record["store"], record["version"], weight))
    )
    values.metadata.update(
        {"store": record["store"], "version": record["version"], "weight": weight}
    )
    if namespace:
        code = canary.main(
            [
                *shlex.split(kubectl_args),
                "-n",
                namespace,
                "canary",
                "start",
                "--weight",
                str(weight),
                "--no-wait",
            ]
        )
        if code != 0:
            raise RuntimeError(f"kubectl kuberank canary start exited with {code}")


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
    from kuberank.components.compress import compress_op
    from kuberank.components.data_prep import data_prep_op
    from kuberank.components.export import export_op
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
        from kfp import kubernetes

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


# --------------------------------------------------------------------------- local run


def run_local(
    pipeline_root,
    *,
    log_dir=None,
    on_start=None,
    on_step=None,
    tee: bool = False,
    **params,
) -> dict:
    """Run the whole pipeline on this machine (kfp SubprocessRunner; artifacts under
    ``pipeline_root``, the model store at ``pipeline_root/store`` unless ``model_store`` is
    given). ``params`` are pipeline parameters. With ``log_dir`` what kfp prints goes to a log
    file per task there (:func:`kuberank.pipelines.local.task_logs`; ``tee`` keeps it on the
    console too); ``on_start(name)`` and ``on_step(StepResult)`` follow the steps. A failed
    step raises KuberankError naming the step and its log. Returns the output artifacts' paths,
    the model store, the fine-tuned model's metrics and the release record."""
    from pathlib import Path

    from kuberank.pipelines.local import init_local_runner, run_logged

    root = init_local_runner(pipeline_root)
    params.setdefault("model_store", str(root / "store"))
    started = time.perf_counter()
    task = run_logged(
        lambda: build_pipeline("local")(**params),
        log_dir,
        on_start=on_start,
        on_step=on_step,
        tee=tee,
    )
    out = {
        name: task.outputs[name]
        for name in ("prepared", "model", "scores", "quality_report", "release", "release_report")
    }
    release = json.loads(Path(out["release"].path).read_text())
    return {
        "pipeline_root": str(root),
        "model_store": params["model_store"],
        **{f"{name}_path": artifact.path for name, artifact in out.items()},
        "metrics": {k: v for k, v in out["scores"].metadata.items() if isinstance(v, (int, float))},
        "quality_rows": out["quality_report"].metadata.get("rows", []),
        "release": release,
        "seconds": round(time.perf_counter() - started, 1),
    }
