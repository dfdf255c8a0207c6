"""manifests/: kustomize base and overlays rendered by the real `kubectl kustomize`, validated
strictly (core kinds with kubernetes-validate at a pinned version, the RayJob with the project's
schema and its pod templates as core PodTemplates), and checked against the policies and the
contracts with the rest of kuberank (the training CLI, the image, the canary plugin's needs)."""

from __future__ import annotations

import copy
import functools
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from kuberank import config
from kuberank.deploy import canary
from kuberank.deploy import chart as kubechart
from kuberank.deploy import schema as kubeschema
from tests.conftest import crd_file

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
TARGETS = {"base": None, "overlays/dev": "kuberank-dev", "overlays/prod": "kuberank"}
# The operators' real CRDs (see its README.md): KubeRay's oldest and newest supported versions.
RAYJOB_CRDS = ["rayjobs-v1.1.0.yaml", "rayjobs-v1.7.0.yaml"]


@functools.cache
def _kustomize(target: str) -> str:
    kubectl = canary.find_kubectl()
    proc = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / target)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def build(target: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_kustomize(target)) if d]


def one(objs: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def rayjob(target: str) -> dict:
    return one(build(target), "RayJob", "kuberank-finetune")


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_builds_and_validates_strictly(target):
    objs = build(target)
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objs) == [
        ("RayJob", "kuberank-finetune"),
        ("Role", "kuberank-pipeline-runner"),
        ("RoleBinding", "kuberank-pipeline-runner"),
        ("ServiceAccount", "kuberank-pipeline-runner"),
        ("ServiceAccount", "kuberank-training"),
    ]
    for obj in objs:
        kubeschema.validate(obj)
        assert obj["metadata"].get("namespace") == TARGETS[target]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kuberank"


def test_rayjob_schema_catches_mistakes():
    job = rayjob("overlays/dev")
    job["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(kubeschema.ManifestError, match="shutdownAfterJobFinish"):
        kubeschema.validate(job)
    job = rayjob("overlays/dev")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]["cpu"] = "two"
    with pytest.raises(kubeschema.ManifestError, match="workerGroupSpecs\\[0\\].template"):
        kubeschema.validate(job)


@pytest.mark.parametrize("crd", RAYJOB_CRDS)
@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_validates_against_real_crds(target, crd):
    """Every field of the RayJob is known to KubeRay 1.1 and 1.7 (unknown ones would be pruned)."""
    kubeschema.validate_against_crd(rayjob(target), crd_file(crd))


@pytest.mark.parametrize("crd", RAYJOB_CRDS)
def test_rayjob_crd_validation_is_not_vacuous(crd):
    path = crd_file(crd)
    job = copy.deepcopy(rayjob("overlays/dev"))
    job["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(kubeschema.ManifestError, match=r"spec: .*'shutdownAfterJobFinish'"):
        kubeschema.validate_against_crd(job, path)
    job = copy.deepcopy(rayjob("overlays/dev"))
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubeschema.ManifestError, match=r"submitterPodTemplate.*'resource'"):
        kubeschema.validate_against_crd(job, path)


@pytest.mark.parametrize("target", TARGETS)
def test_policy_security_and_limits(target):
    objs = build(target)
    assert [p for o in objs for p in kubeschema.security_violations(o)] == []
    pods = [w for o in objs for w, _ in kubeschema.pod_specs(o)]
    assert len(pods) == 3  # head, workers, submitter


def test_policy_violations_are_reported():
    job = rayjob("overlays/dev")
    spec = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    del spec["containers"][0]["resources"]["limits"]["memory"]
    problems = kubeschema.security_violations(job)
    assert any("ray-head: readOnlyRootFilesystem is not true" in p for p in problems)
    assert any("ray-head: no memory limit" in p for p in problems)


def test_gpus_only_on_prod_training_workers():
    assert kubeschema.gpu_consumers(build("overlays/dev")) == []
    assert kubeschema.gpu_consumers(build("base")) == []
    assert kubeschema.gpu_consumers(build("overlays/prod")) == [
        "RayJob/kuberank-finetune workerGroupSpecs[0].template:ray-worker"
    ]
    worker = rayjob("overlays/prod")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    spec = worker["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


def _train_args(job: dict) -> dict[str, str]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "kuberank.cli", "train"], argv
    flags = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert set(flags) == {"--dataset", "--out", "--workers"}, flags
    return flags


@pytest.mark.parametrize(
    ("target", "workers"), [("base", 2), ("overlays/dev", 2), ("overlays/prod", 4)]
)
def test_entrypoint_matches_the_training_cli_and_the_cluster(target, workers):
    job = rayjob(target)
    flags = _train_args(job)
    assert flags["--out"].startswith("s3://")
    # the image carries no dataset (no recbole files): the job reads prepared data on S3
    assert flags["--dataset"].startswith("prepared:s3://"), flags["--dataset"]
    assert int(flags["--workers"]) == workers
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    # one Ray Train worker per pod, on a fixed-size cluster that is deleted afterwards
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_images_follow_the_project_image():
    images = set()
    for target in TARGETS:
        for _, spec in kubeschema.pod_specs(rayjob(target)):
            images |= {c["image"] for c in spec["containers"]}
    assert images == {config.IMAGE}
    chart_values = yaml.safe_load((ROOT / "charts/kuberank/values.yaml").read_text())
    img = chart_values["serve"]["image"]
    assert f"{img['registry']}/{img['repository']}:{img['tag']}" == config.IMAGE


def test_credentials_only_through_secret_refs_or_cloud_identity():
    dev_env = [
        e
        for _, spec in kubeschema.pod_specs(rayjob("overlays/dev"))
        for c in spec["containers"]
        for e in c.get("env", [])
    ]
    keys = [e for e in dev_env if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    assert len(keys) == 4  # head and workers
    assert all(
        "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "kuberank-minio-credentials"
        for e in keys
    )
    prod = build("overlays/prod")
    prod_env = [
        e["name"]
        for _, spec in kubeschema.pod_specs(rayjob("overlays/prod"))
        for c in spec["containers"]
        for e in c.get("env", [])
    ]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(prod_env)
    sa = one(prod, "ServiceAccount", "kuberank-training")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for target in TARGETS:
        assert [o for o in build(target) if o["kind"] == "Secret"] == []


@pytest.mark.parametrize("target", TARGETS)
def test_pipeline_runner_rbac(target):
    objs = build(target)
    role = one(objs, "Role", "kuberank-pipeline-runner")
    binding = one(objs, "RoleBinding", "kuberank-pipeline-runner")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["name"] == "kuberank-pipeline-runner"
    assert subject.get("namespace") == TARGETS[target]  # kustomize's namespace follows the overlay
    one(objs, "ServiceAccount", "kuberank-pipeline-runner")

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
            for r in role["rules"]
        )

    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "secrets" not in rule["resources"]
    # run and follow the fine-tuning job
    assert allowed("ray.io", "rayjobs", "create") and allowed("ray.io", "rayjobs", "watch")
    assert allowed("", "pods/log", "get")
    # what `kubectl kuberank canary` does: get and merge-patch the HTTPRoute
    resource, _, group = canary.ROUTE_RESOURCE.partition(".")
    assert allowed(group, resource, "get") and allowed(group, resource, "patch")
    # but no pod creation, no deletes outside its own RayJobs
    assert not allowed("", "pods", "create") and not allowed("ray.io", "rayservices", "delete")


def test_training_pods_get_no_api_token():
    for target in TARGETS:
        objs = build(target)
        assert (
            one(objs, "ServiceAccount", "kuberank-training")["automountServiceAccountToken"]
            is False
        )
        for _, spec in kubeschema.pod_specs(rayjob(target)):
            assert spec["serviceAccountName"] == "kuberank-training"
            assert spec["automountServiceAccountToken"] is False


def test_chart_policies_through_the_shared_checks():
    """The same checks over the chart's production render, so chart and manifests agree."""
    values = kubechart.load_values_files(ROOT / "charts/kuberank/ci/gpu-prod-values.yaml")
    objs = kubechart.render(ROOT / "charts/kuberank", values)
    assert [p for o in objs for p in kubeschema.security_violations(o)] == []
    assert kubeschema.gpu_consumers(objs) == ["Deployment/kuberank-triton:triton"]


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_parses_with_the_real_training_cli(target):
    """The RayJob's command line is accepted by kuberank's own CLI parser (the contract)."""
    from kuberank import cli

    argv = shlex.split(rayjob(target)["spec"]["entrypoint"])
    args = cli.build_parser().parse_args(argv[3:])
    assert args.command == "train"
    assert args.workers == int(_train_args(rayjob(target))["--workers"])
    assert (
        args.ray_address is None
    )  # the job's RAY_ADDRESS points the driver at the RayJob's cluster
