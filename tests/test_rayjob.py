"""The cluster target's RayJob runner (pipelines/rayjob.py): the manifest is a valid, hardened
KubeRay RayJob running the real ``kuberank train`` command, and the client follows it to its
outcome (a scripted stand-in of the Kubernetes custom-objects API: there is no API server
here)."""

import shlex

import pytest

from kuberank.errors import KuberankError
from kuberank.pipelines import rayjob


def test_rayjob_manifest_is_valid_and_runs_the_real_train_command():
    from kuberank.cli import build_parser as kuberank_parser
    from kuberank.deploy import schema as kubeschema

    job = rayjob.rayjob_manifest(
        rayjob.rayjob_name("Run_42/ABC"),
        image="img:1",
        dataset="prepared:s3://b/p",
        out="s3://b/m",
        workers=4,
        gpus_per_worker=1,
        max_minutes=30,
    )
    assert job["metadata"]["name"] == "kuberank-ft-run-42-abc"
    kubeschema.validate(job)
    assert kubeschema.security_violations(job) == []
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == 4
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "kuberank.cli"]
    args = kuberank_parser().parse_args(argv[3:])
    assert (args.dataset, args.out, args.workers, args.storage, args.use_gpu, args.max_minutes) == (
        "prepared:s3://b/p",
        "s3://b/m",
        4,
        "s3://b/m.checkpoints",
        True,
        30.0,
    )
    cpu = rayjob.rayjob_manifest(
        "kuberank-ft-x", image="img:1", dataset="d", out="/o", workers=1, gpus_per_worker=0
    )
    kubeschema.validate(cpu)
    assert (
        "tolerations"
        not in cpu["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    )
    assert kuberank_parser().parse_args(shlex.split(cpu["spec"]["entrypoint"])[3:]).use_gpu is False
    with pytest.raises(KuberankError, match="workers"):
        rayjob.rayjob_manifest("x", image="i", dataset="d", out="o", workers=0, gpus_per_worker=0)


class _ScriptedRayJobs:
    """Stands in for the Kubernetes custom-objects API: returns the given statuses in turn."""

    def __init__(self, statuses):
        self.statuses, self.created = list(statuses), []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural, body["metadata"]["name"]))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return {"status": self.statuses.pop(0)}


def test_rayjob_is_followed_to_its_outcome():
    assert rayjob.rayjob_outcome({}) is None
    assert rayjob.rayjob_outcome({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}) is None
    assert rayjob.rayjob_outcome({"jobStatus": "SUCCEEDED"}) == "SUCCEEDED"
    assert "OOMKilled" in rayjob.rayjob_outcome({"jobStatus": "FAILED", "message": "OOMKilled"})
    assert "ValidationFailed" in rayjob.rayjob_outcome({"jobDeploymentStatus": "ValidationFailed"})
    job = rayjob.rayjob_manifest(
        "kuberank-ft-a", image="i", dataset="d", out="s3://b/m", workers=1, gpus_per_worker=1
    )
    api = _ScriptedRayJobs(
        [
            {"jobDeploymentStatus": "Initializing"},
            {"jobStatus": "RUNNING"},
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        ]
    )
    lines = []
    status = rayjob.run_rayjob(job, "ml", api=api, poll_s=0, echo=lines.append)
    assert status["jobStatus"] == "SUCCEEDED"
    assert api.created == [("ray.io", "v1", "ml", "rayjobs", "kuberank-ft-a")]
    assert len(lines) == 4  # created + three state changes
    api = _ScriptedRayJobs(
        [{"jobStatus": "RUNNING"}, {"jobStatus": "FAILED", "message": "worker lost"}]
    )
    with pytest.raises(KuberankError, match="RayJob FAILED: worker lost"):
        rayjob.run_rayjob(job, "ml", api=api, poll_s=0, echo=lambda _: None)
