"""``kuberank serve``: the bundled tritonserver and Ray Serve start on 127.0.0.1, answer a
search through Triton, and both stop cleanly on SIGTERM (no server process left behind). Direct
ingress (the launcher's default): the Ingress replica's own port answers like Serve's proxy, and
overload there still gets fast 503s."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from test_index import serving_store

from kuberank.errors import KuberankError
from kuberank.serving.admission import DEFAULT_BUDGET_MS
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
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert not _alive(children), _alive(children)  # the watchdog too, told to stand down
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


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name (2nd field) is in parentheses and may hold spaces
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        found[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return found


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of ``pid``."""
    table = _processes()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, started, state) in table.items():
            if ppid == parent and child not in found and state != "Z":
                found[child] = started
                frontier.append(child)
    return found


def _alive(processes: dict[int, str]) -> dict[int, str]:
    """Those of ``processes`` (pid -> start time) still running: same pid and start time (not
    a reused pid), not a zombie waiting for a reaper."""
    table = _processes()
    return {
        pid: _cmdline(str(pid))
        for pid, started in processes.items()
        if pid in table and table[pid][1] == started and table[pid][2] != "Z"
    }


def test_killed_serve_leaves_no_tritonserver_haproxy_or_ray_behind(tmp_path_factory):
    """SIGKILL of ``kuberank serve`` (no clean stop): its tritonserver (own process group, so a
    kill of serve's group misses it) gets the kernel's parent-death signal and ends, its
    python-backend stubs with it; Ray's processes share the driver's fate the same way."""
    store, _, _ = serving_store(tmp_path_factory)
    env = {**os.environ, "KUBERANK_PROGRESS": "0", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kuberank.cli", "serve", "--model-store", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        text=True,
    )
    left: dict[int, str] = {}
    try:
        line = ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("{"):
                break
        ready = json.loads(line)
        assert ready["pid"] == proc.pid and ready["triton"]
        children = _descendants(proc.pid)
        triton = {p: t for p, t in children.items() if "tritonserver" in _cmdline(str(p))}
        stubs = {p: t for p, t in children.items() if "python_backend_stub" in _cmdline(str(p))}
        assert len(triton) == 1 and stubs, {p: _cmdline(str(p)) for p in children}
        triton_dir = Path(os.readlink(f"/proc/{next(iter(triton))}/cwd"))  # its temporary dir
        assert triton_dir.name.startswith("kuberank-triton-"), triton_dir
        assert any(_cmdline(str(p)).startswith("ray::") for p in children)  # Ray's workers
        front = {p: t for p, t in children.items() if "haproxy" in _cmdline(str(p))}
        assert len(front) == 1 and ready["ingress"] == "haproxy", ready  # the default front
        # haproxy -db -f DIR/haproxy.cfg: the front's temporary directory
        config = _cmdline(str(next(iter(front)))).split("\0")[-2]
        front_dir = Path(config).parent
        assert front_dir.name.startswith("kuberank-front-") and front_dir.is_dir(), config
        proc.kill()  # serve alone, not its process group
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        left = _alive(children)
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = _alive(children)
        assert not _alive(triton) and not _alive(stubs), _alive({**triton, **stubs})
        assert not left, left
        # removed by the watchdog once haproxy and tritonserver ended
        assert not front_dir.exists() and not triton_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in _alive(left):  # a failed test leaves nothing running either
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # not a process, or gone
        return ""


def test_the_haproxy_front_and_direct_ingress_answer_like_the_proxy_and_shed_by_default(
    tmp_path_factory,
):
    import ray
    from test_reliability import _load_with_statuses

    from kuberank.raycluster import ensure_ray
    from kuberank.serving.launcher import LocalServing
    from kuberank.serving.settings import Settings

    store, _, _ = serving_store(tmp_path_factory)
    # direct ingress is switched on when Ray starts: a cluster already running without it (here
    # the shared session of test_app, which restarts itself when needed) is refused, or restarted
    ensure_ray(num_cpus=2)
    with pytest.raises(KuberankError, match="restart_ray=True"):
        LocalServing(str(store), use_triton=False, ingress="direct").start()
    with LocalServing(str(store), use_triton=False, num_cpus=2, restart_ray=True) as running:
        # one Ingress replica per core, each on its own port with one core's share: one batch
        # worker with one ONNX Runtime thread; the default ingress puts the HAProxy front on
        # the one URL
        assert running.ingress == "haproxy" and running.endpoints == [running.url]
        # the front adapts each replica's cap (serving/front.py), from 1 to 2 batches a worker
        assert running.front.caps is not None
        batch = Settings().pipeline_batch[0]
        assert (running.front.caps.lo, running.front.caps.hi) == (1, 2 * batch)
        assert len(running.urls) == 2 and running.url not in (*running.urls, running.proxy_url)
        for url in running.urls:
            ready = http_json("GET", url + "/readyz")[1]
            assert (ready["batch_workers"], ready["onnx_threads"]) == (1, 1), ready
        # the replicas run at normal priority, not Ray's default worker niceness of 15
        replicas = [pid for pid in os.listdir("/proc") if _cmdline(pid).startswith("ray::Serve")]
        assert replicas and {os.getpriority(os.PRIO_PROCESS, int(p)) for p in replicas} == {0}
        body = {"query": "how to cook pasta", "k": 2}
        direct = [http_json("POST", url + "/search", body) for url in running.urls]
        proxied = http_json("POST", running.proxy_url + "/search", body)
        fronted = http_json("POST", running.url + "/search", body)
        assert direct[0][0] == direct[1][0] == proxied[0] == fronted[0] == 200
        assert direct[0][1]["items"][0]["id"] == "d2"
        assert direct[0][1]["items"] == direct[1][1]["items"] == proxied[1]["items"]
        assert fronted[1]["items"] == proxied[1]["items"]
        # the default settings (admission on, 100 ms budget; no limits set for the test): 128
        # clients on the one URL are many times the replicas' saturating load
        budget = DEFAULT_BUDGET_MS / 1000
        results = _load_with_statuses(
            running.url + "/search", lambda i: {"query": f"pasta {i % 5}", "k": 3}, 128, 3000
        )
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503}, sorted(set(statuses))
        shed = [t for s, t in results if s == 503]
        admitted = [t for s, t in results if s == 200]
        stats = (len(admitted), len(shed), np.median(admitted or [0]), np.median(shed or [0]))
        assert admitted and shed, stats
        assert np.median(shed) < 2 * budget and np.median(admitted) < 5 * budget, stats
        assert http_json("GET", running.url + "/readyz")[0] == 200
        url = running.url
    assert not ray.is_initialized() and "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ
    with pytest.raises(OSError):
        http_json("GET", url + "/healthz", timeout=2)


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (the root included) with its kind, mode and mtime, plus size and
    content hash for files and the target for links: any write under ``root`` changes it."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", st.st_mode, st.st_mtime_ns)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = ("file", st.st_mode, st.st_mtime_ns, st.st_size, digest)
    return found


def _read_only_copy(store: Path, dest: Path) -> Path:
    """A fresh copy of ``store`` (no leftovers of earlier runs) with every write bit cleared."""
    shutil.copytree(store, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(stat.S_IMODE(path.lstat().st_mode) & ~0o222)
    return dest


def _writable_again(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(stat.S_IMODE(path.lstat().st_mode) | 0o200)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "no-triton"])
def test_serve_leaves_a_read_only_store_untouched(tmp_path_factory, tmp_path, use_triton):
    """A store mounted read-only (a volume, or an S3 prefix the pod may only read): serving it
    writes nothing under it. As root the cleared write bits stop nothing, so the store's tree
    (paths, modes, mtimes, sizes, hashes) is compared before and after."""
    from kuberank.serving.launcher import LocalServing

    shared, _, _ = serving_store(tmp_path_factory)
    store = _read_only_copy(shared, tmp_path / "store")
    before = _tree(store)
    try:
        with LocalServing(
            str(store), use_triton=use_triton, num_cpus=2, ingress_replicas=1, restart_ray=True
        ) as running:
            assert (running.triton is not None) == use_triton
            status, body = http_json(
                "POST", running.url + "/search", {"query": "how to cook pasta", "k": 1}, timeout=30
            )
            assert status == 200 and body["items"][0]["id"] == "d2", body
        after = _tree(store)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, changed
    finally:
        _writable_again(store)


_GUARDED = """
import subprocess, sys, time
from kuberank.serving.watchdog import Watchdog
dog = Watchdog()
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
children = [subprocess.Popen(["sleep", "300"]), subprocess.Popen([sys.executable, "-c", stubborn])]
time.sleep(0.5)  # the stubborn child has set its handler
dog.guard_new()
dog.guard_dir(sys.argv[2])
watchdog = dog.process.pid
if sys.argv[1] == "release":
    dog.release()
print(watchdog, *(c.pid for c in children), flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("ending", ["killed", "release"])
def test_watchdog_ends_what_a_killed_launcher_started_and_nothing_after_a_clean_stop(
    ending, tmp_path
):
    """SIGKILL of the launcher: the processes it handed to its watchdog get SIGTERM, and
    SIGKILL after the grace period when they ignore it, and the directory it handed over is
    removed; released after a clean stop, the watchdog exits and ends or removes nothing."""
    from kuberank.serving.watchdog import GRACE_S

    workdir = tmp_path / "run dir"  # a space in the name, as a TMPDIR may have
    (workdir / "sub").mkdir(parents=True)
    (workdir / "sub" / "haproxy.cfg").write_text("x")
    proc = subprocess.Popen(
        [sys.executable, "-c", _GUARDED, ending, str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started: dict[int, str] = {}
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        table = _processes()
        started = {p: table[p][1] for p in pids if p in table}
        watchdog, children = pids[0], {p: started[p] for p in pids[1:]}
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + GRACE_S + 10
        while watchdog in _alive(started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watchdog not in _alive(started)
        if ending == "killed":
            assert not _alive(children), _alive(children)
            assert not workdir.exists()
        else:
            assert _alive(children).keys() == children.keys()
            assert (workdir / "sub" / "haproxy.cfg").read_text() == "x"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in _alive(started):
            os.kill(pid, signal.SIGKILL)


def test_an_s3_stores_triton_repository_is_downloaded_for_the_run_only(
    s3_endpoint, tmp_path, monkeypatch
):
    """Not into the shared cache (another run's download of the same store would replace it
    under a running server): into a directory of this run under $TMPDIR, removed at stop."""
    import tempfile

    from kuberank import storage
    from kuberank.serving.launcher import LocalServing

    local = tmp_path / "triton-local"
    (local / "tokenizer" / "1").mkdir(parents=True)
    (local / "tokenizer" / "config.pbtxt").write_text('name: "tokenizer"\n')
    storage.s3_client().create_bucket(Bucket="read-only")
    storage.publish(local, "s3://read-only/store/triton-local")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    running = LocalServing("s3://read-only/store", use_triton=True)
    repo = running._triton_repository()
    assert repo.is_relative_to(tmp_path / "tmp")
    assert (repo / "tokenizer" / "config.pbtxt").read_text() == 'name: "tokenizer"\n'
    running.stop()
    assert not list((tmp_path / "tmp").iterdir())
