"""Local launcher: the bundled tritonserver on the store's local repository plus Ray Serve with the
ranking app, everything on 127.0.0.1, shut down cleanly.

    with LocalServing(store, use_triton=True) as running:    # kuberank serve
        httpx/urllib -> running.url + "/search"

:func:`serve_forever` is ``kuberank serve``: it blocks until Ctrl-C or SIGTERM and then stops
Serve, Ray and Triton (bounded waits).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from kuberank.errors import KuberankError

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
    """One loopback request; (status, parsed JSON or text). Never raises on HTTP errors."""
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
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


# Ray Serve's process-wide switches for a local cluster, read by the proxy and the replicas when
# they start (so set before the cluster starts; an existing cluster keeps its own): user code and
# the router on the replica's main event loop (no cross-thread hop per request), buffered
# request-path logs, the garbage collector frozen after start-up.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


INGRESS_MODES = ("direct", "proxy")
# Direct ingress: the Ingress replica runs its own HTTP server on a port of this range (Ray
# Serve's RAY_SERVE_ENABLE_DIRECT_INGRESS, host from http_options: 127.0.0.1), so a request
# costs one process hop instead of two (proxy actor -> replica). Measured on 2 cores: GET
# /healthz 2150 req/s direct vs 446 through the proxy (docs/serving.md).
DIRECT_PORT_SPAN = 8


def apply_serve_env(env: dict | None = None) -> dict:
    """Set the :data:`SERVE_ENV` defaults in ``env`` (``os.environ``) unless already set; the
    values in effect."""
    env = os.environ if env is None else env
    for key, value in SERVE_ENV.items():
        env.setdefault(key, value)
    return {key: env[key] for key in SERVE_ENV}


def direct_ingress_env(port: int) -> dict:
    """The switches that make Ray Serve's ingress replicas listen on ``port`` (the lowest free
    port of ``[port, port + DIRECT_PORT_SPAN)``) themselves."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_PORT_SPAN - 1),
        # time for an external load balancer to take a stopping replica out of rotation
        # (default 30 s, which every local stop would wait out); nothing balances locally
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


class LocalServing:
    """Triton (optional) + a local Ray cluster + Serve with the app, on 127.0.0.1.

    ``ingress``: ``"direct"`` (default) serves HTTP from the Ingress replica itself, pinned to
    one replica so that ``url`` is one port; Serve's proxy still runs, on ``proxy_url``.
    ``"proxy"``: every request goes through Serve's proxy actor on ``url``, which routes to
    several (autoscaled) Ingress replicas and retries around a dead one, at a lower ceiling.
    Direct ingress is a property of the Ray cluster, so it needs the cluster this object
    starts (or one started with :func:`direct_ingress_env` for this port)."""

    def __init__(
        self,
        store: str,
        *,
        port: int | None = None,
        use_triton: bool = True,
        settings: dict | None = None,
        num_cpus: int | None = None,
        ready_timeout: float = 180.0,
        ingress: str = "direct",
    ):
        from kuberank.serving.triton import free_port

        if ingress not in INGRESS_MODES:
            raise KuberankError(f"ingress: {ingress!r} is not one of {INGRESS_MODES}")
        self.ingress = ingress
        self.store = str(store)
        self.port = port or free_port()
        self.proxy_port = self.port if ingress == "proxy" else free_port()
        self.use_triton = use_triton
        self.settings = dict(settings or {})
        self.num_cpus = num_cpus
        self.ready_timeout = ready_timeout
        self.triton = None
        self._ray_started = False
        self.revision = int(self.settings.pop("revision", 0))

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def proxy_url(self) -> str:
        """Serve's HTTP proxy (the same app, one more hop; ``url`` in proxy mode)."""
        return f"http://{HOST}:{self.proxy_port}"

    def app_args(self) -> dict:
        from kuberank.serving.app import INGRESS

        args = {
            "model_store": self.store,
            "triton_url": self.triton.grpc_url if self.triton else "",
            "revision": self.revision,
            **self.settings,
        }
        if self.ingress == "direct":  # one Ingress replica: one port to send traffic to
            deployments = dict(args.get("deployments") or {})
            deployments[INGRESS] = {**deployments.get(INGRESS, {}), "num_replicas": 1}
            args["deployments"] = deployments
        return args

    def _start_ray(self) -> None:
        import ray

        from kuberank.raycluster import ensure_ray

        wanted = direct_ingress_env(self.port) if self.ingress == "direct" else {}
        if ray.is_initialized():
            have = {k: os.environ.get(k) for k in wanted}
            if have != wanted:
                raise KuberankError(
                    f"ingress='direct' needs a Ray cluster started with {wanted} (Ray is already "
                    "running without them); stop it or use ingress='proxy'"
                )
            return
        saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)  # read by the Serve controller and replicas at start-up
        try:
            apply_serve_env()
            ensure_ray(num_cpus=self.num_cpus)
        finally:
            for key, value in saved.items():  # later clusters of this process start plain
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self._ray_started = True

    def start(self) -> LocalServing:
        from pathlib import Path

        from kuberank.serving.app import build_app, load_checked_index
        from kuberank.storage import materialize

        load_checked_index(self.store)  # fail before starting anything
        if self.use_triton:
            from kuberank.serving.triton import TritonServer

            repo = Path(materialize(self.store.rstrip("/") + "/triton-local"))
            self.triton = TritonServer(repo)
            self.triton.start()
            self.triton.wait_ready()
        from ray import serve

        self._start_ray()
        serve.start(http_options={"host": HOST, "port": self.proxy_port})
        serve.run(build_app(self.app_args()), name=APP_NAME, route_prefix="/", blocking=False)
        self.wait_ready()
        return self

    def wait_ready(self) -> dict:
        """Poll /readyz until 200. Direct ingress: the replica took the lowest free port of its
        range, so the range is scanned and ``port`` set to the one that answers as this app."""
        candidates = [self.port]
        if self.ingress == "direct":
            candidates = list(range(self.port, self.port + DIRECT_PORT_SPAN))
        deadline = time.monotonic() + self.ready_timeout
        last: object = None
        while time.monotonic() < deadline:
            for port in candidates:
                try:
                    status, body = http_json("GET", f"http://{HOST}:{port}/readyz", timeout=2.0)
                except OSError as exc:
                    last = exc if port == self.port else last
                    continue
                if status == 200 and isinstance(body, dict) and "model_version" in body:
                    self.port = port
                    return body
                last = body
            time.sleep(0.5)
        raise KuberankError(
            f"kuberank app not ready at {self.url} after {self.ready_timeout:.0f}s: {last}"
        )

    def reload(self, store: str | None = None) -> dict:
        """Pick up a new model version (or another store) in place: the deployments'
        user_config changes, Serve calls reconfigure on the running replicas."""
        from ray import serve

        from kuberank.serving.app import build_app

        self.store = str(store or self.store)
        self.revision += 1
        serve.run(build_app(self.app_args()), name=APP_NAME, route_prefix="/", blocking=False)
        return self.wait_ready()

    def stop(self) -> None:
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
    ingress: str = "direct",
) -> int:
    """``kuberank serve``: start, print the URL, block until SIGINT/SIGTERM, stop cleanly."""
    stop = threading.Event()
    running = LocalServing(
        store, port=port, use_triton=use_triton, settings=settings, ingress=ingress
    )
    previous: dict = {}
    try:
        running.start()  # Ctrl-C during start-up: KeyboardInterrupt, then the same clean stop
        # installed after ray.init, which sets its own SIGTERM handler in the driver
        previous = {
            sig: signal.signal(sig, lambda *_: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        ready = running.wait_ready()
        on_ready(
            json.dumps(
                {
                    "url": running.url,
                    "proxy_url": running.proxy_url,
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
