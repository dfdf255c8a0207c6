"""``kuberank serve``: the bundled tritonserver and Ray Serve start on 127.0.0.1, answer a
search through Triton, and both stop cleanly on SIGTERM (no server process left behind). Direct
ingress (the launcher's default): the Ingress replica's own port answers like Serve's proxy, and
overload there still gets fast 503s."""

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

from kuberank.errors import KuberankError
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


def test_http_json_takes_a_non_http_answer_for_a_refusal():
    import socket
    import threading

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def answer_in_binary():  # what a gRPC (HTTP/2) port sends an HTTP/1 client
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00garbage\r\n\r\n")

        thread = threading.Thread(target=answer_in_binary, daemon=True)
        thread.start()
        port = server.getsockname()[1]
        with pytest.raises(ConnectionError, match="not an HTTP/1 answer"):
            http_json("GET", f"http://127.0.0.1:{port}/readyz", timeout=5)
        thread.join(10)


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # not a process, or gone
        return ""


def test_direct_ingress_answers_like_the_proxy_and_sheds_overload(tmp_path_factory):
    import ray
    from test_reliability import _load_with_statuses

    from kuberank.raycluster import ensure_ray
    from kuberank.serving.launcher import LocalServing

    store, _, _ = serving_store(tmp_path_factory)
    # the Ingress admits 2 ongoing + 2 queued requests: 8 clients are twice that
    limits = {"deployments": {"Ingress": {"max_ongoing_requests": 2, "max_queued_requests": 2}}}
    # direct ingress is switched on when Ray starts: a cluster already running without it (here
    # the shared session of test_app, which restarts itself when needed) is refused, or restarted
    ensure_ray(num_cpus=2)
    with pytest.raises(KuberankError, match="restart_ray=True"):
        LocalServing(str(store), use_triton=False, ingress="direct").start()
    with LocalServing(
        str(store), use_triton=False, settings=limits, num_cpus=2, restart_ray=True
    ) as running:
        # one Ingress replica per core, each on its own port with one core's share: one batch
        # worker with one ONNX Runtime thread
        assert len(running.urls) == 2 and running.url == running.urls[0] != running.proxy_url
        for url in running.urls:
            ready = http_json("GET", url + "/readyz")[1]
            assert (ready["batch_workers"], ready["onnx_threads"]) == (1, 1), ready
        # the replicas run at normal priority, not Ray's default worker niceness of 15
        replicas = [pid for pid in os.listdir("/proc") if _cmdline(pid).startswith("ray::Serve")]
        assert replicas and {os.getpriority(os.PRIO_PROCESS, int(p)) for p in replicas} == {0}
        body = {"query": "how to cook pasta", "k": 2}
        direct = [http_json("POST", url + "/search", body) for url in running.urls]
        proxied = http_json("POST", running.proxy_url + "/search", body)
        assert direct[0][0] == direct[1][0] == proxied[0] == 200
        assert direct[0][1]["items"][0]["id"] == "d2"
        assert direct[0][1]["items"] == direct[1][1]["items"] == proxied[1]["items"]
        results = _load_with_statuses(
            running.url + "/search", lambda i: {"query": f"pasta {i % 5}", "k": 3}, 8, 240
        )
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        rejected = [t for s, t in results if s == 503]
        assert statuses.count(200) > 0 and rejected, (statuses.count(200), len(rejected))
        assert sorted(rejected)[len(rejected) // 2] < 0.1, "median 503 slower than 100 ms"
        assert http_json("GET", running.url + "/readyz")[0] == 200
        url = running.url
    assert not ray.is_initialized() and "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ
    with pytest.raises(OSError):
        http_json("GET", url + "/healthz", timeout=2)
