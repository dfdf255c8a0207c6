"""``make bench`` section ``images``: the container images as a user meets them.

Image sizes; `make image` cold (when no archive exists) and warm; container start to
``/readyz``; ``/search`` throughput from the kuberank image against the same app outside it
(ratio, same run, same store, same load); and Ray Serve's ingress paths run in the container side
by side: Serve's proxy (the chart's ``serve.ingressMode: proxy``), Ray 2.60's HAProxy
(``haproxy``) and direct ingress (the local launcher's default). Containers run as the chart
runs them: uid 1000, read-only root, tmpfs ``/tmp``, the store read-only at ``/store``; with
podman's ``--runtime runc``, host network and explicit ulimits as these machines need
(16384 open files: HAProxy needs more than 10276; 16384 processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORAGE = ROOT / "build" / "containers"
PODMAN = [
    "podman",
    "--root",
    str(STORAGE / "storage"),
    "--runroot",
    str(STORAGE / "run"),
    "--storage-driver",
    "vfs",
]
# `podman run` as these machines need it (docs/operations.md, "Build the images"); the tests
# (tests/test_images.py) run the containers with the same options
RUN = [
    "run",
    "--runtime",
    "runc",
    "--network",
    "host",
    "--ulimit",
    # HAProxy (Ray 2.60's) refuses to start below 10276 open files; KubeRay's command raises
    # the limit to 65536 and container runtimes on Kubernetes nodes allow that
    "nofile=16384:16384",
    "--ulimit",
    # processes and threads of uid 1000 on the whole machine: a Ray head, a worker and a
    # training job together passed 1024 ("can't start new thread")
    "nproc=16384:16384",
]
# ingress path -> (`kuberank serve --ingress`, extra environment)
INGRESS = {
    "proxy": ("proxy", {}),
    "haproxy": ("proxy", {"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
    "direct": ("direct", {}),
}


def _tag() -> str:
    import yaml

    return yaml.safe_load((ROOT / "charts" / "kuberank" / "Chart.yaml").read_text())["appVersion"]


def make_image() -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(ROOT / "images" / "build.sh")],
        env={**os.environ, "IMAGES": "kuberank triton-local", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"make image failed: {done.stderr[-2000:]}")
    return time.monotonic() - started, done.stderr


def _free_port() -> int:
    from kuberank.serving.triton import free_port

    return free_port()


def _wait_ready(url: str, name: str, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        state = subprocess.run(
            [*PODMAN, "inspect", "--format", "{{.State.Running}}", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if state.stdout.strip() != "true":
            break
        time.sleep(0.5)
    logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, timeout=60)
    raise RuntimeError(f"{name}: {url} not ready: {(logs.stdout + logs.stderr)[-3000:]}")


def serve_in_container(
    image: str, store: Path, ingress: str, port: int
) -> tuple[str, float, float]:
    """Start `kuberank serve --no-triton` in the image: (container name, seconds to create
    the container (on vfs storage a copy of the whole image), seconds from its start to
    /readyz)."""
    flag, env = INGRESS[ingress]
    name = f"kuberank-bench-{ingress}-{port}"
    args = [*PODMAN, *RUN, "--detach", "--name", name, "--user", "1000:100", "--read-only"]
    args += ["--tmpfs", "/tmp:rw,size=2g,mode=1777", "--shm-size", "2g"]
    args += ["--volume", f"{store}:/store:ro"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    started = time.monotonic()
    subprocess.run(
        [
            *args,
            image,
            "kuberank",
            "serve",
            "--model-store",
            "/store",
            "--no-triton",
            "--port",
            str(port),
            "--ingress",
            flag,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    created = time.monotonic() - started
    return name, created, _wait_ready(f"http://127.0.0.1:{port}/readyz", name)


def stop(name: str) -> None:
    subprocess.run([*PODMAN, "stop", "--time", "20", name], capture_output=True, timeout=120)
    subprocess.run([*PODMAN, "rm", "--force", name], capture_output=True, timeout=120)


def load(urls: list[str], make_body, concurrency: int, requests: int) -> dict:
    from kuberank.serving.bench_load import Level, sweep

    level = Level("closed", float(concurrency), requests, 20.0)
    return sweep("x", urls, make_body, [level], warmup=40)[0]


def readable_copy(store: Path, dest: Path) -> Path:
    """A copy of ``store`` that another user (uid 1000 in the container) can read."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(store, dest, symlinks=True)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def container_urls(name: str, port: int) -> list[str]:
    """Direct ingress: every Ingress replica's port, from the JSON line `kuberank serve`
    prints when ready; otherwise the one port."""
    logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True, timeout=60)
    for line in (logs.stdout + logs.stderr).splitlines():
        if line.startswith("{") and '"urls"' in line:
            return json.loads(line)["urls"]
    return [f"http://127.0.0.1:{port}"]


def _row(where: str, ingress: str, create_s: float, ready_s: float, result, floor) -> dict:
    row = {
        "where": where,
        "ingress": ingress,
        "create_s": round(create_s, 1),
        "start_to_readyz_s": round(ready_s, 1),
        **{key: result[key] for key in ("qps", "p50_ms", "p99_ms", "error_rate")},
        "healthz_qps": floor["qps"],
    }
    print(row, flush=True)
    return row


def run(out: Path, store: Path, concurrency: int = 32, requests: int = 3000) -> dict:
    from kuberank.serving.bench_load import bench_queries, request_factory
    from kuberank.serving.launcher import LocalServing
    from kuberank.serving.loading import load_checked_index

    tag = _tag()
    archive = ROOT / "build" / "images" / f"kuberank-{tag}.tar"
    cold = not archive.exists()
    first, log = make_image()
    warm, _ = make_image()
    sizes = {}
    for name in ("kuberank", "triton-local"):
        path = ROOT / "build" / "images" / f"{name}-{tag}.tar"
        ref = (
            f"localhost/kuberank:{tag}"
            if name == "kuberank"
            else f"localhost/kuberank-{name}:{tag}"
        )
        inspect = subprocess.run(
            [*PODMAN, "image", "inspect", "--format", "{{.Size}}", ref],
            capture_output=True,
            text=True,
            timeout=60,
        )
        sizes[name] = {
            "archive_mb": round(path.stat().st_size / 2**20),
            "image_mb": round(int(inspect.stdout.strip() or 0) / 2**20),
        }
    image = f"localhost/kuberank:{tag}"
    ro_store = readable_copy(store, (out / "store-ro").resolve())
    _, index = load_checked_index(str(ro_store))
    route, make_body = request_factory(
        index.meta.get("kind", "search"), index.ids, bench_queries(200)
    )
    rows = []
    for ingress in INGRESS:
        port = _free_port()
        name, create_s, ready_s = serve_in_container(image, ro_store, ingress, port)
        try:
            urls = container_urls(name, port)
            result = load([u + route for u in urls], make_body, concurrency, requests)
            floor = load([u + "/healthz" for u in urls], None, concurrency, requests)
        finally:
            stop(name)
        rows.append(_row("container", ingress, create_s, ready_s, result, floor))
    for ingress in ("proxy", "direct"):  # the same app outside the container
        started = time.monotonic()
        with LocalServing(str(ro_store), use_triton=False, ingress=ingress, restart_ray=True) as s:
            ready_s = time.monotonic() - started
            urls = s.endpoints
            result = load([u + route for u in urls], make_body, concurrency, requests)
            floor = load([u + "/healthz" for u in urls], None, concurrency, requests)
        rows.append(_row("host", ingress, 0.0, ready_s, result, floor))
    by = {(r["where"], r["ingress"]): r for r in rows}
    ratios = {
        f"container/host {ing}": round(by[("container", ing)]["qps"] / by[("host", ing)]["qps"], 2)
        for ing in ("proxy", "direct")
        if by[("host", ing)]["qps"]
    }
    proxy_qps = by[("container", "proxy")]["qps"] or 1
    ratios.update(
        {
            f"{ing}/proxy in container": round(by[("container", ing)]["qps"] / proxy_qps, 2)
            for ing in ("haproxy", "direct")
        }
    )
    return {
        "build_s": {"first": round(first, 1), "first_was_cold": cold, "warm": round(warm, 1)},
        "sizes": sizes,
        "rows": rows,
        "ratios": ratios,
        "load": {"concurrency": concurrency, "requests": requests, "route": route},
        "build_log_tail": log[-400:],
    }


def markdown(result: dict) -> str:
    b, lines = result["build_s"], []
    lines.append(
        f"`make image`: {b['first']} s ({'cold' if b['first_was_cold'] else 'archives present'}),"
        f" then {b['warm']} s with nothing changed"
    )
    lines.append("")
    lines.append("| image | archive MB | image MB |")
    lines.append("|---|---|---|")
    for name, s in result["sizes"].items():
        lines.append(f"| {name} | {s['archive_mb']} | {s['image_mb']} |")
    lines.append("")
    cols = (
        "where",
        "ingress",
        "start_to_readyz_s",
        "qps",
        "p50_ms",
        "p99_ms",
        "error_rate",
        "healthz_qps",
    )
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in result["rows"]:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    lines.append("")
    load = result["load"]
    lines.append(
        f"closed loop, {load['concurrency']} clients, {load['requests']} requests on "
        f"{load['route']} (and on /healthz for the HTTP floor); ratios: "
        + ", ".join(f"{k} {v}" for k, v in result["ratios"].items())
    )
    return "\n".join(lines)
