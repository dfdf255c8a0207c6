"""charts/kuberank: helm lint --strict and render with the real Helm library for every ci/ values
file, strict schema validation of every object, policy checks, and the monitoring rules through
Prometheus' own promtool. No Kubernetes API server is involved anywhere."""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
from pathlib import Path

import helm_python
import pytest
import yaml

from kuberank.deploy import chart as kubechart
from kuberank.deploy import schema as kubeschema
from tests.conftest import crd_file, require_binary

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kuberank"
CI_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
VARIANTS = ["defaults", *CI_FILES]
KUBE_VERSION = "v" + kubeschema.KUBERNETES_VERSION
GPU = "nvidia.com/gpu"
# The operators' real CRDs (see its README.md); a user's checkout may not have them.
# (group, kind) -> CRD files of the oldest and newest operator versions the chart supports
CHART_CRDS = {
    ("ray.io", "RayService"): ["rayservices-v1.1.0.yaml", "rayservices-v1.7.0.yaml"],
    ("gateway.networking.k8s.io", "HTTPRoute"): [
        "httproutes-v1.2.0.yaml",
        "httproutes-v1.6.1.yaml",
    ],
    ("monitoring.coreos.com", "ServiceMonitor"): ["servicemonitors-v0.93.0.yaml"],
    ("monitoring.coreos.com", "PrometheusRule"): ["prometheusrules-v0.93.0.yaml"],
}


def values_for(variant: str) -> dict:
    if variant == "defaults":
        return {}
    return kubechart.load_values_files(CHART / "ci" / variant)


@functools.cache
def _rendered(variant: str, overrides: str = "{}") -> tuple:
    values = values_for(variant)
    kubechart.deep_merge(values, json.loads(overrides))
    return tuple(json.dumps(o) for o in kubechart.render(CHART, values))


def render(variant: str = "defaults", **overrides) -> list[dict]:
    return [json.loads(o) for o in _rendered(variant, json.dumps(overrides, sort_keys=True))]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind}/{name}, found {[o['metadata']['name'] for o in by_kind(objs, kind)]}"
    )
    return found[0]


def test_ci_values_files_exist():
    assert CI_FILES == ["canary-values.yaml", "cpu-dev-values.yaml", "gpu-prod-values.yaml"]


# --- lint and render --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(variant):
    report = helm_python.lint(
        str(CHART), values_for(variant), strict=True, kube_version=KUBE_VERSION
    )
    assert report["errors"] == []
    # severity 2 = warning, 3 = error; info (1) is only "icon is recommended"
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_validates_strictly(variant):
    objs = render(variant)
    kinds = {o["kind"] for o in objs}
    assert {
        "Deployment",
        "Service",
        "RayService",
        "HTTPRoute",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
    } <= kinds
    for obj in objs:
        kubeschema.validate(obj)  # core kinds: kubernetes-validate strict; CRs: own schemas


def test_validation_catches_broken_objects():
    """The validators are not vacuous: a misspelt field fails with the field named."""
    objs = render()
    deploy = copy.deepcopy(by_kind(objs, "Deployment")[0])
    deploy["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubeschema.ManifestError, match="resource"):
        kubeschema.validate(deploy)
    route = copy.deepcopy(by_kind(objs, "HTTPRoute")[0])
    route["spec"]["rules"][0]["backendRefs"][0]["weigth"] = 5
    with pytest.raises(kubeschema.ManifestError, match="weigth"):
        kubeschema.validate(route)
    rs = copy.deepcopy(by_kind(objs, "RayService")[0])
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "imagePullPolcy"
    ] = "x"
    with pytest.raises(
        kubeschema.ManifestError, match="workerGroupSpecs\\[0\\].template.*imagePullPolcy"
    ):
        kubeschema.validate(rs)
    rs = copy.deepcopy(by_kind(objs, "RayService")[0])
    rs["spec"]["serveConfigV2"] = rs["spec"]["serveConfigV2"].replace(
        "max_ongoing_requests", "max_ongoing_request"
    )
    with pytest.raises(kubeschema.ManifestError, match="max_ongoing_request"):
        kubeschema.validate(rs)
    sm = copy.deepcopy(by_kind(objs, "ServiceMonitor")[0])
    sm["spec"]["endpoints"][0]["relabelings"][0]["action"] = "rename"
    with pytest.raises(kubeschema.ManifestError, match="relabelings"):
        kubeschema.validate(sm)
    rule = copy.deepcopy(by_kind(objs, "PrometheusRule")[0])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(kubeschema.ManifestError, match="for"):
        kubeschema.validate(rule)


# --- custom resources against the operators' real CRDs ------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_custom_resource_kind_has_crds(variant):
    custom = {
        (o["apiVersion"].rpartition("/")[0], o["kind"])
        for o in render(variant)
        if kubeschema.is_custom(o)
    }
    assert custom == set(CHART_CRDS)


@pytest.mark.parametrize("crd", sorted(f for files in CHART_CRDS.values() for f in files))
@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_resources_validate_against_real_crds(variant, crd):
    """openAPIV3Schema of the served version; unknown fields are errors (the API server would
    prune them silently). CEL rules are not evaluated (kubeschema.crd_cel_rule_count)."""
    path = crd_file(crd)
    group, kind = kubeschema.crd_kind(path)
    objs = [o for o in render(variant) if o["kind"] == kind and o["apiVersion"] == f"{group}/v1"]
    assert objs, f"{variant} renders no {group}/v1 {kind}"
    for obj in objs:
        kubeschema.validate_against_crd(obj, path)


@pytest.mark.parametrize("crd", CHART_CRDS[("ray.io", "RayService")])
def test_crd_validation_names_unknown_and_wrong_fields(crd):
    """The CRD validator is not vacuous: unknown fields at any depth, wrong types and duplicate
    list-map keys fail with the field named."""
    path = crd_file(crd)
    rs = by_kind(render(), "RayService")[0]
    bad = copy.deepcopy(rs)
    bad["spec"]["serveConfigV3"] = "applications: []"
    with pytest.raises(kubeschema.ManifestError, match=r"\bspec: .*'serveConfigV3' was unexpected"):
        kubeschema.validate_against_crd(bad, path)
    bad = copy.deepcopy(rs)
    cluster = bad["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    with pytest.raises(
        kubeschema.ManifestError,
        match=r"workerGroupSpecs\.0\.template\.spec\.containers\.0: .*'imagePullPolcy'",
    ):
        kubeschema.validate_against_crd(bad, path)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(kubeschema.ManifestError, match=r"workerGroupSpecs\.0\.replicas: 'two'"):
        kubeschema.validate_against_crd(bad, path)
    bad = copy.deepcopy(rs)
    head = bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"].append({"name": "extra", "containerPort": head["ports"][0]["containerPort"]})
    with pytest.raises(kubeschema.ManifestError, match=r"containers\.0\.ports: .*duplicate"):
        kubeschema.validate_against_crd(bad, path)
    bad = copy.deepcopy(rs)
    bad["apiVersion"] = "ray.io/v2"
    with pytest.raises(kubeschema.ManifestError, match="no such version"):
        kubeschema.validate_against_crd(bad, path)


def test_crd_validation_of_route_and_monitors_is_not_vacuous():
    objs = render()
    route = copy.deepcopy(one(objs, "HTTPRoute", "kuberank"))
    route["spec"]["rules"][0]["backendRefs"][0]["weigth"] = 5
    for crd in CHART_CRDS[("gateway.networking.k8s.io", "HTTPRoute")]:
        with pytest.raises(kubeschema.ManifestError, match=r"backendRefs\.0: .*'weigth'"):
            kubeschema.validate_against_crd(route, crd_file(crd))
    sm = copy.deepcopy(one(objs, "ServiceMonitor", "kuberank-serve"))
    sm["spec"]["endpoints"][0]["scrapeInterval"] = "15s"
    with pytest.raises(kubeschema.ManifestError, match=r"endpoints\.0: .*'scrapeInterval'"):
        kubeschema.validate_against_crd(sm, crd_file("servicemonitors-v0.93.0.yaml"))
    rule = copy.deepcopy(one(objs, "PrometheusRule", "kuberank"))
    rule["spec"]["groups"][0]["rules"][0]["severity"] = "page"
    with pytest.raises(kubeschema.ManifestError, match=r"rules\.0: .*'severity'"):
        kubeschema.validate_against_crd(rule, crd_file("prometheusrules-v0.93.0.yaml"))


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"canary": {"weight": 120}}, "/canary/weight"),
        ({"triton": {"containerSecurityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
        ({"serve": {"podSecurityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
        ({"tritn": {}}, "tritn"),
        ({"modelStore": {"s3": {"secretAccessKey": "hunter2"}}}, "secretAccessKey"),
        ({"modelStore": {"uri": "/local/dir"}}, "/modelStore/uri"),
        ({"modelStore": {"s3": {"endpoint": "http://minio"}}}, "endpoint"),
        ({"serve": {"importPath": "no-colon"}}, "importPath"),
        ({"serve": {"image": {"digest": "sha256:abc"}}}, "/serve/image/digest"),
        ({"triton": {"image": {"digest": "latest"}}}, "/triton/image/digest"),
        ({"canary": {"serveImageDigest": "md5:" + "a" * 32}}, "/canary/serveImageDigest"),
        ({"priorityClass": {"value": 2000000000}}, "/priorityClass/value"),
        (
            {"networkPolicy": {"ingressPeers": [{"namespace": "gw"}]}},
            "/networkPolicy/ingressPeers/0",
        ),
        (
            {"networkPolicy": {"dnsPeers": [{"ipBlock": {"cidr": "x"}, "podSelector": {}}]}},
            "/networkPolicy/dnsPeers/0",
        ),
        ({"networkPolicy": {"gatewayNamespaceSelector": {}}}, "gatewayNamespaceSelector"),
    ],
)
def test_values_schema_rejects_with_field_named(values, field):
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmError, match=re.escape(field)):
        chart.render(values, name="kuberank", namespace="kuberank")


def test_pvc_mode_requires_claim_name():
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmError, match="modelStore.pvc.claimName is required"):
        chart.render(
            {"modelStore": {"pvc": {"enabled": True}}}, name="kuberank", namespace="kuberank"
        )


# --- policies ---------------------------------------------------------------------------------


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_non_root_read_only_drop_all_seccomp(variant):
    pods = [p for o in render(variant) for p in kubeschema.pod_specs(o)]
    assert len(pods) >= 3
    for where, spec in pods:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for c in _containers(spec):
            sc = c.get("securityContext", {})
            tag = f"{where} container {c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, tag
            assert sc.get("readOnlyRootFilesystem") is True, tag
            assert sc.get("allowPrivilegeEscalation") is False, tag
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], tag
            assert (
                sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
                == "RuntimeDefault"
            ), tag
            assert "privileged" not in sc or sc["privileged"] is False, tag
            # a read-only root needs a writable /tmp
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), tag
    for rs in by_kind(render(variant), "RayService"):
        auto = rs["spec"]["rayClusterConfig"].get("autoscalerOptions")
        if rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]:
            assert auto["securityContext"]["readOnlyRootFilesystem"] is True
            assert auto["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert auto["resources"]["limits"]["cpu"] and auto["resources"]["limits"]["memory"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_limits_set(variant):
    for obj in render(variant):
        for where, spec in kubeschema.pod_specs(obj):
            for c in _containers(spec):
                limits = c.get("resources", {}).get("limits", {})
                assert limits.get("cpu") and limits.get("memory"), (
                    f"{where} {c['name']} has no cpu/memory limit"
                )
                requests = c.get("resources", {}).get("requests", {})
                assert requests.get("cpu") and requests.get("memory"), (
                    f"{where} {c['name']} has no requests"
                )


def _gpu_users(objs: list[dict]) -> list[str]:
    users = []
    for obj in objs:
        for where, spec in kubeschema.pod_specs(obj):
            for c in _containers(spec):
                res = c.get("resources", {})
                if GPU in res.get("limits", {}) or GPU in res.get("requests", {}):
                    users.append(f"{where}:{c['name']}")
    return users


@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_gpus_only_on_triton(variant):
    objs = render(variant)
    gpu_enabled = values_for(variant).get("triton", {}).get("gpu", {}).get("enabled", True)
    tritons = [
        d
        for d in by_kind(objs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "triton"
    ]
    expected = (
        sorted(f"Deployment/{d['metadata']['name']}:triton" for d in tritons) if gpu_enabled else []
    )
    assert sorted(_gpu_users(objs)) == expected
    for d in tritons:
        spec = d["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        if gpu_enabled:
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert "--allow-gpu-metrics=true" in args
        else:
            assert "nodeSelector" not in spec and "tolerations" not in spec
            assert "--allow-gpu-metrics=false" in args
    # Ray Serve replicas never ask Ray for GPUs either.
    for rs in by_kind(objs, "RayService"):
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        for dep in config["applications"][0]["deployments"]:
            assert not dep.get("ray_actor_options", {}).get("num_gpus"), dep["name"]


def test_gpu_products_become_required_node_affinity():
    objs = render("gpu-prod-values.yaml")
    spec = one(objs, "Deployment", "kuberank-triton")["spec"]["template"]["spec"]
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-L4", "NVIDIA-A10G"]},
        {
            "key": "node.kubernetes.io/instance-type",
            "operator": "In",
            "values": ["g6.xlarge", "g5.xlarge"],
        },
    ]
    assert spec["containers"][0]["resources"]["limits"][GPU] == "1"


_CREDENTIAL_KEY = re.compile(
    r"(?i)(password|passwd|secret|token|credential|apikey|accesskey|privatekey)"
)
_CREDENTIAL_VALUE = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}|-----BEGIN|ghp_[0-9A-Za-z]{20,}|xox[bp]-")


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.mark.parametrize("variant", ["values.yaml", *CI_FILES])
def test_policy_no_secret_values_in_values_files(variant):
    path = CHART / variant if variant == "values.yaml" else CHART / "ci" / variant
    for key_path, value in _walk(yaml.safe_load(path.read_text())):
        leaf = key_path.rsplit(".", 1)[-1]
        if _CREDENTIAL_KEY.search(leaf):
            # only references: the name of an existing Secret, or the name of a key inside it
            assert leaf == "existingSecret" or leaf.endswith("Key"), (
                f"{variant}: {key_path} looks like a credential"
            )
        assert not (isinstance(value, str) and _CREDENTIAL_VALUE.search(value)), (
            f"{variant}: {key_path}"
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_credentials_only_through_secret_refs(variant):
    objs = render(variant)
    assert by_kind(objs, "Secret") == []
    for obj in objs:
        for where, spec in kubeschema.pod_specs(obj):
            for c in _containers(spec):
                for env in c.get("env", []):
                    if _CREDENTIAL_KEY.search(env["name"].replace("_", "")):
                        assert "value" not in env and "secretKeyRef" in env["valueFrom"], (
                            f"{where} {env['name']}"
                        )


def test_existing_secret_feeds_aws_credentials():
    objs = render("cpu-dev-values.yaml")
    env = {
        e["name"]: e
        for e in one(objs, "Deployment", "kuberank-triton")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "kuberank-minio-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert (
        env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        == "kuberank-minio-credentials"
    )
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc.cluster.local:9000"


@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_minimal_rbac(variant):
    objs = render(variant)
    assert by_kind(objs, "ClusterRole") == [] and by_kind(objs, "ClusterRoleBinding") == []
    for role in by_kind(objs, "Role"):
        for rule in role["rules"]:
            assert (
                "*" not in rule["verbs"]
                and "*" not in rule["resources"]
                and "*" not in rule["apiGroups"]
            )
            assert "secrets" not in rule["resources"]
            assert not {
                "create",
                "delete",
                "deletecollection",
                "escalate",
                "bind",
                "impersonate",
            } & set(rule["verbs"])
    sas = {sa["metadata"]["name"]: sa for sa in by_kind(objs, "ServiceAccount")}
    assert all(sa["automountServiceAccountToken"] is False for sa in sas.values())
    for obj in objs:
        for where, spec in kubeschema.pod_specs(obj):
            assert spec["serviceAccountName"] in sas, where
            mounts_token = spec.get("automountServiceAccountToken", True)
            # only the Ray head (its autoscaler sidecar talks to the API server) gets a token
            assert mounts_token is False or "headGroupSpec" in where, where


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies_default_deny_and_allowed_flows(variant):
    objs = render(variant)
    policies = {p["metadata"]["name"]: p for p in by_kind(objs, "NetworkPolicy")}
    deny = policies["kuberank-default-deny"]["spec"]
    assert (
        deny["policyTypes"] == ["Ingress", "Egress"]
        and "ingress" not in deny
        and "egress" not in deny
    )
    pod_labels = []
    for obj in objs:
        if obj["kind"] == "Deployment":
            pod_labels.append(obj["spec"]["template"]["metadata"]["labels"])
        if obj["kind"] == "RayService":
            cluster = obj["spec"]["rayClusterConfig"]
            pod_labels.append(cluster["headGroupSpec"]["template"]["metadata"]["labels"])
            pod_labels += [g["template"]["metadata"]["labels"] for g in cluster["workerGroupSpecs"]]
    for labels in pod_labels:  # every pod is under the default deny
        assert _selects(deny["podSelector"]["matchLabels"], labels)
    serve = policies["kuberank-serve"]["spec"]
    gateway_rule = serve["ingress"][0]
    assert gateway_rule["from"] == values_for("defaults").get("networkPolicy", {}).get(
        "ingressPeers",
        yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]["ingressPeers"],
    )
    assert gateway_rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    triton = policies["kuberank-triton"]["spec"]
    sources = [
        f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for r in triton["ingress"]
        for f in r["from"]
        if "podSelector" in f
    ]
    assert sources == ["serve"]  # only Ray Serve reaches Triton's inference ports
    assert {p["port"] for p in triton["ingress"][0]["ports"]} == {8000, 8001}
    assert triton["ingress"][1]["ports"] == [
        {"port": 8002, "protocol": "TCP"}
    ]  # prometheus: metrics only
    serve_egress_to_triton = [
        r
        for r in serve["egress"]
        if any(
            f.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
            == "triton"
            for f in r.get("to", [])
        )
    ]
    assert len(serve_egress_to_triton) == 1


# --- what KubeRay does with the RayService -------------------------------------------------------


def _ray_pod_specs(rs: dict) -> list[tuple[str, dict]]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (f"worker {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]
    ]


def _kuberay_head_service_ports(rs: dict) -> dict[str, int]:
    """The ports of the head Service KubeRay builds (ray-operator common/service.go
    getServicePorts): every port of the head's Ray container by name (unnamed ones as
    `<port>-port`), plus `metrics: 8080` when no port is named `metrics`."""
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {
        p.get("name") or f"{p['containerPort']}-port": p["containerPort"] for p in head["ports"]
    }
    ports.setdefault("metrics", 8080)
    return ports


def _effective_token_mount(spec: dict, service_accounts: dict) -> bool:
    """automountServiceAccountToken as the API server decides it: the pod's field, else the
    service account's, else true."""
    if "automountServiceAccountToken" in spec:
        return spec["automountServiceAccountToken"]
    sa = service_accounts.get(spec.get("serviceAccountName", "default"), {})
    return sa.get("automountServiceAccountToken", True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kuberay_head_service_has_no_duplicate_ports(variant):
    """The API server refuses a Service with two ports on the same (port, protocol)."""
    for rs in by_kind(render(variant), "RayService"):
        ports = _kuberay_head_service_ports(rs)
        numbers = sorted(ports.values())
        assert len(numbers) == len(set(numbers)), f"{rs['metadata']['name']}: {ports}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_acceptance_ray_metrics_port_named_metrics_and_head_token(variant):
    """Acceptance: Ray's metrics port 8080 is named `metrics` (or left to KubeRay) on every Ray
    pod, and the Ray head mounts a service-account token (its autoscaler sidecar reads it)."""
    objs = render(variant)
    sas = {sa["metadata"]["name"]: sa for sa in by_kind(objs, "ServiceAccount")}
    rss = by_kind(objs, "RayService")
    assert rss
    for rs in rss:
        for where, spec in _ray_pod_specs(rs):
            ports = spec["containers"][0].get("ports", [])
            assert [p.get("name") for p in ports if p["containerPort"] == 8080] in (
                [],
                ["metrics"],
            ), f"{rs['metadata']['name']} {where}: {ports}"
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        assert _effective_token_mount(head, sas) is True, rs["metadata"]["name"]


@pytest.mark.parametrize("autoscaler", [True, False])
def test_token_only_on_the_head_and_only_for_the_autoscaler(autoscaler):
    objs = render(serve={"autoscaler": {"enabled": autoscaler}})
    sas = {sa["metadata"]["name"]: sa for sa in by_kind(objs, "ServiceAccount")}
    (rs,) = by_kind(objs, "RayService")
    for where, spec in _ray_pod_specs(rs):
        assert _effective_token_mount(spec, sas) is (autoscaler and where == "head"), where
    triton = one(objs, "Deployment", "kuberank-triton")["spec"]["template"]["spec"]
    assert _effective_token_mount(triton, sas) is False
    # without service accounts of its own the chart still decides per pod
    objs = render(serviceAccount={"create": False})
    (rs,) = by_kind(objs, "RayService")
    for where, spec in _ray_pod_specs(rs):
        assert spec["automountServiceAccountToken"] is (where == "head"), where


# --- scheduling: requests fit the node types the values pin pods to ------------------------------

INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
# The EC2 instance types ci/ files pin pods to: nominal vCPUs and GiB, the GPU, and the pod limit
# of the VPC CNI without prefix delegation (ENIs x (IPs per ENI - 1) + 2), which sets EKS's
# kube-reserved memory. A values file naming a type missing here fails the test below.
INSTANCE_TYPES = {
    "c7i.2xlarge": {"vcpu": 8, "memory_gib": 16, "max_pods": 58, "gpu": None},
    "g5.xlarge": {"vcpu": 4, "memory_gib": 16, "max_pods": 58, "gpu": "NVIDIA-A10G"},
    "g6.xlarge": {"vcpu": 4, "memory_gib": 16, "max_pods": 58, "gpu": "NVIDIA-L4"},
}
# Headroom left for the DaemonSets on every node (kube-proxy, aws-node, ebs-csi-node,
# node-exporter; on GPU nodes also the GPU operator's device plugin, DCGM exporter, GFD/NFD).
DAEMONSET_HEADROOM = {"cpu": {"millicpu": 300, "mib": 512}, "gpu": {"millicpu": 500, "mib": 1024}}


def node_allocatable(instance_type: str) -> tuple[int, int]:
    """(millicpu, MiB) a pod can request on an otherwise empty node of this type, by the EKS
    AMI rule: allocatable = capacity - kube-reserved - eviction threshold (no system-reserved);
    kube-reserved CPU = 6% of core 1 + 1% of core 2 + 0.5% of cores 3-4 + 0.25% of the rest,
    kube-reserved memory = 255 MiB + 11 MiB x max pods, eviction memory.available < 100 MiB.
    The kernel keeps part of the nominal memory, so capacity is taken as 92.5% of it
    (Karpenter's default VM memory overhead, 7.5%). Minus DAEMONSET_HEADROOM."""
    t = INSTANCE_TYPES[instance_type]
    cores = t["vcpu"]
    reserved_cpu = 60 + 10 * (cores > 1) + 5 * min(max(cores - 2, 0), 2) + 2.5 * max(cores - 4, 0)
    capacity_mib = t["memory_gib"] * 1024 * (1 - 0.075)
    reserved_mib = 255 + 11 * t["max_pods"] + 100
    headroom = DAEMONSET_HEADROOM["gpu" if t["gpu"] else "cpu"]
    return (
        int(cores * 1000 - reserved_cpu - headroom["millicpu"]),
        int(capacity_mib - reserved_mib - headroom["mib"]),
    )


def test_node_allocatable_rule():
    # c7i.2xlarge: 8000m - 90m kube-reserved - 300m; 15155 MiB - 893 - 100 - 512
    assert node_allocatable("c7i.2xlarge") == (7610, 13650)
    assert node_allocatable("g6.xlarge") == (3420, 13138)  # 4000m - 80m - 500m


_QTY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_QTY_SCALE = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value) -> float:
    number, suffix = _QTY.match(str(value)).groups()
    return float(number) * _QTY_SCALE[suffix]


def pod_requests(spec: dict, extra: list[dict] = ()) -> tuple[float, float]:
    """(millicpu, MiB) requested by a pod: its containers plus sidecars injected later."""
    cpu = mem = 0.0
    for c in [*spec["containers"], *extra]:
        req = c.get("resources", {}).get("requests", {})
        cpu += quantity(req.get("cpu", 0)) * 1000
        mem += quantity(req.get("memory", 0)) / 2**20
    return cpu, mem


def pinned_instance_types(spec: dict) -> set[str] | None:
    """The instance types a pod may run on, from its nodeSelector and required node affinity
    (terms are ORed: every term must name types); None when it may run anywhere."""
    types = None
    if INSTANCE_TYPE_LABEL in spec.get("nodeSelector", {}):
        types = {spec["nodeSelector"][INSTANCE_TYPE_LABEL]}
    terms = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    if terms:
        allowed = set()
        for term in terms:
            exprs = [
                e
                for e in term.get("matchExpressions", [])
                if e["key"] == INSTANCE_TYPE_LABEL and e["operator"] == "In"
            ]
            if not exprs:
                return types
            allowed |= set.intersection(*(set(e["values"]) for e in exprs))
        types = allowed if types is None else types & allowed
    return types


def scheduled_pods(objs: list[dict]) -> list[tuple[str, dict, list[dict]]]:
    """(where, pod spec, sidecars KubeRay injects) for every pod the release creates."""
    pods = []
    for obj in objs:
        sidecars: list[dict] = []
        if (
            obj["kind"] == "RayService"
            and obj["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
        ):
            opts = obj["spec"]["rayClusterConfig"].get("autoscalerOptions", {})
            sidecars = [{"name": "autoscaler", "resources": opts.get("resources", {})}]
        for where, spec in kubeschema.pod_specs(obj):
            pods.append((where, spec, sidecars if "headGroupSpec" in where else []))
    return pods


PINNED_VARIANTS = [
    v
    for v in CI_FILES
    if INSTANCE_TYPE_LABEL in (CHART / "ci" / v).read_text()
    or "instanceTypes" in (CHART / "ci" / v).read_text()
]


def test_production_values_name_their_node_types():
    assert "gpu-prod-values.yaml" in PINNED_VARIANTS


@pytest.mark.parametrize("variant", PINNED_VARIANTS)
def test_pods_fit_the_allocatable_of_their_node_types(variant):
    """Every pod (containers plus the autoscaler sidecar on the Ray head) is pinned to named
    instance types, and its requests fit each one's allocatable; limits stay within capacity."""
    for where, spec, sidecars in scheduled_pods(render(variant)):
        types = pinned_instance_types(spec)
        assert types, f"{variant}: {where} may land on any node; pin it to a node type"
        cpu, mem = pod_requests(spec, sidecars)
        for t in sorted(types):
            assert t in INSTANCE_TYPES, f"{variant}: {where}: add {t} to INSTANCE_TYPES"
            alloc_cpu, alloc_mem = node_allocatable(t)
            assert cpu <= alloc_cpu and mem <= alloc_mem, (
                f"{variant}: {where} requests {cpu:.0f}m / {mem:.0f}Mi; "
                f"{t} has {alloc_cpu}m / {alloc_mem}Mi allocatable"
            )
            for c in [*spec["containers"], *sidecars]:
                lim = c.get("resources", {}).get("limits", {})
                assert quantity(lim.get("cpu", 0)) <= INSTANCE_TYPES[t]["vcpu"], (where, c["name"])
                assert quantity(lim.get("memory", 0)) <= INSTANCE_TYPES[t]["memory_gib"] * 2**30, (
                    where,
                    c["name"],
                )
            if GPU in spec["containers"][0].get("resources", {}).get("limits", {}):
                assert INSTANCE_TYPES[t]["gpu"], f"{where}: {t} has no GPU"
                products = values_for(variant).get("triton", {}).get("gpu", {}).get("products", [])
                assert not products or INSTANCE_TYPES[t]["gpu"] in products, (where, t)


@pytest.mark.parametrize("variant", VARIANTS)
def test_priority_classes_exist(variant):
    """A pod naming a PriorityClass that does not exist is refused by the API server."""
    objs = render(variant)
    created = {p["metadata"]["name"] for p in by_kind(objs, "PriorityClass")}
    builtin = {"system-cluster-critical", "system-node-critical"}
    for where, spec in [p for o in objs for p in kubeschema.pod_specs(o)]:
        name = spec.get("priorityClassName")
        assert name is None or name in created | builtin, f"{variant}: {where}: {name}"


def test_priority_class_created_for_the_serving_pods():
    objs = render(priorityClass={"create": True, "value": 5000})
    (pc,) = by_kind(objs, "PriorityClass")
    assert pc["metadata"]["name"] == "kuberank-serving" and pc["value"] == 5000
    assert pc["globalDefault"] is False and "namespace" not in pc["metadata"]
    names = {spec.get("priorityClassName") for o in objs for _, spec in kubeschema.pod_specs(o)}
    assert names == {"kuberank-serving"}
    objs = render(
        priorityClass={"create": True, "name": "serving-high"},
        triton={"priorityClassName": "gpu-high"},
    )
    assert [p["metadata"]["name"] for p in by_kind(objs, "PriorityClass")] == ["serving-high"]
    (triton,) = [o for o in by_kind(objs, "Deployment")]
    assert triton["spec"]["template"]["spec"]["priorityClassName"] == "gpu-high"
    (rs,) = by_kind(objs, "RayService")
    assert {spec["priorityClassName"] for _, spec in _ray_pod_specs(rs)} == {"serving-high"}
    assert by_kind(render(), "PriorityClass") == []


# --- network policy flows a working release needs -----------------------------------------------


def _runtime_pod_labels(objs: list[dict]) -> dict[str, dict]:
    """Labels of every pod as it will run: KubeRay adds ray.io/node-type to Ray pods."""
    pods = {}
    for obj in objs:
        if obj["kind"] == "Deployment":
            pods[f"{obj['metadata']['name']}"] = obj["spec"]["template"]["metadata"]["labels"]
        if obj["kind"] == "RayService":
            cluster = obj["spec"]["rayClusterConfig"]
            name = obj["metadata"]["name"]
            pods[f"{name} head"] = {
                **cluster["headGroupSpec"]["template"]["metadata"]["labels"],
                "ray.io/node-type": "head",
            }
            for g in cluster["workerGroupSpecs"]:
                pods[f"{name} worker {g['groupName']}"] = {
                    **g["template"]["metadata"]["labels"],
                    "ray.io/node-type": "worker",
                }
    return pods


def _egress_rules(objs: list[dict], labels: dict) -> list[dict]:
    """Egress rules that apply to a pod with these labels and lead out of the release (the
    rules among the release's own pods are left out)."""

    def inside(peer: dict) -> bool:
        return set(peer) == {"podSelector"} and "app.kubernetes.io/instance" in peer[
            "podSelector"
        ].get("matchLabels", {})

    return [
        rule
        for p in by_kind(objs, "NetworkPolicy")
        if _selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)
        for rule in p["spec"].get("egress", [])
        if not (rule.get("to") and all(inside(peer) for peer in rule["to"]))
    ]


def _allows_port(rule: dict, port: int, protocol: str = "TCP") -> bool:
    ports = rule.get("ports")
    return not ports or any(
        p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
    )


def _store_port(values: dict) -> int:
    endpoint = values.get("modelStore", {}).get("s3", {}).get("endpoint", "")
    return int(endpoint.rsplit(":", 1)[1]) if endpoint else 443


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_may_reach_the_model_store(variant):
    """Triton loads s3:// models and Ray reads the item index: both need egress to the store."""
    objs = render(variant)
    port = _store_port(values_for(variant))
    for where, labels in _runtime_pod_labels(objs).items():
        assert any(_allows_port(r, port) for r in _egress_rules(objs, labels)), (
            f"{variant}: {where} cannot reach the model store on {port}"
        )


def test_cpu_dev_reaches_minio_and_nothing_else_outside():
    objs = render("cpu-dev-values.yaml")
    for where, labels in _runtime_pod_labels(objs).items():
        rules = [r for r in _egress_rules(objs, labels) if _allows_port(r, 9000)]
        assert rules, where
        for r in rules:
            assert r["to"] == [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}
            ], where
            assert r["ports"] == [{"port": 9000, "protocol": "TCP"}], where


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_head_may_reach_the_api_server_and_only_the_head(variant):
    """The autoscaler sidecar on the head talks to the API server (443 on managed control
    planes, 6443 on kubeadm, kind and k3d)."""
    objs = render(variant)
    external = values_for(variant).get("networkPolicy", {}).get("externalEgress", {})
    for where, labels in _runtime_pod_labels(objs).items():
        rules = _egress_rules(objs, labels)
        for port in (443, 6443):
            allowed = [r for r in rules if _allows_port(r, port) and r.get("to")]
            api = [r for r in allowed if all("ipBlock" in peer for peer in r["to"])]
            if where.endswith(" head"):
                assert api, f"{variant}: {where} cannot reach the API server on {port}"
            elif external.get("enabled") is False:
                assert not api, f"{variant}: {where} may reach the API server on {port}"


def test_model_store_and_api_server_egress_values():
    objs = render(
        modelStore={"s3": {"endpoint": "https://ceph.storage.svc:7480"}},
        networkPolicy={
            "externalEgress": {"enabled": False},
            "modelStoreEgress": {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
            "apiServerEgress": {"cidrs": ["172.16.0.10/32"], "ports": [8443]},
        },
    )
    serve = one(objs, "NetworkPolicy", "kuberank-serve")["spec"]
    assert {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "ports": [{"port": 7480, "protocol": "TCP"}],
    } in serve["egress"]
    head = one(objs, "NetworkPolicy", "kuberank-ray-head")["spec"]
    assert head["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert head["policyTypes"] == ["Egress"]
    assert head["egress"] == [
        {
            "to": [{"ipBlock": {"cidr": "172.16.0.10/32"}}],
            "ports": [{"port": 8443, "protocol": "TCP"}],
        }
    ]
    # no store traffic in PVC mode, no API server rule without the autoscaler
    objs = render(
        modelStore={"pvc": {"enabled": True, "claimName": "models"}},
        serve={"autoscaler": {"enabled": False}},
        networkPolicy={"externalEgress": {"enabled": False}},
    )
    assert [
        p["metadata"]["name"]
        for p in by_kind(objs, "NetworkPolicy")
        if "head" in p["metadata"]["name"]
    ] == []
    for labels in _runtime_pod_labels(objs).values():
        assert not [
            r for r in _egress_rules(objs, labels) if _allows_port(r, 443) and r.get("ports")
        ]


def test_gateway_ingress_peers_are_values():
    default = one(render(), "NetworkPolicy", "kuberank-serve")["spec"]["ingress"]
    (gateway,) = [r for r in default if r.get("ports") == [{"port": 8000, "protocol": "TCP"}]]
    namespaces = gateway["from"][0]["namespaceSelector"]["matchExpressions"][0]
    assert namespaces["key"] == "kubernetes.io/metadata.name"
    assert {"gateway-system", "envoy-gateway-system"} <= set(namespaces["values"])
    peers = [
        {"ipBlock": {"cidr": "10.0.0.0/16"}},
        {
            "namespaceSelector": {"matchLabels": {"team": "edge"}},
            "podSelector": {"matchLabels": {"app": "envoy"}},
        },
    ]
    ingress = one(render(networkPolicy={"ingressPeers": peers}), "NetworkPolicy", "kuberank-serve")
    assert {"from": peers, "ports": [{"port": 8000, "protocol": "TCP"}]} in ingress["spec"][
        "ingress"
    ]
    # no peers: no gateway rule at all (an empty `from` would admit every source)
    ingress = one(render(networkPolicy={"ingressPeers": []}), "NetworkPolicy", "kuberank-serve")
    assert [r for r in default if r is not gateway] == ingress["spec"]["ingress"]
    assert all(r.get("from") for r in ingress["spec"]["ingress"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_dns_egress_reaches_kube_dns_and_nodelocal_dnscache(variant):
    objs = render(variant)
    for where, labels in _runtime_pod_labels(objs).items():
        dns = [r for r in _egress_rules(objs, labels) if _allows_port(r, 53, "UDP") and r.get("to")]
        peers = [peer for r in dns for peer in r["to"]]
        assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in peers, where
        assert {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
        } in peers, where
    objs = render(networkPolicy={"dnsPeers": [{"ipBlock": {"cidr": "10.96.0.10/32"}}]})
    serve = one(objs, "NetworkPolicy", "kuberank-serve")["spec"]
    dns = [r for r in serve["egress"] if {"port": 53, "protocol": "UDP"} in r.get("ports", [])]
    assert [r["to"] for r in dns] == [[{"ipBlock": {"cidr": "10.96.0.10/32"}}]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitoring_objects_carry_the_prometheus_release_label(variant):
    """kube-prometheus-stack selects ServiceMonitors and PrometheusRules by `release: <its
    release name>` unless told otherwise."""
    objs = render(variant)
    monitoring = by_kind(objs, "ServiceMonitor") + by_kind(objs, "PrometheusRule")
    assert monitoring
    for obj in monitoring:
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", obj["metadata"][
            "name"
        ]


def test_prometheus_release_label_value():
    objs = render(metrics={"release": "monitoring"})
    assert {
        o["metadata"]["labels"]["release"]
        for o in by_kind(objs, "ServiceMonitor") + by_kind(objs, "PrometheusRule")
    } == {"monitoring"}
    objs = render(metrics={"release": ""})
    assert all(
        "release" not in o["metadata"]["labels"]
        for o in by_kind(objs, "ServiceMonitor") + by_kind(objs, "PrometheusRule")
    )
    objs = render(metrics={"serviceMonitor": {"labels": {"release": "other"}}})
    assert {o["metadata"]["labels"]["release"] for o in by_kind(objs, "ServiceMonitor")} == {
        "other"
    }
    assert (
        one(objs, "PrometheusRule", "kuberank")["metadata"]["labels"]["release"]
        == "kube-prometheus-stack"
    )


DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def _images(objs: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for obj in objs:
        for _, spec in kubeschema.pod_specs(obj):
            out.setdefault(obj["metadata"]["name"], set()).update(
                c["image"] for c in spec["containers"]
            )
    return out


def test_images_pinned_by_digest():
    images = _images(
        render(
            serve={"image": {"digest": DIGEST_A}},
            triton={"image": {"digest": DIGEST_B}},
            canary={"enabled": True},
        )
    )
    assert (
        images["kuberank"] == images["kuberank-canary"] == {f"ghcr.io/kuberank/kuberank@{DIGEST_A}"}
    )
    assert (
        images["kuberank-triton"]
        == images["kuberank-canary-triton"]
        == {f"ghcr.io/kuberank/tritonserver@{DIGEST_B}"}
    )
    # a canary image of its own does not inherit the stable's digest
    images = _images(
        render(
            serve={"image": {"digest": DIGEST_A}},
            triton={"image": {"digest": DIGEST_B}},
            canary={"enabled": True, "serveImageTag": "0.2.0", "tritonImageDigest": DIGEST_A},
        )
    )
    assert images["kuberank-canary"] == {"ghcr.io/kuberank/kuberank:0.2.0"}
    assert images["kuberank-canary-triton"] == {f"ghcr.io/kuberank/tritonserver@{DIGEST_A}"}
    assert _images(render())["kuberank"] == {"ghcr.io/kuberank/kuberank:0.1.0"}


# --- wiring between the objects ----------------------------------------------------------------


def _serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_select_their_pods(variant):
    objs = render(variant)
    for svc in by_kind(objs, "Service"):
        sel = svc["spec"]["selector"]
        matched = [
            d
            for d in by_kind(objs, "Deployment")
            if _selects(sel, d["spec"]["template"]["metadata"]["labels"])
        ]
        matched += [
            rs
            for rs in by_kind(objs, "RayService")
            if _selects(
                sel,
                rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"],
            )
        ]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for d in by_kind(objs, "Deployment"):
            if d in matched:
                names = {p["name"] for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
                assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
        for rs in by_kind(objs, "RayService"):
            if rs in matched:  # head and workers alike (the metrics Service is headless)
                for where, spec in _ray_pod_specs(rs):
                    names = {p["name"] for p in spec["containers"][0]["ports"]}
                    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names, where
    for pdb in by_kind(objs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"]["kuberank.io/track"] in ("stable", "canary")


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_contract(variant):
    objs = render(variant)
    tritons = {
        s["metadata"]["labels"]["kuberank.io/track"]: s
        for s in by_kind(objs, "Service")
        if s["metadata"]["labels"].get("app.kubernetes.io/component") == "triton"
    }
    for rs in by_kind(objs, "RayService"):
        track = rs["metadata"]["labels"]["kuberank.io/track"]
        config = kubeschema.validate_serve_config(rs["spec"]["serveConfigV2"])
        (app,) = config["applications"]
        assert app["import_path"] == "kuberank.serving.app:build_app"
        assert {d["name"] for d in app["deployments"]} == {
            "Ingress",
            "QueryEncoder",
            "Retriever",
            "Ranker",
        }
        for d in app["deployments"]:
            # The Ingress always serves; with colocate (the default) the stages idle at 0.
            floor = (
                1 if d["name"] == "Ingress" or app.get("args", {}).get("colocate") is False else 0
            )
            assert d["autoscaling_config"]["min_replicas"] >= floor and "num_replicas" not in d
        assert config["http_options"]["port"] == 8000
        svc = tritons[track]
        grpc = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert (
            app["args"]["triton_url"]
            == f"{svc['metadata']['name']}.kuberank.svc.cluster.local:{grpc}"
        )
        cluster = rs["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True
        images = {
            c["image"]
            for t in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for c in t["template"]["spec"]["containers"]
        }
        assert images == {"ghcr.io/kuberank/kuberank:0.1.0"}


def test_triton_deployment_contract():
    objs = render()
    triton = one(objs, "Deployment", "kuberank-triton")["spec"]["template"]["spec"]
    c = triton["containers"][0]
    assert c["image"] == "ghcr.io/kuberank/tritonserver:24.10-py3"
    assert "--model-repository=s3://kuberank-models/prod/triton" in c["args"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    shm = next(v for v in triton["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert one(objs, "Deployment", "kuberank-triton")["spec"]["replicas"] == 1


def test_triton_s3_endpoint_and_pvc_model_repository():
    c = one(render("cpu-dev-values.yaml"), "Deployment", "kuberank-triton")["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert (
        "--model-repository=s3://http://minio.minio.svc.cluster.local:9000/kuberank-dev/models/triton"
        in c["args"]
    )
    objs = render(modelStore={"pvc": {"enabled": True, "claimName": "models", "subPath": "v3"}})
    spec = one(objs, "Deployment", "kuberank-triton")["spec"]["template"]["spec"]
    assert "--model-repository=/models/triton" in spec["containers"][0]["args"]
    assert {
        "name": "model-store",
        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
    } in spec["volumes"]
    assert {
        "name": "model-store",
        "mountPath": "/models",
        "readOnly": True,
        "subPath": "v3",
    } in spec["containers"][0]["volumeMounts"]
    assert not any(e["name"].startswith("AWS_") for e in spec["containers"][0]["env"])
    rs = by_kind(objs, "RayService")[0]
    assert _serve_config(rs)["applications"][0]["args"]["model_store"] == "/models"


def test_hpa_on_triton_queue_time():
    objs = render("gpu-prod-values.yaml")
    hpa = one(objs, "HorizontalPodAutoscaler", "kuberank-triton")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "kuberank-triton",
    }
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == "triton_queue_time_us_per_request"
    assert metric["target"] == {"type": "AverageValue", "averageValue": "10000"}
    assert "replicas" not in one(objs, "Deployment", "kuberank-triton")["spec"]  # the HPA owns it
    assert by_kind(render(), "HorizontalPodAutoscaler") == []


# --- gateway route and canary track ------------------------------------------------------------


def test_route_without_canary_sends_everything_to_stable():
    objs = render()
    route = one(objs, "HTTPRoute", "kuberank")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "kuberank-serve-svc", "port": 8000, "weight": 100}]
    assert [m["path"]["value"] for m in rule["matches"]] == [
        "/search",
        "/recommend",
    ]  # no /metrics outside
    assert route["metadata"]["annotations"]["kuberank.io/stable-backend"] == "kuberank-serve-svc"
    assert "kuberank.io/canary-backend" not in route["metadata"]["annotations"]
    assert len(by_kind(objs, "RayService")) == 1


def test_canary_track_and_weighted_route():
    objs = render("canary-values.yaml")
    route = one(objs, "HTTPRoute", "kuberank")
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert refs == [
        {"name": "kuberank-serve-svc", "port": 8000, "weight": 90},
        {"name": "kuberank-canary-serve-svc", "port": 8000, "weight": 10},
    ]
    ann = route["metadata"]["annotations"]
    assert ann["kuberank.io/canary-backend"] == "kuberank-canary-serve-svc"
    assert (
        ann["kuberank.io/metrics-selector"]
        == 'namespace="kuberank",service="kuberank-serve-metrics"'
    )
    # KubeRay names a RayService's serve Service <rayservice>-serve-svc
    for rs in by_kind(objs, "RayService"):
        assert f"{rs['metadata']['name']}-serve-svc" in {r["name"] for r in refs}
    canary = one(objs, "RayService", "kuberank-canary")
    args = _serve_config(canary)["applications"][0]["args"]
    assert args["model_store"] == "s3://kuberank-models/candidate-2024-11-28"
    assert args["triton_url"].startswith("kuberank-canary-triton.")
    ctriton = one(objs, "Deployment", "kuberank-canary-triton")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert "--model-repository=s3://kuberank-models/candidate-2024-11-28/triton" in ctriton["args"]
    assert canary["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 1
    stable = one(objs, "RayService", "kuberank")
    assert (
        _serve_config(stable)["applications"][0]["args"]["model_store"]
        == "s3://kuberank-models/prod"
    )


def test_service_monitors_label_the_track():
    objs = render("canary-values.yaml")
    for sm in by_kind(objs, "ServiceMonitor"):
        for ep in sm["spec"]["endpoints"]:
            assert {
                "sourceLabels": ["__meta_kubernetes_pod_label_kuberank_io_track"],
                "targetLabel": "track",
                "action": "replace",
            } in ep["relabelings"]
    serve_sm = one(objs, "ServiceMonitor", "kuberank-serve")
    svc = one(objs, "Service", "kuberank-serve-metrics")
    assert _selects(serve_sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert {ep["port"] for ep in serve_sm["spec"]["endpoints"]} == {
        p["name"] for p in svc["spec"]["ports"]
    }
    assert serve_sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_notes_explain_the_canary():
    notes = kubechart.render_notes(CHART, values_for("canary-values.yaml"))
    assert "kubectl kuberank -n kuberank canary start --route kuberank" in notes
    assert "/v2/health" not in notes and "kuberank-serve-svc" in notes


# --- monitoring rules through promtool ---------------------------------------------------------


def _rules_file(tmp_path: Path, groups: list[dict]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = require_binary("promtool", "apt-get install prometheus")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def test_prometheus_rules_pass_promtool(tmp_path):
    rule = one(render("canary-values.yaml"), "PrometheusRule", "kuberank")
    result = _promtool("check", "rules", str(_rules_file(tmp_path, rule["spec"]["groups"])))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_dashboard_queries_pass_promtool(tmp_path):
    cm = one(render(), "ConfigMap", "kuberank-dashboard")
    dash = json.loads(cm["data"]["kuberank-serving.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 6
    substituted = [
        e.replace("$namespace", "kuberank")
        .replace("$service", "kuberank-serve-metrics")
        .replace("$triton_service", ".*-triton")
        for e in exprs
    ]
    rules = [
        {"record": f"kuberank:dashboard_panel_{i}", "expr": e} for i, e in enumerate(substituted)
    ]
    result = _promtool(
        "check", "rules", str(_rules_file(tmp_path, [{"name": "dashboard", "rules": rules}]))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_alerts_fire_on_a_faulty_canary_only(tmp_path):
    """promtool's rule unit tests: synthetic series for a healthy stable and a faulty canary."""
    rule = copy.deepcopy(one(render("canary-values.yaml"), "PrometheusRule", "kuberank"))
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            r.pop("annotations")  # promtool compares annotations verbatim; the exprs are under test
    rules = _rules_file(tmp_path, rule["spec"]["groups"])
    app = 'namespace="kuberank",service="kuberank-serve-metrics",route="/search"'
    tri = 'namespace="kuberank",service="kuberank-canary-triton",pod="t-0",track="canary"'
    buckets = ["0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf"]
    series = [
        # stable: 10 req/s, 0.1% errors, everything under 100 ms
        {
            "series": f'kuberank_requests_total{{{app},track="stable",status="200"}}',
            "values": "0+599x20",
        },
        {
            "series": f'kuberank_requests_total{{{app},track="stable",status="500"}}',
            "values": "0+1x20",
        },
        # canary: 10 req/s, 20% errors, half of the requests take over 500 ms
        {
            "series": f'kuberank_requests_total{{{app},track="canary",status="200"}}',
            "values": "0+480x20",
        },
        {
            "series": f'kuberank_requests_total{{{app},track="canary",status="503"}}',
            "values": "0+120x20",
        },
        # admission: the canary sheds 10% of its requests, the stable track none
        {
            "series": f'kuberank_shed_total{{{app},track="canary",reason="queue"}}',
            "values": "0+60x20",
        },
        {
            "series": f'kuberank_shed_total{{{app},track="stable",reason="queue"}}',
            "values": "0+0x20",
        },
        # Triton canary: 100 ms queue per request, GPU memory at 95%
        {"series": f"nv_inference_queue_duration_us{{{tri}}}", "values": "0+60000000x20"},
        {"series": f"nv_inference_request_success{{{tri}}}", "values": "0+600x20"},
        {"series": f'nv_gpu_memory_used_bytes{{{tri},gpu_uuid="GPU-1"}}', "values": "95x20"},
        {"series": f'nv_gpu_memory_total_bytes{{{tri},gpu_uuid="GPU-1"}}', "values": "100x20"},
    ]
    for le in buckets:
        stable = 600 if le != "0.05" else 300
        canary = {"0.05": 0, "0.1": 100, "0.25": 200, "0.5": 300}.get(le, 600)
        series.append(
            {
                "series": f'kuberank_request_latency_seconds_bucket{{{app},track="stable",le="{le}"}}',
                "values": f"0+{stable}x20",
            }
        )
        series.append(
            {
                "series": f'kuberank_request_latency_seconds_bucket{{{app},track="canary",le="{le}"}}',
                "values": f"0+{canary}x20",
            }
        )
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "15m",
                        "alertname": "KuberankHighErrorRate",
                        "exp_alerts": [{"exp_labels": {"severity": "critical", "track": "canary"}}],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "KuberankHighP99Latency",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "track": "canary"}}],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "KuberankSustainedShedding",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "track": "canary"}}],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "KuberankTritonQueueTimeHigh",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "warning", "track": "canary", "pod": "t-0"}}
                        ],
                    },
                    {
                        "eval_time": "15m",
                        "alertname": "KuberankTritonGPUMemoryHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "track": "canary",
                                    "pod": "t-0",
                                    "gpu_uuid": "GPU-1",
                                }
                            }
                        ],
                    },
                    # `for: 5m` holds the alerts back early on
                    {"eval_time": "3m", "alertname": "KuberankHighErrorRate", "exp_alerts": []},
                ],
            }
        ],
    }
    test_file = tmp_path / "rules_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = _promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


# --- README parameter table ---------------------------------------------------------------------


def test_readme_parameter_table_matches_values():
    assert kubechart.update_readme(CHART, check=True), (
        "charts/kuberank/README.md is stale: run python -m kuberank.deploy.chart readme charts/kuberank"
    )
    readme = (CHART / "README.md").read_text()
    for p in kubechart.parse_params((CHART / "values.yaml").read_text()):
        assert f"| `{p.key}` |" in readme


def test_readme_generator_refuses_undocumented_values():
    text = "## @section S\n## @param a.b documented\na:\n  b: 1\n  c: 2\n"
    with pytest.raises(kubechart.ChartDocError, match="value a.c has no ## @param"):
        kubechart.params_table(text)
    with pytest.raises(kubechart.ChartDocError, match="@param a.x names no value"):
        kubechart.params_table(
            "## @section S\n## @param a Whole map\n## @param a.x ghost\na:\n  b: 1\n"
        )
    table = kubechart.params_table("## @section S\n## @param a Whole map\na:\n  b: 1\n")
    assert '| `a` | Whole map | `{"b":1}` |' in table


def test_kubechart_cli_check_reports_stale_readme(tmp_path):
    import shutil

    chart = tmp_path / "kuberank"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    values.write_text(
        values.read_text().replace("Number of Triton replicas", "How many Triton pods")
    )
    assert kubechart.main(["readme", str(chart), "--check"]) == 1
    assert kubechart.main(["readme", str(chart)]) == 0
    assert "How many Triton pods" in (chart / "README.md").read_text()
    assert kubechart.main(["readme", str(chart), "--check"]) == 0


def test_prometheus_adapter_rule_matches_the_hpa(tmp_path):
    """The adapter rule shipped for the Triton HPA names the HPA's metric and is valid PromQL."""
    adapter = yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    hpa = one(render("gpu-prod-values.yaml"), "HorizontalPodAutoscaler", "kuberank-triton")
    assert rule["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    expr = (
        rule["metricsQuery"]
        .replace("<<.LabelMatchers>>", 'namespace="kuberank",pod=~"kuberank-triton-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    rules = _rules_file(
        tmp_path, [{"name": "adapter", "rules": [{"record": "adapter:q", "expr": expr}]}]
    )
    result = _promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["proxy", "haproxy"])
def test_ingress_mode_switches_ray_serve_direct_ingress(mode):
    rs = by_kind(render(serve={"ingressMode": mode}), "RayService")[0]
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == ("1" if mode == "haproxy" else None)
        assert env["RAY_worker_niceness"] == "0"  # replicas at normal priority, as locally
    with pytest.raises(Exception, match="ingressMode"):
        render(serve={"ingressMode": "direct"})


def test_default_ingress_is_haproxy_not_the_proxy_actor():
    """Serve's proxy actor served /search at a quarter of HAProxy's rate in the kuberank image
    (docs/benchmarks.md, `make bench` section images): the default is HAProxy."""
    for variant in VARIANTS:
        cluster = by_kind(render(variant), "RayService")[0]["spec"]["rayClusterConfig"]
        for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            env = {
                e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]
            }
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", variant
