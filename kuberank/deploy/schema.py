"""Schema checks for the custom resources kuberank renders, plus strict validation of core kinds.

Core kinds (Deployment, Service, NetworkPolicy, ...) are validated by ``kubernetes-validate``
in strict mode against a pinned Kubernetes version. Custom resources have no schema there, so
this module carries its own JSON Schemas for the fields kuberank uses, written from the
upstream API types:

- ``ray.io/v1`` RayService and RayJob (KubeRay ``rayservice_types.go``, ``rayjob_types.go``,
  ``raycluster_types.go``); their pod templates are validated as core ``PodTemplate`` objects,
  and ``serveConfigV2`` with Ray Serve's own ``ServeDeploySchema``;
- ``gateway.networking.k8s.io/v1`` HTTPRoute;
- ``monitoring.coreos.com/v1`` ServiceMonitor and PrometheusRule.

Unknown fields are rejected (``additionalProperties: false``) at every level the schemas
describe, so a misspelt field fails here instead of being pruned silently by the API server.

Where the operators' real CustomResourceDefinitions are at hand (CI and development keep them in
``../shared/crds``), :func:`validate_against_crd` checks a custom resource against the served
version's ``openAPIV3Schema`` of a given CRD file, just as strictly.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

#: The Kubernetes version core kinds are validated against (kubernetes-validate, strict).
KUBERNETES_VERSION = "1.33.0"

_STR = {"type": "string"}
_NONEMPTY = {"type": "string", "minLength": 1}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DNS1123 = {
    "type": "string",
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    "maxLength": 253,
}
_DURATION_PROM = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_DURATION_GW = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}


def _obj(
    props: dict[str, Any], required: Iterable[str] = (), extra: bool = False
) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": extra,
    }


def _metadata(namespaced: bool = True) -> dict[str, Any]:
    props = {"name": _DNS1123, "labels": _STRMAP, "annotations": _STRMAP}
    if namespaced:
        props["namespace"] = _DNS1123
    return _obj(props, required=["name"])


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _metadata(),
            "spec": spec,
        },
        required=["apiVersion", "kind", "metadata", "spec"],
    )


# --- KubeRay ray.io/v1 ------------------------------------------------------------------------
_POD_TEMPLATE = {"type": "object"}  # validated separately as a core PodTemplate
_RESOURCES = {"type": "object"}  # corev1.ResourceRequirements, validated via the pod template
_HEAD_GROUP = _obj(
    {
        "rayStartParams": _STRMAP,
        "template": _POD_TEMPLATE,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": _BOOL,
    },
    required=["rayStartParams", "template"],
)
_WORKER_GROUP = _obj(
    {
        "groupName": _NONEMPTY,
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "rayStartParams": _STRMAP,
        "template": _POD_TEMPLATE,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "suspend": _BOOL,
    },
    required=["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
)
_AUTOSCALER_OPTIONS = _obj(
    {
        "resources": _RESOURCES,
        "image": _STR,
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "securityContext": {"type": "object"},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
    }
)
_RAY_CLUSTER_SPEC = _obj(
    {
        "rayVersion": _STR,
        "enableInTreeAutoscaling": _BOOL,
        "autoscalerOptions": _AUTOSCALER_OPTIONS,
        "headServiceAnnotations": _STRMAP,
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "suspend": _BOOL,
    },
    required=["headGroupSpec"],
)

RAYSERVICE_SCHEMA = _resource(
    "ray.io/v1",
    "RayService",
    _obj(
        {
            "serveConfigV2": _NONEMPTY,
            "rayClusterConfig": _RAY_CLUSTER_SPEC,
            "serveService": {"type": "object"},
            "upgradeStrategy": _obj({"type": {"enum": ["NewCluster", "None"]}}),
        },
        required=["serveConfigV2", "rayClusterConfig"],
    ),
)

RAYJOB_SCHEMA = _resource(
    "ray.io/v1",
    "RayJob",
    _obj(
        {
            "entrypoint": _NONEMPTY,
            "runtimeEnvYAML": _STR,
            "rayClusterSpec": _RAY_CLUSTER_SPEC,
            "shutdownAfterJobFinishes": _BOOL,
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "backoffLimit": {"type": "integer", "minimum": 0},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
            "submitterPodTemplate": {"type": "object"},
            "submitterConfig": _obj({"backoffLimit": {"type": "integer", "minimum": 0}}),
            "entrypointNumCpus": {"type": "number", "minimum": 0},
            "entrypointNumGpus": {"type": "number", "minimum": 0},
            "metadata": _STRMAP,
            "jobId": _STR,
            "suspend": _BOOL,
        },
        required=["entrypoint", "rayClusterSpec"],
    ),
)

# --- Gateway API gateway.networking.k8s.io/v1 HTTPRoute ---------------------------------------
_PARENT_REF = _obj(
    {
        "group": _STR,
        "kind": _STR,
        "namespace": _DNS1123,
        "name": _DNS1123,
        "sectionName": _DNS1123,
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    },
    required=["name"],
)
_BACKEND_REF = _obj(
    {
        "group": _STR,
        "kind": _STR,
        "name": _DNS1123,
        "namespace": _DNS1123,
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "filters": {"type": "array"},
    },
    required=["name"],
)
_MATCH = _obj(
    {
        "path": _obj(
            {
                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                "value": {"type": "string", "pattern": "^/", "maxLength": 1024},
            }
        ),
        "headers": {"type": "array", "maxItems": 16},
        "queryParams": {"type": "array", "maxItems": 16},
        "method": {
            "enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
        },
    }
)
HTTPROUTE_SCHEMA = _resource(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    _obj(
        {
            "parentRefs": {"type": "array", "items": _PARENT_REF, "minItems": 1, "maxItems": 32},
            "hostnames": {
                "type": "array",
                "maxItems": 16,
                "items": {
                    "type": "string",
                    "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                },
            },
            "rules": {
                "type": "array",
                "maxItems": 16,
                "items": _obj(
                    {
                        "name": _STR,
                        "matches": {"type": "array", "items": _MATCH, "maxItems": 64},
                        "filters": {"type": "array", "maxItems": 16},
                        "backendRefs": {"type": "array", "items": _BACKEND_REF, "maxItems": 16},
                        "timeouts": _obj({"request": _DURATION_GW, "backendRequest": _DURATION_GW}),
                    }
                ),
            },
        },
        required=["parentRefs", "rules"],
    ),
)

# --- Prometheus operator monitoring.coreos.com/v1 ---------------------------------------------
_RELABEL = _obj(
    {
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "separator": _STR,
        "targetLabel": _STR,
        "regex": _STR,
        "modulus": _INT,
        "replacement": _STR,
        "action": {
            "enum": [
                "replace",
                "Replace",
                "keep",
                "Keep",
                "drop",
                "Drop",
                "hashmod",
                "HashMod",
                "labelmap",
                "LabelMap",
                "labeldrop",
                "LabelDrop",
                "labelkeep",
                "LabelKeep",
                "lowercase",
                "Lowercase",
                "uppercase",
                "Uppercase",
                "keepequal",
                "KeepEqual",
                "dropequal",
                "DropEqual",
            ]
        },
    }
)
_LABEL_SELECTOR = _obj({"matchLabels": _STRMAP, "matchExpressions": {"type": "array"}})
SERVICEMONITOR_SCHEMA = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _obj(
        {
            "jobLabel": _STR,
            "targetLabels": {"type": "array", "items": _STR},
            "podTargetLabels": {"type": "array", "items": _STR},
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _obj(
                {"any": _BOOL, "matchNames": {"type": "array", "items": _STR}}
            ),
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": _obj(
                    {
                        "port": _STR,
                        "targetPort": {"type": ["string", "integer"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION_PROM,
                        "scrapeTimeout": _DURATION_PROM,
                        "honorLabels": _BOOL,
                        "honorTimestamps": _BOOL,
                        "params": {"type": "object"},
                        "relabelings": {"type": "array", "items": _RELABEL},
                        "metricRelabelings": {"type": "array", "items": _RELABEL},
                        "tlsConfig": {"type": "object"},
                        "bearerTokenSecret": {"type": "object"},
                    }
                ),
            },
            "sampleLimit": _INT,
        },
        required=["selector", "endpoints"],
    ),
)

_RULE = {
    "type": "object",
    "properties": {
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$"},
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION_PROM,
        "keep_firing_for": _DURATION_PROM,
        "labels": _STRMAP,
        "annotations": _STRMAP,
    },
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
PROMETHEUSRULE_SCHEMA = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    _obj(
        {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": _obj(
                    {
                        "name": _NONEMPTY,
                        "interval": _DURATION_PROM,
                        "limit": _INT,
                        "partial_response_strategy": _STR,
                        "rules": {"type": "array", "minItems": 1, "items": _RULE},
                    },
                    required=["name", "rules"],
                ),
            },
        },
        required=["groups"],
    ),
)

CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("ray.io/v1", "RayService"): RAYSERVICE_SCHEMA,
    ("ray.io/v1", "RayJob"): RAYJOB_SCHEMA,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTPROUTE_SCHEMA,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE_SCHEMA,
}


class ManifestError(ValueError):
    """A rendered object fails validation; the message names the object and the field."""


def _describe(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _path(err: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<root>"


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_SCHEMAS


def validate_core(obj: dict[str, Any], version: str = KUBERNETES_VERSION) -> None:
    """kubernetes-validate, strict, at ``version``."""
    import kubernetes_validate  # local: heavy, loads the Kubernetes schemas

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "<root>"
        raise ManifestError(f"{_describe(obj)}: {path}: {exc.message}") from exc


def _pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = obj["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or {}
    out = [("headGroupSpec.template", cluster["headGroupSpec"]["template"])]
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        out.append((f"workerGroupSpecs[{i}].template", group["template"]))
    if spec.get("submitterPodTemplate"):
        out.append(("submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def validate_serve_config(text: str) -> dict[str, Any]:
    """Parse serveConfigV2 and validate it with Ray Serve's own schema (ServeDeploySchema)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)

    # Ray accepts unknown keys for forward compatibility (and ignores them); a typo there would
    # silently drop a setting, so keys the installed Ray does not know are errors here.
    def known(model: Any) -> set[str]:
        return {k for name, f in model.model_fields.items() for k in (name, f.alias) if k}

    def check(where: str, mapping: dict[str, Any], model: Any) -> None:
        unknown = sorted(set(mapping) - known(model))
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {unknown} (not in Ray Serve's {model.__name__})"
            )

    check("<root>", config, ServeDeploySchema)
    for i, app in enumerate(config.get("applications", [])):
        check(f"applications[{i}]", app, ServeApplicationSchema)
        for j, dep in enumerate(app.get("deployments", [])):
            where = f"applications[{i}].deployments[{j}]({dep.get('name')})"
            check(where, dep, DeploymentSchema)
            if isinstance(dep.get("autoscaling_config"), dict):
                auto = dep["autoscaling_config"]
                check(f"{where}.autoscaling_config", auto, AutoscalingConfig)
                if auto.get("min_replicas", 0) > auto.get("max_replicas", float("inf")):
                    raise ValueError(f"{where}.autoscaling_config: min_replicas > max_replicas")
    return config


def validate_custom(obj: dict[str, Any], version: str = KUBERNETES_VERSION) -> None:
    """The project's schema for a custom resource, plus its embedded pod templates and serve config."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    schema = CUSTOM_SCHEMAS.get(key)
    if schema is None:
        raise ManifestError(f"{_describe(obj)}: no schema for {key[0]} {key[1]}")
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path)
    )
    if errors:
        raise ManifestError("; ".join(f"{_describe(obj)}: {_path(e)}: {e.message}" for e in errors))
    if obj["kind"] in ("RayService", "RayJob"):
        for where, template in _pod_templates(obj):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": obj["metadata"]["name"]},
                "template": copy.deepcopy(template),
            }
            try:
                validate_core(wrapped, version)
            except ManifestError as exc:
                raise ManifestError(f"{_describe(obj)}: {where}: {exc}") from exc
    if obj["kind"] == "RayService":
        try:
            validate_serve_config(obj["spec"]["serveConfigV2"])
        except Exception as exc:  # pydantic.ValidationError or YAML errors
            raise ManifestError(f"{_describe(obj)}: spec.serveConfigV2: {exc}") from exc
    if obj["kind"] == "HTTPRoute":
        for i, rule in enumerate(obj["spec"]["rules"]):
            refs = rule.get("backendRefs", [])
            if refs and sum(r.get("weight", 1) for r in refs) == 0:
                raise ManifestError(
                    f"{_describe(obj)}: spec.rules[{i}].backendRefs: all weights are 0"
                )


_QUANTITY = re.compile(
    r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
)


def quantity_errors(obj: dict[str, Any]) -> list[str]:
    """Container resource quantities that the API server would reject (the OpenAPI schema
    types them as int-or-string, so kubernetes-validate does not look inside)."""
    errors = []
    for where, spec in pod_specs(obj):
        for c in list(spec.get("initContainers", [])) + list(spec.get("containers", [])):
            for kind, values in (c.get("resources") or {}).items():
                for name, value in (values or {}).items():
                    if not _QUANTITY.match(str(value)):
                        errors.append(
                            f"{where} container {c.get('name')}: resources.{kind}.{name}: {value!r} is not a quantity"
                        )
    return errors


def validate(obj: dict[str, Any], version: str = KUBERNETES_VERSION) -> None:
    """Validate any object kuberank renders: custom resources here, core kinds strictly."""
    if is_custom(obj):
        validate_custom(obj, version)
    else:
        validate_core(obj, version)
    problems = quantity_errors(obj)
    if problems:
        raise ManifestError("; ".join(problems))


def pod_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec an object creates, with a label saying where it sits."""
    kind = obj.get("kind")
    name = obj.get("metadata", {}).get("name")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(f"{kind}/{name}", obj["spec"]["template"]["spec"])]
    if kind == "CronJob":
        return [(f"{kind}/{name}", obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "Pod":
        return [(f"{kind}/{name}", obj["spec"])]
    if kind in ("RayService", "RayJob"):
        return [(f"{kind}/{name} {where}", t["spec"]) for where, t in _pod_templates(obj)]
    return []


# --- policy checks shared by the chart and manifest tests ---------------------------------------

GPU_RESOURCE = "nvidia.com/gpu"


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def security_violations(obj: dict[str, Any]) -> list[str]:
    """Pods that may run as root, write their root filesystem, keep capabilities, escalate,
    run without the RuntimeDefault seccomp profile, or lack cpu/memory requests and limits."""
    problems: list[str] = []
    for where, spec in pod_specs(obj):
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        for c in _containers(spec):
            tag = f"{where} container {c.get('name')}"
            sc = c.get("securityContext", {})
            if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                problems.append(f"{tag}: runAsNonRoot is not true")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{tag}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{tag}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{tag}: privileged")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get(
                "capabilities", {}
            ).get("add"):
                problems.append(f"{tag}: capabilities do not drop ALL (or add some)")
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{tag}: seccompProfile is not RuntimeDefault")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if not res.get(kind, {}).get(r):
                        problems.append(f"{tag}: no {r} {kind[:-1]}")
    return problems


def gpu_consumers(objs: Iterable[dict[str, Any]]) -> list[str]:
    """``<object> <where>:<container>`` for every container that asks for a GPU."""
    users = []
    for obj in objs:
        for where, spec in pod_specs(obj):
            for c in _containers(spec):
                res = c.get("resources", {})
                if GPU_RESOURCE in res.get("limits", {}) or GPU_RESOURCE in res.get("requests", {}):
                    users.append(f"{where}:{c.get('name')}")
    return users


# --- validation against the real CustomResourceDefinitions -------------------------------------
#
# The hand-written schemas above cover the fields kuberank uses; the authoritative check is the
# operators' own CRDs (openAPIV3Schema of the served version). A CRD is a *structural* schema:
# the API server prunes every field it does not describe (unless the node says
# `x-kubernetes-preserve-unknown-fields: true`), so here an unknown field is an error, i.e. every
# object node without that marker gets `additionalProperties: false`. The Kubernetes extensions
# that carry meaning are translated: `nullable`, `x-kubernetes-int-or-string`,
# `x-kubernetes-embedded-resource`, and `x-kubernetes-list-type` set/map (uniqueness, with the
# map keys' defaults applied first, as the API server defaults before it validates). Required
# fields that have a default are not reported (the server fills them in). CEL rules
# (`x-kubernetes-validations`) are *not* evaluated: :func:`crd_cel_rule_count` says how many a
# CRD carries, so the tests can say what is left unchecked.

_CRD_DROP = {"description", "default", "example", "format", "externalDocs"}


def _crd_to_jsonschema(node: Any, *, root: bool = False) -> Any:
    """An OpenAPI v3 CRD schema node as a strict Draft 4 JSON Schema."""
    if isinstance(node, list):
        return [_crd_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _CRD_DROP or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {k: _crd_to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _crd_to_jsonschema(value)
        else:
            out[key] = copy.deepcopy(value)
    props = node.get("properties", {})
    if "required" in out:  # the API server defaults before it validates
        out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
        if not out["required"]:
            del out["required"]
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {})
        for k in ("apiVersion", "kind"):
            out["properties"].setdefault(k, {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if root:
        # ObjectMeta is validated by the API server itself, not by the CRD's schema
        out["properties"]["metadata"] = {
            "type": "object",
            "properties": {
                "name": _STR,
                "namespace": _STR,
                "labels": _STRMAP,
                "annotations": _STRMAP,
            },
        }
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    list_type = node.get("x-kubernetes-list-type")
    if list_type in ("set", "map"):
        keys = node.get("x-kubernetes-list-map-keys", [])
        item_props = (node.get("items") or {}).get("properties", {})
        out["x-unique"] = {
            "type": list_type,
            "keys": keys,
            "defaults": {k: item_props.get(k, {}).get("default") for k in keys},
        }
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _unique(validator: Any, spec: dict[str, Any], instance: Any, schema: Any) -> Iterable[Any]:
    if not isinstance(instance, list):
        return
    seen: dict[Any, int] = {}
    for i, item in enumerate(instance):
        if spec["type"] == "set":
            key = yaml.safe_dump(item, sort_keys=True)
        elif isinstance(item, dict):
            key = tuple((k, item.get(k, spec["defaults"].get(k))) for k in spec["keys"])
        else:
            continue
        if key in seen:
            what = ", ".join(f"{k}={v}" for k, v in key) if spec["type"] == "map" else str(item)
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {i} duplicate ({what}) in a list-type={spec['type']} list"
            )
        else:
            seen[key] = i


_CRDValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-unique": _unique})


def load_crd(path: str | Path) -> dict[str, Any]:
    """A CustomResourceDefinition from a YAML file (the first CRD document in it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for doc in yaml.load_all(Path(path).read_text(), Loader=loader):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            return doc
    raise ManifestError(f"{path}: no CustomResourceDefinition in the file")


def _crd_version(crd: dict[str, Any], version: str) -> dict[str, Any]:
    names = crd["spec"]["names"]["kind"]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served", False):
                raise ManifestError(f"{crd['spec']['group']}/{version} {names} is not served")
            return v
    raise ManifestError(
        f"{crd['spec']['group']}/{version} {names}: the CRD has no such version "
        f"({[v['name'] for v in crd['spec']['versions']]})"
    )


_CRD_CACHE: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}


def _crd_cached(path: str | Path) -> dict[str, Any]:
    key = str(path)
    if key not in _CRD_CACHE:
        _CRD_CACHE[key] = (load_crd(path), {})
    return _CRD_CACHE[key][0]


def crd_validator(path: str | Path, version: str) -> Any:
    """A (cached) validator for ``version`` of the CRD in ``path``."""
    crd = _crd_cached(path)
    validators = _CRD_CACHE[str(path)][1]
    if version not in validators:
        schema = _crd_version(crd, version)["schema"]["openAPIV3Schema"]
        validators[version] = _CRDValidator(_crd_to_jsonschema(schema, root=True))
    return validators[version]


def crd_cel_rule_count(path: str | Path, version: str) -> int:
    """How many CEL rules (`x-kubernetes-validations`) the CRD's schema has (not evaluated)."""
    schema = _crd_version(_crd_cached(path), version)["schema"]["openAPIV3Schema"]

    def count(node: Any) -> int:
        if isinstance(node, dict):
            return len(node.get("x-kubernetes-validations", [])) + sum(
                count(v) for v in node.values()
            )
        if isinstance(node, list):
            return sum(count(v) for v in node)
        return 0

    return count(schema)


def crd_kind(path: str | Path) -> tuple[str, str]:
    """(group, kind) of the CRD in ``path``."""
    crd = _crd_cached(path)
    return crd["spec"]["group"], crd["spec"]["names"]["kind"]


def validate_against_crd(obj: dict[str, Any], path: str | Path) -> None:
    """Validate a custom resource with the openAPIV3Schema of the real CRD in ``path``.

    Raises :class:`ManifestError` naming the object, the CRD file and every failing field.
    """
    group, kind = crd_kind(path)
    api_group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    if (api_group, obj.get("kind")) != (group, kind):
        raise ManifestError(
            f"{_describe(obj)}: {obj.get('apiVersion')} is not a {group} {kind} ({path})"
        )
    try:
        validator = crd_validator(path, version)
    except ManifestError as exc:
        raise ManifestError(f"{_describe(obj)}: {exc} ({path})") from exc
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        name = Path(str(path)).name
        raise ManifestError(
            "; ".join(f"{_describe(obj)} [{name}]: {_path(e)}: {e.message}" for e in errors)
        )
