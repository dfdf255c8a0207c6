"""``kuberank serve``: the bundled tritonserver and Ray Serve start on 127.0.0.1, answer a
search through Triton, and both stop cleanly on SIGTERM (no server process left behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import free_port
from test_index import serving_store

from kuberank.serving.launcher import http_json

pytestmark = pytest.mark.slow


def test_serve_starts_triton_and_serve_and_stops_on_sigterm(tmp_path_factory):
    store, _, _ = serving_store(tmp_path_factory)
    port = free_port()
    env = {**os.environ, "KUBERANK_PROGRESS": "0", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kuberank.cli",
            "serve",
            "--model-store",
            str(store),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("{"):
                break
        ready = json.loads(line)
        assert ready["url"] == f"http://127.0.0.1:{port}" and ready["triton"].startswith(
            "127.0.0.1:"
        )
        status, body = http_json(
            "POST", ready["url"] + "/search", {"query": "how to cook pasta", "k": 1}
        )
        assert status == 200 and body["items"][0]["id"] == "d2"
        triton_port = int(ready["triton"].split(":")[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        for p in (port, triton_port):
            with pytest.raises(OSError):
                http_json("GET", f"http://127.0.0.1:{p}/", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
