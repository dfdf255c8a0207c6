"""images/ and ``make image``: the kuberank image and the Triton tokenizer layer are built here
with buildah (no Docker daemon, no registry: the base is made with debootstrap from apt's
mirror), written as archives, loaded with podman and run as the chart runs them: uid 1000, a
read-only root with only the chart's writable mounts, the model store mounted read-only.

On these machines podman runs with runc, host networking and explicit ulimits (crun and the
default limits fail with setrlimit EPERM). The builds are cached under build/, so a second
run only checks the inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, require_binary
from test_index import serving_store

from kuberank.serving.launcher import http_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "images" / "build.sh"
TAG = yaml.safe_load((ROOT / "charts" / "kuberank" / "Chart.yaml").read_text())["appVersion"]
OUT = ROOT / "build" / "images"
PODMAN_RUN = [
    "run",
    "--runtime",
    "runc",
    "--network",
    "host",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
]


def _tools() -> None:
    for name in ("buildah", "podman", "runc", "debootstrap"):
        require_binary(name, "Debian: apt-get install buildah podman runc debootstrap")


def make_image(images: str, env: dict | None = None, timeout: float = 2400):
    return subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "IMAGES": images, "PYTHON": sys.executable, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def archives():
    """Both images built by images/build.sh (what `make image` runs), as archives."""
    _tools()
    started = time.monotonic()
    done = make_image("kuberank triton-local")
    assert done.returncode == 0, done.stderr[-4000:]
    paths = {name: OUT / f"{name}-{TAG}.tar" for name in ("kuberank", "triton-local")}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    print(f"make image: {time.monotonic() - started:.0f} s\n{done.stderr[-800:]}")
    return paths


class Podman:
    """podman on a storage of the test's own (vfs), so a load really reads the archive."""

    def __init__(self, root: Path):
        self.opts = [
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "run"),
            "--storage-driver",
            "vfs",
        ]

    def __call__(self, *args, check=True, timeout=900) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["podman", *self.opts, *args], capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-3000:]}"
        return done

    def load(self, archive: Path) -> str:
        out = self("load", "-i", str(archive)).stdout
        return out.strip().splitlines()[-1].split("Loaded image:")[-1].strip()


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    _tools()
    p = Podman(tmp_path_factory.mktemp("podman"))
    yield p
    p("rm", "--all", "--force", check=False)


def readable_copy(store: Path, dest: Path) -> Path:
    """The store as another user (uid 1000) can read it: pytest's tmp dirs are 0700."""
    shutil.copytree(store, dest, symlinks=True)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def wait_http(url: str, container: str, podman: Podman, timeout: float = 240) -> float:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Running}}", container, check=False)
        if state.stdout.strip() != "true" or time.monotonic() - started > timeout:
            logs = podman("logs", container, check=False)
            pytest.fail(f"{url} not ready: {(logs.stdout + logs.stderr)[-4000:]}")
        time.sleep(1)


def test_build_is_cached_and_prints_sizes(archives):
    started = time.monotonic()
    again = make_image("kuberank triton-local")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "kuberank: up to date" in again.stderr and "triton-local: up to date" in again.stderr
    assert " MB" in again.stderr
    print(f"warm make image: {time.monotonic() - started:.1f} s")


def test_kuberank_image_serves_a_read_only_store_as_uid_1000(archives, podman, tmp_path_factory):
    """The acceptance run: uid 1000, --read-only with a tmpfs /tmp, the store read-only at
    /store, `kuberank serve --no-triton` answers /readyz and /search."""
    image = podman.load(archives["kuberank"])
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    assert info["Config"]["User"] == "1000:100"
    store, _, _ = serving_store(tmp_path_factory)
    store = readable_copy(store, tmp_path_factory.mktemp("ro") / "store")
    port = free_port()
    name = f"kuberank-serve-{port}"
    podman(
        *PODMAN_RUN,
        "--detach",
        "--name",
        name,
        "--user",
        "1000:100",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,size=2g,mode=1777",
        "--shm-size",
        "1g",
        "--volume",
        f"{store}:/store:ro",
        image,
        "kuberank",
        "serve",
        "--model-store",
        "/store",
        "--no-triton",
        "--port",
        str(port),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        took = wait_http(url + "/readyz", name, podman)
        print(f"container start to /readyz: {took:.1f} s")
        status, body = http_json("POST", url + "/search", {"query": "how to cook pasta", "k": 1})
        assert status == 200, body
        assert body["items"][0]["id"] == "d2"
        # the root filesystem really is read-only for the process
        probe = podman("exec", name, "sh", "-c", "touch /opt/x", check=False)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr
    finally:
        podman("stop", "--time", "20", name, check=False, timeout=120)
        podman("rm", "--force", name, check=False)


def test_triton_extra_layer_loads_the_tokenizer_model(archives, podman, tmp_path_factory):
    """images/triton/requirements.txt is what the tokenizer model needs: the bundled
    tritonserver, with exactly those packages on its stub's path, loads it and tokenizes."""
    image = podman.load(archives["triton-local"])
    listed = podman(
        "run",
        "--runtime",
        "runc",
        "--rm",
        "--entrypoint",
        "/opt/triton/bin/pip",
        image,
        "list",
        "--format",
        "json",
        check=True,
    ).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    # requirements.txt and their own dependencies; the server wheel without its Python deps
    assert {"nvidia-pytriton", "numpy", "tokenizers"} <= names
    assert not names & {"tritonclient", "grpcio", "onnxruntime", "torch", "transformers"}
    store, _, _ = serving_store(tmp_path_factory)
    store = readable_copy(store, tmp_path_factory.mktemp("tok") / "store")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    name = f"kuberank-triton-{http_port}"
    podman(
        *PODMAN_RUN,
        "--detach",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp:rw,size=1g,mode=1777",
        "--shm-size",
        "1g",
        "--volume",
        f"{store}/triton:/models:ro",
        image,
        "--model-repository=/models",
        "--model-control-mode=explicit",
        "--load-model=tokenizer",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_http(url + "/v2/models/tokenizer/ready", name, podman, timeout=120)
        request = {
            "inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["pasta"]}]
        }
        status, body = http_json("POST", url + "/v2/models/tokenizer/infer", request)
        assert status == 200, body
        outputs = {o["name"]: o for o in body["outputs"]}
        assert {"input_ids", "attention_mask"} <= set(outputs)
        assert outputs["input_ids"]["data"][0] == 101  # [CLS] of the MiniLM vocabulary
    finally:
        podman("stop", "--time", "10", name, check=False, timeout=60)
        podman("rm", "--force", name, check=False)


def test_make_image_without_a_builder_names_the_package(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "dirname", "cat", "mktemp", "rm"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    done = subprocess.run(
        ["bash", str(BUILD)],
        env={"PATH": str(bin_dir), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "apt-get install buildah" in done.stderr


def test_make_image_with_a_missing_ca_bundle_fails_and_writes_no_archive(tmp_path):
    _tools()
    out = tmp_path / "out"
    done = make_image(
        "kuberank",
        env={"KUBERANK_CA_BUNDLE": str(tmp_path / "nope.pem"), "KUBERANK_IMAGE_OUT": str(out)},
        timeout=120,
    )
    assert done.returncode == 2
    assert "nope.pem: no such readable file" in done.stderr
    assert not out.exists() or not any(out.iterdir())
