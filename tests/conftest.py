"""Shared fixtures. Tests use real components (Ray, Triton, kfp local runner, Helm, Prometheus,
a loopback S3 server); where a binary is absent on a user's machine the test skips with the
reason, and under CI (CI=true) such a skip is a failure instead."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` unless ``condition``; in CI, fail instead of skipping."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} not found ({hint})")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("KUBERANK_PROGRESS", "0")
