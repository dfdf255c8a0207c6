"""The real tritonserver (bundled in nvidia-pytriton, python backend) serving the generated local
repository: HTTP and gRPC inference match the in-process PyTorch model; a repository the
server refuses is a clear error carrying the server's own message."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import require
from test_export import MAX_LENGTH, exported_store

from kuberank.components import model_repository as mr
from kuberank.config import base_model_path
from kuberank.errors import KuberankError
from kuberank.serving.triton import (
    TritonServer,
    TritonStartError,
    find_tritonserver,
    parent_death_signal,
)

pytestmark = pytest.mark.slow

TEXTS = [
    "space adventure with robots",
    "a",
    "Die Hard (1988) Action|Thriller",
    # longer than MAX_LENGTH tokens: truncated the same way on both sides
    "an epic, sprawling family saga that follows three generations of winemakers through war, "
    "drought, betrayal and reconciliation in the hills of northern italy, with a lot of food",
]


def _tritonserver_available() -> bool:
    try:
        find_tritonserver()
    except KuberankError:
        return False
    return True


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    require(_tritonserver_available(), "tritonserver not found (install nvidia-pytriton)")
    return exported_store(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def server(store):
    with TritonServer(store / "triton-local") as running:
        yield running


@pytest.fixture(scope="module")
def patient_server(store, tmp_path_factory):
    """The same repository with a queue policy that waits a minute instead of the serving
    budget: for tests about answers, not about shedding, on a host that may be loaded."""
    repo = tmp_path_factory.mktemp("patient") / "triton-local"
    shutil.copytree(store / "triton-local", repo, symlinks=True)
    budget = f"default_timeout_microseconds: {mr.RepositorySpec.queue_timeout_us}"
    patched = 0
    for config in repo.glob("*/config.pbtxt"):
        text = config.read_text()
        if budget in text:
            config.write_text(text.replace(budget, "default_timeout_microseconds: 60000000"))
            patched += 1
    assert patched, "no queue policy found to relax"
    with TritonServer(repo) as running:
        yield running


@pytest.fixture(scope="module")
def reference():
    from kuberank.encoder import TextEncoder

    return TextEncoder(base_model_path(), max_length=MAX_LENGTH).encode(TEXTS)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _infer(module, url: str, texts: list[str]) -> np.ndarray:
    client = module.InferenceServerClient(url)
    try:
        batch = np.array([[t.encode()] for t in texts], dtype=object)
        text = module.InferInput("TEXT", list(batch.shape), "BYTES")
        text.set_data_from_numpy(batch)
        result = client.infer(
            "query_encoder", [text], outputs=[module.InferRequestedOutput("EMBEDDING")]
        )
        return result.as_numpy("EMBEDDING")
    finally:
        client.close()


def test_server_binds_loopback_and_reports_the_models(server):
    import tritonclient.http as http

    assert server.http_url.startswith("127.0.0.1:") and server.grpc_url.startswith("127.0.0.1:")
    client = http.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_ready()
        states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
        assert states == {"tokenizer": "READY", "encoder": "READY", "query_encoder": "READY"}
        meta = client.get_model_metadata("query_encoder")
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("TEXT", "BYTES")]
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
            ("EMBEDDING", "FP32", [-1, 384])
        ]
    finally:
        client.close()


def test_http_and_grpc_embeddings_match_pytorch(server, reference):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    over_http = _infer(http, server.http_url, TEXTS)
    over_grpc = _infer(grpc, server.grpc_url, TEXTS)
    assert over_http.shape == over_grpc.shape == (len(TEXTS), 384)
    assert _cosine(over_http, reference).min() >= 0.999
    assert _cosine(over_grpc, reference).min() >= 0.999
    np.testing.assert_allclose(over_http, over_grpc, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(over_http, axis=1), 1.0, atol=1e-5)


def test_concurrent_single_text_requests_are_batched_correctly(patient_server, reference):
    """Requests of different lengths (different sequence buckets) in flight together. The
    models' queue policy rejects what waits past the serving budget (100 ms), which a loaded
    host can exceed, and an ensemble's steps do not inherit the request's own timeout: this
    test is about the batched answers, so its server waits a minute (the policy has its own
    test below)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(patient_server.http_url, concurrency=len(TEXTS))
    try:
        pending = []
        for _ in range(3):
            for i, t in enumerate(TEXTS):
                text = http.InferInput("TEXT", [1, 1], "BYTES")
                text.set_data_from_numpy(np.array([[t.encode()]], dtype=object))
                request = client.async_infer("query_encoder", [text], timeout=60_000_000)
                pending.append((i, request))
        for i, request in pending:
            got = request.get_result(timeout=60).as_numpy("EMBEDDING")
            assert _cosine(got, reference[i : i + 1])[0] >= 0.999, TEXTS[i]
    finally:
        client.close()


@pytest.mark.parametrize("damage", ["config", "model_file"])
def test_refused_repository_is_an_error_with_the_servers_message(store, tmp_path, damage):
    repo = tmp_path / "repo"
    shutil.copytree(store / "triton-local" / "tokenizer", repo / "tokenizer")
    cfg = repo / "tokenizer" / "config.pbtxt"
    if damage == "config":
        # valid protobuf text, but a batching setting the server rejects
        cfg.write_text(
            cfg.read_text().replace(
                "preferred_batch_size: [ 8, 16, 32 ]", "preferred_batch_size: [ 8, 128 ]"
            )
        )
        mr.parse_config(cfg.read_text())
        expected = "dynamic batching preferred size must be <= max batch size for tokenizer"
    else:  # the python model's initialize() fails in the stub process
        version = next(p for p in (repo / "tokenizer").iterdir() if p.name.isdigit())
        (version / "tokenizer.json").write_text("{not json")
        expected = f"failed to load 'tokenizer' version {version.name}"
    server = TritonServer(repo)
    with pytest.raises(TritonStartError) as err:
        with server:
            pass
    message = str(err.value)
    assert str(repo) in message and expected in message, message
    assert server.process is None  # stopped
    assert not glob.glob(f"/dev/shm/{server.shm_prefix}*")  # no shared memory left behind


def test_missing_binary_and_repository_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBERANK_TRITONSERVER", str(tmp_path / "no-tritonserver"))
    with pytest.raises(
        KuberankError, match="KUBERANK_TRITONSERVER=.*no-tritonserver: no such file"
    ):
        TritonServer(tmp_path)
    monkeypatch.delenv("KUBERANK_TRITONSERVER")
    require(_tritonserver_available(), "tritonserver not found (install nvidia-pytriton)")
    with pytest.raises(KuberankError, match="no such model repository"):
        TritonServer(tmp_path / "nowhere").start()


def test_server_only_reads_its_repository(server, store):
    """The python-backend stubs import model.py and write its bytecode beside it: they do so in
    the server's linked view, never in the repository (a read-only model store in a pod)."""
    repository = (store / "triton-local").resolve()
    assert server.served_repository is not None and server.served_repository != repository
    assert list(server.served_repository.rglob("__pycache__"))  # where the stubs wrote
    assert not list(repository.rglob("__pycache__"))
    model_py = next(server.served_repository.glob("tokenizer/*/model.py"))
    assert model_py.is_symlink() and model_py.resolve().is_relative_to(repository)


def test_parent_death_signal_is_armed_from_the_main_thread_only():
    probe = (
        "import ctypes; value = ctypes.c_int(); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0); print(value.value)"
    )  # PR_GET_PDEATHSIG
    armed = subprocess.run(
        [sys.executable, "-c", probe],
        preexec_fn=parent_death_signal(signal.SIGTERM),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert armed.stdout.strip() == str(int(signal.SIGTERM)), armed.stderr
    # the kernel signals when the forking *thread* ends: from a worker thread it is not armed
    found = []
    worker = threading.Thread(target=lambda: found.append(parent_death_signal()))
    worker.start()
    worker.join(10)
    assert found == [None]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_parent_takes_the_server_and_its_stubs_with_it(store, tmp_path):
    """SIGKILL of the process that started the server (no stop(), no killpg of the server's
    own group): the parent-death signal ends the server, which ends its stubs and removes their
    shared memory."""
    script = (
        "import time\n"
        "from kuberank.serving.triton import TritonServer\n"
        f"server = TritonServer({str(store / 'triton-local')!r})\n"
        "server.start()\n"
        "server.wait_ready()\n"
        "print(server.process.pid, server.shm_prefix, flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # the killed parent cannot remove the server's working directory (kuberank serve's
        # watchdog does): keep it under the test's own directory
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    server = 0
    try:
        pid, prefix = proc.stdout.readline().split()  # bounded by wait_ready's timeout
        server = int(pid)
        group = [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and _running(int(p)) and _pgid(int(p)) == server
        ]
        assert server in group and len(group) >= 3, group  # the server and its two stubs
        assert glob.glob(f"/dev/shm/{prefix}*")
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_running(p) for p in group) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not [p for p in group if _running(p)]
        assert not glob.glob(f"/dev/shm/{prefix}*")  # a clean shutdown, not a kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if server and _running(server) and _pgid(server) == server:
            os.killpg(server, signal.SIGKILL)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_request_past_its_budget_in_tritons_queue_is_shed_not_a_failure(server):
    """Triton's queue policy (REJECT after the budget, overridable per request) sheds what
    waited too long; the app answers that 503 (Overloaded) and keeps using Triton: no fallback,
    no 'Triton down'."""
    import asyncio

    from kuberank.serving.admission import Overloaded
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.settings import Settings

    config = (server.repository / "encoder" / "config.pbtxt").read_text()
    assert "timeout_action: REJECT" in config and "allow_timeout_override: true" in config
    # a 1 ms budget: 100 batches at once cannot all start within it
    encoding = QueryEncoding(server.grpc_url, Settings(latency_budget_ms=1.0))

    async def main():
        try:
            return await asyncio.gather(
                *(encoding.remote(["space opera"] * 8) for _ in range(100)),
                return_exceptions=True,
            )
        finally:
            await encoding.triton.close()

    results = asyncio.run(main())
    shed = [r for r in results if isinstance(r, Overloaded)]
    assert shed and all(r.reason == "expired" for r in shed)
    assert all(isinstance(r, Overloaded | np.ndarray) for r in results), results[:3]
    assert encoding.triton_down_until == 0.0  # not marked down: the next batch goes to Triton
    # the default budget (100 ms) lets the same single request through
    ok = QueryEncoding(server.grpc_url, Settings())

    async def one():
        try:
            return await ok.remote(["space opera"])
        finally:
            await ok.triton.close()

    assert asyncio.run(one()).shape == (1, 384)
