"""Shared fixtures. Tests use real components (Ray, Triton, kfp local runner, Helm, Prometheus,
a loopback S3 server); where a binary is absent on a user's machine the test skips with the
reason, and under CI (CI=true) such a skip is a failure instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kuberank.serving.triton import free_port

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` unless ``condition``; in CI, fail instead of skipping."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


# The operators' real CRDs (../shared/crds in a development checkout, KUBERANK_CRDS_DIR elsewhere)
CRDS = Path(
    os.environ.get("KUBERANK_CRDS_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "crds"
)


def crd_file(name: str) -> Path:
    """A CRD file from CRDS; skips (fails under CI=true) when it is not there."""
    require(
        CRDS.is_dir(),
        f"real CRDs not found at {CRDS} (a development checkout keeps them in ../shared/crds; "
        "set KUBERANK_CRDS_DIR to point elsewhere)",
    )
    path = CRDS / name
    require(path.is_file(), f"{path} is missing")
    return path


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} not found ({hint})")
    return path


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("KUBERANK_PROGRESS", "0")


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """kuberank's cache (kuberank.storage.cache_dir) in the session's temporary directory: the
    suite shares it, the user's own cache is never read or written."""
    previous = os.environ.get("KUBERANK_CACHE")
    os.environ["KUBERANK_CACHE"] = str(tmp_path_factory.mktemp("kuberank-cache"))
    yield
    if previous is None:
        os.environ.pop("KUBERANK_CACHE", None)
    else:
        os.environ["KUBERANK_CACHE"] = previous


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 API (moto in server mode) on 127.0.0.1, for boto3 round trips."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
                time.sleep(0.2)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "KUBERANK_S3_ENDPOINT_URL": url,
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield url
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)
