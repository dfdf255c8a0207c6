"""Local launcher: the bundled tritonserver on the store's local repository plus Ray Serve with the
ranking app, everything on 127.0.0.1, shut down cleanly.

    with LocalServing(store, use_triton=True) as running:    # kuberank serve
        httpx/urllib -> running.url + "/search"

:func:`serve_forever` is ``kuberank serve``: it blocks until Ctrl-C or SIGTERM and then stops
Serve, Ray and Triton (bounded waits). A serve that is killed instead (SIGKILL, OOM kill) leaves
nothing running either: tritonserver gets the kernel's parent-death signal, and a watchdog
process (serving/watchdog.py) ends what Ray and Triton started.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from kuberank.errors import KuberankError
from kuberank.storage import is_s3, materialize
from kuberank.store import TRITON_LOCAL_DIR, store_path

HOST = "127.0.0.1"
APP_NAME = "kuberank"


def http_json(
    method: str,
    url: str,
    body: dict | None = None,
    timeout: float = 10.0,
    raw: bytes | None = None,
    headers: dict | None = None,
) -> tuple[int, dict | str]:
    """One loopback request; (status, parsed JSON or text). Never raises on HTTP errors; a peer
    that does not answer in HTTP/1 (a gRPC port, say) raises ConnectionError, like one that
    refuses."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    except http.client.HTTPException as exc:  # BadStatusLine and kin are not OSErrors
        raise ConnectionError(f"{url}: not an HTTP/1 answer ({exc!r})") from exc
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


# Ray Serve's process-wide switches for a local cluster, read by the proxy and the replicas when
# they start (so set before the cluster starts; an existing cluster keeps its own): user code and
# the router on the replica's main event loop (no cross-thread hop per request), buffered
# request-path logs, the garbage collector frozen after start-up, replicas at normal priority.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    # Ray starts its workers (the replicas) at niceness 15 under its own daemons at 0, so every
    # burst of the raylet, GCS or dashboard agent stalls the replicas outright: on 2 cores,
    # fixed-rate p99 at 1600 req/s went from 114 ms to 38-45 ms at 0 (docs/serving.md)
    "RAY_worker_niceness": "0",
}


INGRESS_MODES = ("haproxy", "direct", "proxy")
# haproxy: the direct-ingress replicas behind one local HAProxy (serving/front.py), which bounds
# what reaches each replica and sheds the excess in C (docs/serving.md, "Admission")
DEFAULT_INGRESS = "haproxy"
# Direct ingress: each Ingress replica runs its own HTTP server on a port of a range of at least
# this many ports (Ray Serve's RAY_SERVE_ENABLE_DIRECT_INGRESS, host 127.0.0.1), so a request
# costs one process hop instead of two (proxy actor -> replica). Measured on 2 cores: GET
# /healthz 2150 req/s direct vs 446 through the proxy (docs/serving.md).
DIRECT_PORT_SPAN = 8


@contextmanager
def cluster_env(direct_port: int | None = None, span: int = DIRECT_PORT_SPAN):
    """``os.environ`` for a local Ray cluster about to start (its processes keep the environment
    they start with): the :data:`SERVE_ENV` defaults unless already set and, with
    ``direct_port``, the direct-ingress switches for it; restored afterwards, so a later cluster
    of this process starts plain. Yields the values applied."""
    values = {key: os.environ.get(key, value) for key, value in SERVE_ENV.items()}
    if direct_port is not None:
        values.update(direct_ingress_env(direct_port, span))
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def direct_ingress_env(port: int, span: int = DIRECT_PORT_SPAN) -> dict:
    """The switches that make Ray Serve's ingress replicas listen on ports of their own (each
    the lowest free port of ``[port, port + span)``)."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + span - 1),
        # time for an external load balancer to take a stopping replica out of rotation
        # (default 30 s, which every local stop would wait out); nothing balances locally
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


class LocalServing:
    """Triton (optional) + a local Ray cluster + Serve with the app, on 127.0.0.1.

    ``ingress``: ``"haproxy"`` (default): the direct-ingress replicas behind one local HAProxy
    on ``url`` (serving/front.py: it bounds the requests each replica holds and sheds the excess
    with a fast 503). ``"direct"`` serves HTTP from each Ingress replica itself, on a port of
    its own (``urls``; ``url`` is the first); Serve's proxy still runs, on ``proxy_url``.
    ``"proxy"``: every request goes through Serve's proxy actor on ``url``, which routes to
    several (autoscaled) Ingress replicas and retries around a dead one, at a lower ceiling.
    Direct ingress is a property of the Ray cluster, so it needs the cluster this object
    starts (or one started with :func:`direct_ingress_env` for this port exported). When Ray
    already runs in this process without it, ``restart_ray=True`` stops that cluster and starts
    one of its own (``kuberank bench`` does, after the demo's training); the default refuses."""

    def __init__(
        self,
        store: str,
        *,
        port: int | None = None,
        use_triton: bool = True,
        settings: dict | None = None,
        num_cpus: int | None = None,
        ready_timeout: float = 180.0,
        ingress: str = DEFAULT_INGRESS,
        restart_ray: bool = False,
        ingress_replicas: int = 0,
        adaptive_caps: bool = True,
    ):
        # local: the CLI's parser imports this module (see tests/test_layers.py)
        from kuberank.serving.triton import free_port

        if ingress not in INGRESS_MODES:
            raise KuberankError(f"ingress: {ingress!r} is not one of {INGRESS_MODES}")
        if ingress_replicas < 0 or (ingress == "proxy" and ingress_replicas):
            raise KuberankError(
                "ingress_replicas: a count >= 0 (0 = one per core), for ingress='haproxy' or "
                "'direct' only"
            )
        self.ingress = ingress
        # haproxy: each replica's cap adapts to its rate (serving/front.py); False keeps the
        # fixed cap of two batches a worker (the overload benchmark's comparison)
        self.adaptive_caps = adaptive_caps
        self.restart_ray = restart_ray
        self.urls: list[str] = []  # direct replicas: every Ingress replica's own URL
        self.store = str(store)
        self.num_cpus = num_cpus
        self.ingress_replicas = ingress_replicas or self._cores()
        # ports for every replica, and for their replacements during a rolling restart
        self._span = max(DIRECT_PORT_SPAN, 4 * self.ingress_replicas)
        self.front = None  # haproxy: the HAProxyFront on front_port
        self.front_port = (port or free_port()) if ingress == "haproxy" else None
        if self.front_port is None:
            self.port = port or free_port()
        else:  # the replicas' range starts elsewhere, clear of the front's port
            self.port = free_port()
            while self.port <= self.front_port < self.port + self._span:
                self.port = free_port()
        # direct ingress: the replica takes the lowest free port of [port, port + span), so
        # ``port`` becomes the one it took; every readiness scan starts from the first one
        self._first_port = self.port
        self.ready: dict = {}  # the last /readyz answer
        self.proxy_port = self.port if ingress == "proxy" else free_port()
        self.use_triton = use_triton
        self.settings = dict(settings or {})
        self.ready_timeout = ready_timeout
        self.triton = None
        self._workdir: str | None = None  # what this run downloaded (an S3 store's triton-local)
        self._ray_started = False
        self._watchdog = None
        self.revision = int(self.settings.pop("revision", 0))

    def _cores(self) -> int:
        """The CPUs of the Ray cluster this object starts."""
        from kuberank.serving.settings import usable_cores

        return self.num_cpus or usable_cores()

    @property
    def url(self) -> str:
        """Where clients send requests: the front (haproxy), else the first replica or the
        proxy."""
        if self.front_port is not None:
            return f"http://{HOST}:{self.front_port}"
        return f"http://{HOST}:{self.port}"

    @property
    def endpoints(self) -> list[str]:
        """Where a client (or a Kubernetes Service) spreads requests: the front or the proxy
        (one URL), or with direct ingress every replica's own URL."""
        return list(self.urls) if self.ingress == "direct" else [self.url]

    @property
    def direct_replicas(self) -> bool:
        """The Ingress replicas serve HTTP themselves (direct ingress), fronted or not."""
        return self.ingress in ("haproxy", "direct")

    @property
    def proxy_url(self) -> str:
        """Serve's HTTP proxy (the same app, one more hop; ``url`` in proxy mode)."""
        return f"http://{HOST}:{self.proxy_port}"

    def app_args(self) -> dict:
        from kuberank.serving.settings import INGRESS

        args = {
            "model_store": self.store,
            "triton_url": self.triton.grpc_url if self.triton else "",
            "revision": self.revision,
            **self.settings,
        }
        if self.direct_replicas:
            # a fixed number of Ingress replicas, each on its own port and sized to its share of
            # the cores: one process per core by default, so each has a GIL of its own for its
            # event loop and its batch worker (docs/serving.md). Traffic is spread over ``urls``
            # by the client, as a Kubernetes Service or HAProxy spreads it over pods. The share
            # is a setting, not a Ray CPU reservation, so a restart can surge new replicas.
            deployments = dict(args.get("deployments") or {})
            deployments[INGRESS] = {
                **deployments.get(INGRESS, {}),
                "num_replicas": self.ingress_replicas,
            }
            args["deployments"] = deployments
            if args.get("colocate", True):
                share = max(1, self._cores() // self.ingress_replicas)
                args.setdefault("pipeline_workers", share)
                args.setdefault("onnx_threads", max(1, share // args["pipeline_workers"]))
        return args

    def _start_ray(self) -> None:
        import ray

        from kuberank.raycluster import ensure_ray

        direct = self.direct_replicas
        if ray.is_initialized():
            wanted = direct_ingress_env(self._first_port, self._span) if direct else {}
            if all(os.environ.get(k) == v for k, v in wanted.items()):
                return  # proxy mode, or a cluster started with these switches exported
            if not self.restart_ray or os.environ.get("RAY_ADDRESS"):
                raise KuberankError(
                    "ingress='direct' is switched on when Ray starts, and Ray is already running "
                    "in this process without it: stop Ray first, pass restart_ray=True (a local "
                    "cluster only, never one at RAY_ADDRESS), or use ingress='proxy'"
                )
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        with cluster_env(self._first_port if direct else None, self._span):
            ensure_ray(num_cpus=self.num_cpus)
        self._ray_started = True

    def _triton_repository(self):
        """The store's ``triton-local`` (written by ``kuberank export`` ready to serve: its
        models find their files relative to the repository). A local store's is served in
        place and only read; an S3 store's is downloaded into a directory of this run under
        ``$TMPDIR``, removed by :meth:`stop` (not the shared cache, where another run's
        download would replace it under a running server)."""
        uri = store_path(self.store, TRITON_LOCAL_DIR)
        if not is_s3(uri):
            return materialize(uri)
        self._workdir = tempfile.mkdtemp(prefix="kuberank-serve-")
        if self._watchdog is not None:  # removed even if this process is killed
            self._watchdog.guard_dir(self._workdir)
        return materialize(uri, cache=self._workdir)

    def start(self) -> LocalServing:
        from kuberank.serving.app import build_app
        from kuberank.serving.loading import check_store

        check_store(self.store)  # fail before starting anything
        from kuberank.serving.watchdog import Watchdog

        # ends what this start spawns (tritonserver, Ray's processes) if this process dies
        # without stop(): a SIGKILLed `kuberank serve` leaves nothing running
        self._watchdog = Watchdog()
        if self.use_triton:
            from kuberank.serving.triton import TritonServer

            self.triton = TritonServer(self._triton_repository())
            self.triton.start()
            self._watchdog.guard_new()
            self._watchdog.guard_dir(self.triton.directory)
            self.triton.wait_ready()
        from ray import serve

        self._start_ray()
        self._watchdog.guard_new()
        serve.start(http_options={"host": HOST, "port": self.proxy_port})
        serve.run(build_app(self.app_args()), name=APP_NAME, route_prefix="/", blocking=False)
        self.wait_ready()
        self._watchdog.guard_new()  # the replicas
        self._start_front()
        self._watchdog.guard_new()  # the front
        return self

    def _start_front(self) -> None:
        """haproxy: (re)start the front over the replicas' ports, then wait until it answers
        /readyz as this app."""
        if self.ingress != "haproxy":
            return
        from kuberank.serving.admission import DEFAULT_BUDGET_MS
        from kuberank.serving.front import HAProxyFront
        from kuberank.serving.settings import Settings
        from kuberank.serving.triton import free_port

        ports = [int(u.rsplit(":", 1)[1]) for u in self.urls]
        if self.front is not None:
            if self.front.servers == ports:
                return
            self.front.stop()
        args = self.app_args()
        batch = Settings(**{k: v for k, v in args.items() if k == "pipeline_batch"})
        workers = int(args.get("pipeline_workers") or 1)
        self.front = HAProxyFront(
            self.front_port,
            ports,
            # at most one batch running and one forming per worker (the workers never idle),
            # fewer while the replica is slow (serving/front.py: the adaptive cap), at least
            # one request per worker
            conns_per_server=2 * batch.pipeline_batch[0] * workers,
            min_conns_per_server=workers if self.adaptive_caps else None,
            budget_ms=float(self.settings.get("latency_budget_ms", DEFAULT_BUDGET_MS)),
            metrics_port=free_port(),
        ).start()
        if self._watchdog is not None:  # a killed serve leaves no kuberank-front-* behind
            self._watchdog.guard_dir(self.front.directory)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            try:
                status, _ = http_json("GET", self.url + "/readyz", timeout=2.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise KuberankError(f"the HAProxy front at {self.url} did not answer /readyz")

    def wait_ready(self) -> dict:
        """Poll /readyz until 200. Direct ingress: each Ingress replica took the lowest free
        port of the range, so the range is scanned until every replica answers as this app;
        ``urls`` lists them and ``port`` is the first."""
        candidates = [self.port]
        wanted = 1
        if self.direct_replicas:
            candidates = [
                port
                for port in range(self._first_port, self._first_port + self._span)
                if port != self.proxy_port  # the proxy answers as this app too
            ]
            wanted = self.ingress_replicas
        deadline = time.monotonic() + self.ready_timeout
        last: object = None
        while time.monotonic() < deadline:
            ready = {}
            for port in candidates:
                try:
                    status, body = http_json("GET", f"http://{HOST}:{port}/readyz", timeout=2.0)
                except OSError as exc:
                    last = exc if port == self._first_port else last
                    continue
                if status == 200 and isinstance(body, dict) and "model_version" in body:
                    ready[port] = body
                else:
                    last = body
            if len(ready) >= wanted:
                self.port = min(ready)
                self.urls = [f"http://{HOST}:{port}" for port in sorted(ready)]
                self.ready = ready[self.port]
                return self.ready
            time.sleep(0.5)
        raise KuberankError(
            f"kuberank app not ready at {self.url} after {self.ready_timeout:.0f}s "
            f"({wanted} Ingress replica(s) wanted): {last}"
        )

    def reload(self, store: str | None = None) -> dict:
        """Pick up a new model version (or another store) in place: the deployments'
        user_config changes, Serve calls reconfigure on the running replicas."""
        from ray import serve

        from kuberank.serving.app import build_app

        self.store = str(store or self.store)
        self.revision += 1
        serve.run(build_app(self.app_args()), name=APP_NAME, route_prefix="/", blocking=False)
        ready = self.wait_ready()
        self._start_front()  # replicas replaced on other ports: the front follows them
        return ready

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
            self.front = None
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                try:
                    serve.shutdown()
                finally:
                    if self._ray_started:
                        ray.shutdown()
                        self._ray_started = False
        finally:
            if self.triton is not None:
                self.triton.stop()
                self.triton = None
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            if self._watchdog is not None:
                self._watchdog.release()
                self._watchdog = None

    def __enter__(self) -> LocalServing:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(
    store: str,
    port: int | None = None,
    use_triton: bool = True,
    settings: dict | None = None,
    on_ready=print,
    ingress: str = DEFAULT_INGRESS,
    ingress_replicas: int = 0,
) -> int:
    """``kuberank serve``: start, print the URLs, block until SIGINT/SIGTERM, stop cleanly."""
    stop = threading.Event()
    running = LocalServing(
        store,
        port=port,
        use_triton=use_triton,
        settings=settings,
        ingress=ingress,
        ingress_replicas=ingress_replicas,
    )
    previous: dict = {}
    try:
        running.start()  # Ctrl-C during start-up: KeyboardInterrupt, then the same clean stop
        # installed after ray.init, which sets its own SIGTERM handler in the driver
        previous = {
            sig: signal.signal(sig, lambda *_: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        ready = running.ready
        on_ready(
            json.dumps(
                {
                    "url": running.url,
                    "urls": running.urls,
                    "proxy_url": running.proxy_url,
                    "front_metrics_url": running.front.metrics_url if running.front else None,
                    "ingress": running.ingress,
                    "model_version": ready.get("model_version"),
                    "triton": running.triton.grpc_url if running.triton else None,
                    "pid": os.getpid(),
                }
            )
        )
        while not stop.wait(0.5):
            if (
                running.triton is not None
                and running.triton.process is not None
                and running.triton.process.poll() is not None
            ):
                raise KuberankError("tritonserver exited; stopping")
    finally:
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
