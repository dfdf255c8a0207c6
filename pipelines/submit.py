"""Submit the pipeline to a Kubeflow Pipelines endpoint with ``kfp.Client``.

Pure core: :func:`parse_params` (``NAME=VALUE`` strings -> typed pipeline arguments, checked
against the pipeline's parameters). Thin wrapper: :func:`submit` (compile if no package is
given, then ``create_run_from_pipeline_package``) and ``kuberank pipeline submit``.
"""

import datetime as _dt
import inspect
import os
import tempfile
from pathlib import Path

import kfp

from kuberank.errors import KuberankError
from kuberank.pipelines.compile import compile_pipeline
from kuberank.pipelines.pipeline import build_pipeline

TOKEN_ENV = "KF_PIPELINES_TOKEN"


def pipeline_parameters() -> dict[str, type]:
    """The pipeline's parameters and their Python types (from the pipeline function)."""
    func = build_pipeline("local").pipeline_func
    return {name: p.annotation for name, p in inspect.signature(func).parameters.items()}


def _convert(name: str, text: str, kind: type):
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise KuberankError(f"--param {name}: {text!r} is not a boolean (true/false)")
    try:
        return kind(text)
    except ValueError:
        raise KuberankError(f"--param {name}: {text!r} is not a valid {kind.__name__}") from None


def parse_params(items: list[str] | None, known: dict[str, type] | None = None) -> dict:
    """``["workers=4", "compress_model=false"]`` -> ``{"workers": 4, "compress_model": False}``;
    unknown names and malformed values are errors naming the parameter."""
    known = pipeline_parameters() if known is None else known
    result = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise KuberankError(f"--param: {item!r} is not NAME=VALUE")
        if name not in known:
            raise KuberankError(
                f"--param {name}: not a pipeline parameter (one of {', '.join(sorted(known))})"
            )
        result[name] = _convert(name, value, known[name])
    return result


def default_run_name(now: _dt.datetime | None = None) -> str:
    return f"kuberank-{(now or _dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def submit(
    host: str,
    *,
    package: str | None = None,
    arguments: dict | None = None,
    experiment: str = "kuberank",
    run_name: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    pipeline_root: str | None = None,
    enable_caching: bool | None = None,
    service_account: str | None = None,
    cluster=None,
    client=None,
) -> dict:
    """Create a run of the pipeline on the KFP endpoint ``host``: the IR YAML ``package`` if
    given, else the cluster pipeline compiled now. ``token`` (or $KF_PIPELINES_TOKEN) is sent
    as a bearer token. Returns ``{"run_id", "run_name", "experiment", "host", "package"}``."""
    if not host.startswith(("http://", "https://")):
        raise KuberankError(f"--host: {host!r} must start with http:// or https://")
    if package and not Path(package).is_file():
        raise KuberankError(f"--package: {package}: no such file")
    token = token or os.environ.get(TOKEN_ENV) or None
    run_name = run_name or default_run_name()
    with tempfile.TemporaryDirectory(prefix="kuberank-submit-") as tmp:
        if not package:
            package = str(Path(tmp) / "kuberank.yaml")
            compile_pipeline(package, "cluster", cluster)
        if client is None:
            client = kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")
        result = client.create_run_from_pipeline_package(
            package,
            arguments=arguments or {},
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            pipeline_root=pipeline_root,
            enable_caching=enable_caching,
            service_account=service_account,
        )
    return {
        "run_id": result.run_id,
        "run_name": run_name,
        "experiment": experiment,
        "host": host,
        "package": package if Path(package).exists() else "(compiled for this run)",
    }
