"""images/ and ``make image``: the kuberank image and the Triton tokenizer layer are built here
with buildah (no Docker daemon, no registry: the base is made with debootstrap from apt's
mirror), written as archives, loaded with podman and run as the chart runs them: uid 1000, a
read-only root with only the chart's writable mounts, the model store mounted read-only.

On these machines podman runs with runc and explicit ulimits (crun and the default limits fail
with setrlimit EPERM). The builds are cached under build/, so a second
run only checks the inputs."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, require_binary
from test_chart import quantity
from test_index import serving_store

from benchmarks.containers import RUN as PODMAN_RUN
from benchmarks.containers import readable_copy
from kuberank.serving.launcher import http_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "images" / "build.sh"
TAG = yaml.safe_load((ROOT / "charts" / "kuberank" / "Chart.yaml").read_text())["appVersion"]
OUT = ROOT / "build" / "images"


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
        *PODMAN_RUN,
        "--rm",
        "--entrypoint",
        "/opt/triton/bin/pip",
        image,
        "list",
        "--format",
        "json",
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


def test_chart_images_are_the_ones_images_builds():
    """The chart runs what images/ builds: the kuberank image at the chart's appVersion, run as
    the uid/gid the Containerfile creates; Triton from images/triton/Containerfile (NVIDIA's
    stock image has no `tokenizers`), on the NVIDIA tag the chart names."""
    values = yaml.safe_load((ROOT / "charts" / "kuberank" / "values.yaml").read_text())
    kuberank_file = (ROOT / "images" / "kuberank" / "Containerfile").read_text()
    triton_file = (ROOT / "images" / "triton" / "Containerfile").read_text()
    assert values["serve"]["image"]["tag"] == TAG
    assert values["serve"]["image"]["repository"] == "kuberank/kuberank"
    security = values["serve"]["podSecurityContext"]
    assert f"--uid {security['runAsUser']} --gid {security['runAsGroup']}" in kuberank_file
    assert f"USER {security['runAsUser']}:{security['runAsGroup']}" in kuberank_file
    assert values["triton"]["image"]["repository"] == "kuberank/tritonserver"
    base = next(
        line.split("=", 1)[1] for line in triton_file.splitlines() if line.startswith("ARG BASE=")
    )
    assert base == f"nvcr.io/nvidia/tritonserver:{values['triton']['image']['tag']}"
    assert "requirements.txt" in triton_file
    reqs = (ROOT / "images" / "triton" / "requirements.txt").read_text()
    assert "tokenizers==" in reqs and "numpy==1." in reqs


# --- the RayService's pods, as KubeRay would run them, on two hosts of the test's own ---------

SUBNET = "10.213.7"  # a bridge and two network namespaces made by this test (no other host)
BUCKET = "kuberank-models"


class PodNetwork:
    """A bridge on this machine (SUBNET.1) and one network namespace per Ray pod (SUBNET.2,
    .3, ...), as pods on a cluster network: each its own IP and ports. A namespace's default
    route leads to a veth pair that goes nowhere, so Ray finds its node IP the way it does in a pod and no
    packet leaves the machine."""

    def __init__(self, names: list[str]):
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"krbr{tag}"
        self.hosts = {
            name: (f"kr{tag}{name[:1]}", f"{SUBNET}.{i + 2}") for i, name in enumerate(names)
        }

    @staticmethod
    def ip(*args: str, ns: str | None = None) -> None:
        cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"

    def __enter__(self) -> PodNetwork:
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        self.ip("link", "add", self.bridge, "type", "bridge")
        self.ip("addr", "add", f"{SUBNET}.1/24", "dev", self.bridge)
        self.ip("link", "set", self.bridge, "up")
        for ns, addr in self.hosts.values():
            self.ip("netns", "add", ns)
            self.ip("link", "add", f"{ns}h", "type", "veth", "peer", "name", f"{ns}n")
            self.ip("link", "set", f"{ns}n", "netns", ns)
            self.ip("link", "set", f"{ns}h", "master", self.bridge)
            self.ip("link", "set", f"{ns}h", "up")
            self.ip("link", "set", "lo", "up", ns=ns)
            self.ip("link", "set", f"{ns}n", "name", "eth0", ns=ns)
            self.ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            self.ip("link", "set", "eth0", "up", ns=ns)
            # a veth pair inside the namespace: what is routed to it ends at its peer
            self.ip("link", "add", "nowhere", "type", "veth", "peer", "name", "nowhere1", ns=ns)
            self.ip("link", "set", "nowhere", "up", ns=ns)
            self.ip("route", "add", "default", "dev", "nowhere", "src", addr, ns=ns)

    def __exit__(self, *exc) -> None:
        for ns, _ in self.hosts.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", f"{ns}h"], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

    def netns(self, name: str) -> str:
        return f"ns:/run/netns/{self.hosts[name][0]}"

    def addr(self, name: str) -> str:
        return self.hosts[name][1]


def kuberay_ray_start(params: dict, limits: dict, *, head: bool, head_address: str) -> str:
    """The Ray container's command line as KubeRay (v1.7.0, common/pod.go BuildPod and
    generateRayStartCommand) derives it from a group's rayStartParams and resource limits:
    `--block`, `--dashboard-agent-listen-port=52365`, `--metrics-export-port=8080` unless set,
    `--dashboard-host=0.0.0.0` on the head, `--address=<head>:6379` on workers, `--num-cpus`
    from the CPU limit (rounded up) and `--memory` from the memory limit in bytes unless set;
    flags sorted, "true" as a bare flag; behind `ulimit -n` in `/bin/bash -c --`. Workers
    reach the head by its IP here (KubeRay: the head Service's DNS name)."""
    flags = {str(k): str(v) for k, v in params.items()}
    flags.setdefault("metrics-export-port", "8080")
    flags.setdefault("block", "true")
    flags.setdefault("dashboard-agent-listen-port", "52365")
    if head:
        flags.setdefault("dashboard-host", "0.0.0.0")
    else:
        flags.setdefault("address", f"{head_address}:6379")
    if "num-cpus" not in flags and "cpu" in limits:
        flags["num-cpus"] = str(math.ceil(quantity(str(limits["cpu"]))))
    if "memory" not in flags and "memory" in limits:
        flags["memory"] = str(int(quantity(str(limits["memory"]))))
    rendered = [
        f"--{k}" if v == "true" else f"--{k}={v}" for k, v in sorted(flags.items()) if v != "false"
    ]
    start = " ".join(["ray", "start", *(["--head"] if head else []), *rendered])
    return f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"


def kuberay_env(
    container: dict, secrets: dict, *, cluster: str, head: bool, head_address: str
) -> dict:
    """The container's env as the kubelet resolves it, plus what KubeRay adds for a
    RayService (common/pod.go setContainerEnvVars)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    if not head:
        env["FQ_RAY_IP"] = env["RAY_IP"] = head_address
    env.update(
        {
            "RAY_CLUSTER_NAME": cluster,
            "RAY_CLOUD_INSTANCE_ID": f"{cluster}-{'head' if head else 'worker'}",
            "RAY_NODE_TYPE_NAME": "headgroup" if head else "cpu",
            "RAY_PORT": "6379",
            "RAY_timeout_ms_task_wait_for_death_info": "0",
            "RAY_gcs_server_request_timeout_seconds": "5",
            "RAY_SERVE_KV_TIMEOUT_S": "5",
            "RAY_ADDRESS": "127.0.0.1:6379" if head else f"{head_address}:6379",
            "RAY_USAGE_STATS_KUBERAY_IN_USE": "1",
        }
    )
    return env


def pod_run_args(template: dict, container: dict, env: dict, netns: str) -> list[str]:
    """`podman run` options for a container as the rendered pod template runs it: user and
    group, read-only root, the template's emptyDir mounts (memory-backed /dev/shm, /tmp)."""
    pod = template["spec"]
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    args = [*PODMAN_RUN[:3], "--network", netns, *PODMAN_RUN[5:]]
    args += ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if security.get("capabilities", {}).get("drop") == ["ALL"]:
        args += ["--cap-drop", "ALL"]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for mount in container.get("volumeMounts", []):
        empty = volumes[mount["name"]].get("emptyDir")
        assert empty is not None, f"volume {mount['name']} is not an emptyDir"
        size = empty.get("sizeLimit", "1Gi").replace("Gi", "g").replace("Mi", "m")
        if mount["mountPath"] == "/dev/shm":
            args += ["--shm-size", size]
        else:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    return args


def test_rayservice_head_and_worker_serve_the_app_across_nodes(
    archives, podman, tmp_path_factory, monkeypatch
):
    """The chart's RayService as KubeRay would run it, in the kuberank image: a Ray head and a
    worker (two network namespaces, so two Ray nodes), the serveConfigV2 deployed with Ray's
    own `serve deploy`, the model store on S3 (moto), /search answered through the head's serve
    port (HAProxy, the chart's default ingress) by a replica on the worker, the worker's
    readiness probe passing; then the
    RayJob's entrypoint submitted to that head trains on small data and writes its model."""
    import boto3

    from kuberank.deploy import chart as kubechart
    from kuberank.storage import publish

    image = podman.load(archives["kuberank"])
    store, _, _ = serving_store(tmp_path_factory)
    with PodNetwork(["head", "worker"]) as net:
        s3_port = free_port()
        s3_url = f"http://{SUBNET}.1:{s3_port}"
        log = tmp_path_factory.mktemp("moto") / "moto.log"
        with open(log, "wb") as out:
            moto = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", f"{SUBNET}.1", "-p", str(s3_port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        names = []
        try:
            creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(s3_url, timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline and moto.poll() is None, log.read_text()
                    time.sleep(0.2)
            for key, value in {**creds, "KUBERANK_S3_ENDPOINT_URL": s3_url}.items():
                monkeypatch.setenv(key, value)
            client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            publish(store, f"s3://{BUCKET}/prod")
            small_dataset = prepared_small_dataset(tmp_path_factory)

            values = {
                "modelStore": {
                    "uri": f"s3://{BUCKET}/prod",
                    "s3": {"endpoint": s3_url, "existingSecret": "kuberank-s3"},
                },
                "triton": {"enabled": False},
            }
            objs = kubechart.render(ROOT / "charts" / "kuberank", values)
            service = next(o for o in objs if o["kind"] == "RayService")
            cluster = service["spec"]["rayClusterConfig"]
            secrets = {"kuberank-s3": creds}
            head_ip = net.addr("head")
            pods = [("head", cluster["headGroupSpec"], True)]
            pods.append(("worker", cluster["workerGroupSpecs"][0], False))
            for role, group, is_head in pods:
                template = group["template"]
                container = template["spec"]["containers"][0]
                env = kuberay_env(
                    container,
                    secrets,
                    cluster=service["metadata"]["name"],
                    head=is_head,
                    head_address=head_ip,
                )
                command = kuberay_ray_start(
                    group["rayStartParams"],
                    container["resources"].get("limits", {}),
                    head=is_head,
                    head_address=head_ip,
                )
                name = f"kuberank-{role}-{s3_port}"
                if not is_head:  # KubeRay's wait-gcs-ready init container, bounded here
                    wait = (
                        f"for i in $(seq 1 60); do ray health-check --address {head_ip}:6379 "
                        "&& exit 0; sleep 2; done; exit 1"
                    )
                    podman(
                        *pod_run_args(template, container, env, net.netns(role)),
                        "--rm",
                        "--entrypoint",
                        "/bin/bash",
                        image,
                        "-c",
                        "--",
                        wait,
                        timeout=300,
                    )
                podman(
                    *pod_run_args(template, container, env, net.netns(role)),
                    "--detach",
                    "--name",
                    name,
                    "--entrypoint",
                    "/bin/bash",
                    image,
                    "-c",
                    "--",
                    command,
                )
                names.append(name)

            # KubeRay PUTs serveConfigV2 to the head's dashboard; Ray's own `serve deploy`
            # sends that request
            config = service["spec"]["serveConfigV2"]
            deploy = subprocess.run(
                [
                    "podman",
                    *podman.opts,
                    "exec",
                    "-i",
                    names[0],
                    "bash",
                    "-c",
                    "cat > /tmp/serve.yaml && serve deploy /tmp/serve.yaml",
                ],
                input=config,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert deploy.returncode == 0, deploy.stderr[-3000:]

            url = f"http://{head_ip}:8000"  # serve.port
            took = wait_http(url + "/readyz", names[0], podman, timeout=300)
            print(f"serve deploy to /readyz through the head's serve port: {took:.1f} s")
            status, body = http_json(
                "POST", url + "/search", {"query": "how to cook pasta", "k": 1}
            )
            assert status == 200 and body["items"][0]["id"] == "d2", body

            # the replicas run on the worker (the head has num-cpus 0): the request crossed nodes
            with urllib.request.urlopen(
                f"http://{head_ip}:8265/api/serve/applications/", timeout=10
            ) as resp:
                apps = json.load(resp)
            ingress = apps["applications"]["kuberank"]["deployments"]["Ingress"]
            nodes = {r["node_ip"] for r in ingress["replicas"]}
            assert nodes == {net.addr("worker")}, ingress["replicas"]
            proxies = {p["node_ip"] for p in apps["proxies"].values()}
            assert proxies == {head_ip, net.addr("worker")}  # proxy_location EveryNode

            # KubeRay's readiness probe of a RayService worker (wget to the raylet and to Serve)
            probe = (
                "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz "
                "| grep success && wget --tries 1 -T 10 -q -O- http://localhost:8000/-/healthz "
                "| grep success"
            )
            # the kubelet repeats it every periodSeconds (5 s in KubeRay's worker probe) and the
            # pod turns ready at the first pass: the worker's own proxy may start its routes a
            # little after the head's answered (CI saw one early miss)
            deadline = time.monotonic() + 90
            while True:
                done = podman("exec", names[1], "bash", "-c", probe, check=False)
                if done.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(5)
            assert done.returncode == 0, done.stdout + done.stderr

            # The RayJob's entrypoint (manifests/base) against that head, submitted from a
            # submitter container as KubeRay's K8sJobMode submitter does, on small data
            run_rayjob_entrypoint(image, podman, head_ip, small_dataset, names[1])
        finally:
            for name in reversed(names):
                podman("stop", "--time", "20", name, check=False, timeout=120)
                logs = podman("logs", name, check=False)
                print(f"--- {name}\n{(logs.stdout + logs.stderr)[-1500:]}")
                podman("rm", "--force", name, check=False)
            moto.terminate()
            moto.wait(timeout=10)


def test_kfp_component_runs_in_the_image_as_the_launcher_would(archives, podman, tmp_path):
    """One task of the compiled pipeline (data prep) run in the image with its IR command and
    args, `{{$}}` replaced by an executor input as the KFP v2 launcher writes it (a minio://
    output artifact, which the SDK maps to /minio/...; the launcher uploads it afterwards):
    the output artifact is written, as uid 1000 on a read-only root."""
    from fixtures import interaction_rows, write_jsonl

    image = podman.load(archives["kuberank"])
    ir_path = tmp_path / "pipeline.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "kuberank.cli", "pipeline", "compile", "--out", str(ir_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ir = next(yaml.safe_load_all(ir_path.read_text()))
    task = ir["root"]["dag"]["tasks"]["data-prep-op"]
    executor = ir["deploymentSpec"]["executors"][
        ir["components"][task["componentRef"]["name"]]["executorLabel"]
    ]["container"]
    podman("tag", image, executor["image"])  # the image name the IR names

    data = tmp_path / "data"
    write_jsonl(data / "log.jsonl", interaction_rows(users=6, per_user=6))
    outputs = tmp_path / "minio"
    kfp_outputs = tmp_path / "kfp_outputs"
    for path in (data, outputs, kfp_outputs):
        path.mkdir(exist_ok=True)
        path.chmod(0o777)
    (data / "log.jsonl").chmod(0o644)
    uri = "minio://mlpipeline/v2/artifacts/kuberank/run-1/data-prep-op/prepared"
    executor_input = {
        "inputs": {"parameterValues": {"dataset_spec": "interactions:/data/log.jsonl"}},
        "outputs": {
            "artifacts": {
                "prepared": {
                    "artifacts": [
                        {
                            "type": {"schemaTitle": "system.Dataset", "schemaVersion": "0.0.1"},
                            "uri": uri,
                            "metadata": {},
                        }
                    ]
                }
            },
            "outputFile": "/tmp/kfp_outputs/output_metadata.json",
        },
    }
    args = [a.replace("{{$}}", json.dumps(executor_input)) for a in executor["args"]]
    done = podman(
        *PODMAN_RUN,
        "--rm",
        "--user",
        "1000:100",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,size=1g,mode=1777",
        "--volume",
        f"{data}:/data:ro",
        "--volume",
        f"{outputs}:/minio",
        "--volume",
        f"{kfp_outputs}:/tmp/kfp_outputs",
        executor["image"],
        *executor["command"],
        *args,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    prepared = outputs / "mlpipeline/v2/artifacts/kuberank/run-1/data-prep-op/prepared"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["kind"] == "recommendation", manifest
    metadata = json.loads((kfp_outputs / "output_metadata.json").read_text())
    assert "prepared" in metadata.get("artifacts", {}), metadata


def prepared_small_dataset(tmp_path_factory) -> str:
    """A small interaction log prepared by `kuberank data prep` and published to the test's
    S3 (KUBERANK_S3_ENDPOINT_URL is set by the caller)."""
    from fixtures import interaction_rows, write_jsonl

    from kuberank.storage import publish

    root = tmp_path_factory.mktemp("rayjob-data")
    log = write_jsonl(root / "log.jsonl", interaction_rows(users=8, per_user=6))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kuberank.cli",
            "data",
            "prep",
            "--dataset",
            f"interactions:{log}",
            "--out",
            str(root / "prepared"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    uri = f"s3://{BUCKET}/data/small"
    publish(root / "prepared", uri)
    return f"prepared:{uri}"


def run_rayjob_entrypoint(
    image: str, podman: Podman, head_ip: str, dataset: str, worker: str
) -> None:
    job = yaml.safe_load((ROOT / "manifests" / "base" / "rayjob-finetune.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    flags = dict(zip(argv[4::2], argv[5::2], strict=True))
    out = f"s3://{BUCKET}/runs/rayjob-test"
    entrypoint = shlex.join(
        [
            *argv[:4],
            "--dataset",
            dataset,
            "--out",
            out,
            "--workers",
            flags["--workers"],
            "--epochs",
            "1",
        ]
    )
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    address = f"http://{head_ip}:8265"
    job_id = "kuberank-finetune-test"
    # KubeRay's submitter: submit unless already submitted, then follow the logs
    script = (
        f"if ! ray job status --address {address} {job_id} >/dev/null 2>&1; then "
        f"ray job submit --address {address} --no-wait --submission-id {job_id} -- {entrypoint}; "
        f"fi; ray job logs --address {address} --follow {job_id}; "
        f"ray job status --address {address} {job_id}"
    )
    env = {e["name"]: e["value"] for e in submitter.get("env", [])}
    args = [
        *PODMAN_RUN,
        "--rm",
        "--user",
        "1000:100",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,size=1g,mode=1777",
    ]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    started = time.monotonic()
    done = podman(
        *args, "--entrypoint", "/bin/bash", image, "-c", "--", script, check=False, timeout=900
    )
    print(f"RayJob entrypoint on the cluster: {time.monotonic() - started:.0f} s")
    said = done.stdout + done.stderr  # Ray's CLI logs to stderr
    if done.returncode != 0 or f"Job '{job_id}' succeeded" not in said:
        errors = podman(
            "exec",
            worker,
            "bash",
            "-c",
            "grep -l -i error /tmp/ray/session_latest/logs/*.err | xargs -r tail -n 40",
            check=False,
        )
        pytest.fail(
            f"RayJob: {(done.stdout + done.stderr)[-6000:]}\n--- worker logs\n"
            f"{errors.stdout[-8000:]}"
        )
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ.get("KUBERANK_S3_ENDPOINT_URL"))
    keys = {
        o["Key"]
        for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/rayjob-test/")["Contents"]
    }
    assert "runs/rayjob-test/kuberank.json" in keys, sorted(keys)


def test_make_image_with_an_unreachable_index_fails_and_writes_no_archive(archives, tmp_path):
    """pip inside the build cannot reach its index: the build fails with pip's own message and
    no archive is written (the base is already made, so this reaches pip at once)."""
    out = tmp_path / "out"
    done = make_image(
        "triton-local",
        env={
            "PIP_CONFIG_FILE": os.devnull,  # only what is set here: no index of this machine
            "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
            "PIP_FIND_LINKS": "",
            "PIP_RETRIES": "0",
            "KUBERANK_IMAGE_OUT": str(out),
        },
        timeout=900,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "triton-local: build failed" in done.stderr
    assert "nvidia-pytriton" in done.stderr  # pip's own words about what it could not get
    assert not out.exists() or not any(out.iterdir())
