"""Compile the pipeline to kfp IR YAML, load it back and check its shape.

Pure core: :func:`compile_pipeline` (target + settings -> file) and :func:`check_package` (an
IR YAML file -> the facts that must hold, or an error naming what is wrong). Thin wrapper:
``kuberank pipeline compile``.
"""

import os
import tempfile
from pathlib import Path

import yaml
from kfp import compiler, components

from kuberank.errors import KuberankError
from kuberank.pipelines.pipeline import (
    CLUSTER_ONLY_TASKS,
    PIPELINE_NAME,
    ClusterSettings,
    build_pipeline,
    expected_tasks,
    gpu_tasks,
)


def compile_pipeline(
    out: str | os.PathLike, target: str = "cluster", cluster: ClusterSettings | None = None
) -> dict:
    """Write the IR YAML of the pipeline for ``target`` to ``out`` (atomically), load it back
    with kfp and check it. Returns the summary of :func:`check_package`."""
    out = Path(out)
    if out.is_dir():
        raise KuberankError(f"--out: {out} is a directory; give a file name such as kuberank.yaml")
    if not out.parent.is_dir():
        raise KuberankError(f"--out: {out.parent}: no such directory")
    if out.suffix not in (".yaml", ".yml"):
        raise KuberankError(f"--out: {out} must end with .yaml (kfp writes IR YAML)")
    with tempfile.TemporaryDirectory(prefix=".kuberank-compile-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        compiler.Compiler().compile(build_pipeline(target, cluster), str(staged))
        summary = check_package(staged, target, cluster)
        os.replace(staged, out)
    summary["path"] = str(out)
    return summary


def _executor_of(spec: dict, component: str) -> dict:
    label = spec["components"][component]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]


def package_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline (nested DAGs included), by ``taskInfo.name``, with its
    component, caching, retry and container resources. Tasks of the same name in different
    branches (the export of the compressed or of the full model) are listed once per branch as
    ``name``, ``name#2``."""
    found: dict[str, dict] = {}

    def visit(dag: dict) -> None:
        display = {key: t["taskInfo"]["name"] for key, t in dag.get("tasks", {}).items()}
        for task in dag.get("tasks", {}).values():
            component = task["componentRef"]["name"]
            comp = spec["components"][component]
            if "dag" in comp:
                visit(comp["dag"])
                continue
            name = task["taskInfo"]["name"]
            key, n = name, 1
            while key in found:
                n += 1
                key = f"{name}#{n}"
            executor = _executor_of(spec, component)
            found[key] = {
                "component": component,
                "executor": comp["executorLabel"],
                "caching": task.get("cachingOptions", {}).get("enableCache", False),
                "retry": task.get("retryPolicy", {}),
                "resources": executor.get("container", {}).get("resources", {}),
                "image": executor.get("container", {}).get("image"),
                "depends": sorted(display.get(d, d) for d in task.get("dependentTasks", [])),
            }

    visit(spec["root"]["dag"])
    return found


def check_package(
    path: str | os.PathLike, target: str = "cluster", cluster: ClusterSettings | None = None
) -> dict:
    """Load an IR YAML file back (``kfp.components.load_component_from_file``) and check it:
    the pipeline's name and parameters, every expected task, caching, retries and GPU
    settings where they belong (and nowhere else), the S3 secret on the cluster tasks.
    Returns a summary; raises KuberankError naming the first thing that is wrong."""
    settings = cluster or ClusterSettings()
    try:
        loaded = components.load_component_from_file(str(path))
    except Exception as exc:
        raise KuberankError(f"{path}: kfp cannot load it back: {exc}") from exc
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    spec = docs[0]
    platform = docs[1] if len(docs) > 1 else {}
    if spec["pipelineInfo"]["name"] != PIPELINE_NAME:
        raise KuberankError(
            f"{path}: pipeline name {spec['pipelineInfo']['name']!r}, expected {PIPELINE_NAME!r}"
        )
    tasks = package_tasks(spec)
    names = {k.split("#")[0] for k in tasks}
    missing = sorted(expected_tasks(target) - names)
    if missing:
        raise KuberankError(f"{path}: missing tasks {missing}")
    if target == "local" and names & CLUSTER_ONLY_TASKS:
        raise KuberankError(
            f"{path}: cluster-only tasks {sorted(names & CLUSTER_ONLY_TASKS)} in a local pipeline"
        )
    executors = (
        platform.get("platforms", {})
        .get("kubernetes", {})
        .get("deploymentSpec", {})
        .get("executors", {})
    )
    on_gpu = sorted(k for k, t in tasks.items() if t["resources"].get("accelerator"))
    wanted_gpu = sorted(k for k in tasks if k.split("#")[0] in gpu_tasks(target, settings))
    if on_gpu != wanted_gpu:
        raise KuberankError(f"{path}: GPU on tasks {on_gpu}, expected exactly {wanted_gpu}")
    if target == "cluster":
        for key, task in tasks.items():
            config = executors.get(task["executor"], {})
            secrets = [
                s.get("secretName")
                or s.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant")
                for s in config.get("secretAsEnv", [])
            ]
            if settings.s3_secret not in secrets:
                raise KuberankError(
                    f"{path}: task {key} does not get the {settings.s3_secret} secret"
                )
            if task["resources"].get("accelerator") and not config.get("tolerations"):
                raise KuberankError(f"{path}: GPU task {key} has no toleration")
    return {
        "path": str(path),
        "target": target,
        "name": loaded.name,
        "parameters": sorted(spec["root"]["inputDefinitions"]["parameters"]),
        "tasks": sorted(tasks),
        "gpu_tasks": on_gpu,
        "cached_tasks": sorted(k for k, t in tasks.items() if t["caching"]),
        "retried_tasks": sorted(k for k, t in tasks.items() if t["retry"]),
    }
