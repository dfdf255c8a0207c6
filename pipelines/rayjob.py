"""The RayJob runner of the pipeline's cluster target: the fine-tuning task as a thin CPU client
that creates a KubeRay ``RayJob`` (ray.io/v1) whose worker group runs ``kuberank train``,
follows it to the end and copies the model into its output artifact
(:func:`finetune_rayjob_op`); the manifest (:func:`rayjob_manifest`) has the shape and security
settings of manifests/base/rayjob-finetune.yaml."""

import shlex
import time

from kfp import dsl

from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component


def s3_uri(uri: str) -> str:
    """An artifact URI as kuberank storage reads it: KFP's ``minio://bucket/key`` is S3."""
    return "s3://" + uri[len("minio://") :] if uri.startswith("minio://") else uri


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
        from kubernetes import client, config  # local: heavy (~0.3 s), the cluster path only

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
    from kuberank.pipelines.rayjob import rayjob_manifest, rayjob_name, run_rayjob, s3_uri
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
