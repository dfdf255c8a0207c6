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
# request-path logs, the garbage collector frozen after start-up. The proxy stays (one port,
# 127.0.0.1); direct ingress would give each replica its own port.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def apply_serve_env(env: dict | None = None) -> dict:
    """Set the :data:`SERVE_ENV` defaults in ``env`` (``os.environ``) unless already set; the
    values in effect."""
    env = os.environ if env is None else env
    for key, value in SERVE_ENV.items():
        env.setdefault(key, value)
    return {key: env[key] for key in SERVE_ENV}


class LocalServing:
    """Triton (optional) + a local Ray cluster + Serve with the app, on 127.0.0.1."""

    def __init__(
        self,
        store: str,
        *,
        port: int | None = None,
        use_triton: bool = True,
        settings: dict | None = None,
        num_cpus: int | None = None,
        ready_timeout: float = 180.0,
    ):
        from kuberank.serving.triton import free_port

        self.store = str(store)
        self.port = port or free_port()
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

    def app_args(self) -> dict:
        return {
            "model_store": self.store,
            "triton_url": self.triton.grpc_url if self.triton else "",
            "revision": self.revision,
            **self.settings,
        }

    def start(self) -> LocalServing:
        from pathlib import Path

        from kuberank.raycluster import ensure_ray
        from kuberank.serving.app import build_app, load_checked_index
        from kuberank.storage import materialize

        load_checked_index(self.store)  # fail before starting anything
        if self.use_triton:
            from kuberank.serving.triton import TritonServer

            repo = Path(materialize(self.store.rstrip("/") + "/triton-local"))
            self.triton = TritonServer(repo)
            self.triton.start()
            self.triton.wait_ready()
        import ray
        from ray import serve

        if not ray.is_initialized():
            apply_serve_env()
            ensure_ray(num_cpus=self.num_cpus)
            self._ray_started = True
        serve.start(http_options={"host": HOST, "port": self.port})
        serve.run(build_app(self.app_args()), name=APP_NAME, route_prefix="/", blocking=False)
        self.wait_ready()
        return self

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + self.ready_timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                status, body = http_json("GET", f"{self.url}/readyz", timeout=2.0)
                if status == 200:
                    return body
                last = body
            except OSError as exc:
                last = exc
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
) -> int:
    """``kuberank serve``: start, print the URL, block until SIGINT/SIGTERM, stop cleanly."""
    stop = threading.Event()
    running = LocalServing(store, port=port, use_triton=use_triton, settings=settings)
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
