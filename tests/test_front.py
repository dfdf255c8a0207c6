"""The local HAProxy front (serving/front.py): its configuration, and the real haproxy (Ray's
bundled binary) in front of small stdlib servers: requests are spread over the replicas, each
replica holds at most its share, and what waits past the queue timeout gets the app's 503 JSON
with Retry-After, without reaching a replica."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import free_port

from kuberank.errors import KuberankError
from kuberank.serving.front import (
    SHED_FULL,
    SHED_WAITED,
    CapController,
    HAProxyFront,
    _check_free,
    adaptive_cap,
    backend_stats,
    find_haproxy,
    max_connections,
    render_config,
    runtime_api,
    shed_response,
)


def test_config_bounds_each_replica_and_the_queue():
    text = render_config(8000, [9001, 9002], 32, 40, "/tmp/503.http", 2048)
    assert "bind 127.0.0.1:8000" in text and "maxconn 2048" in text
    assert "timeout queue 40ms" in text and "errorfile 503 /tmp/503.http" in text
    assert "server replica0 127.0.0.1:9001 maxconn 32 check" in text
    assert "server replica1 127.0.0.1:9002 maxconn 32 check" in text
    assert "balance leastconn" in text and "option httpchk GET /readyz" in text
    with pytest.raises(KuberankError, match="no Ingress replica"):
        render_config(8000, [], 32, 40, "/tmp/503.http", 2048)
    with pytest.raises(KuberankError, match="conns_per_server"):
        render_config(8000, [9001], 0, 40, "/tmp/503.http", 2048)


def test_the_admin_socket_is_configured_only_when_asked_for():
    assert "stats socket" not in render_config(8000, [9001], 32, 40, "/tmp/503.http", 2048)
    text = render_config(8000, [9001], 32, 40, "/tmp/503.http", 2048, admin_socket="/tmp/a.sock")
    assert "stats socket /tmp/a.sock mode 600 level admin" in text


def test_adaptive_cap_moves_by_the_target_over_the_measured_time():
    # a replica holding its 32 while answering 100 a second keeps each 320 ms: the cap falls
    # by at most 4x a window, and settles where 100 a second answer within 60 ms (6)
    assert adaptive_cap(32, 32, 100.0, 0.06, 2, 32) == 8
    assert adaptive_cap(8, 8, 100.0, 0.06, 2, 32) == pytest.approx(6)
    # a cap that does not bind: 5 held at 100 a second is 50 ms, within 60: it grows
    assert adaptive_cap(8, 5, 100.0, 0.06, 2, 32) == pytest.approx(8 * 1.2)
    # a burst at half the capacity does not shrink it (the old rule cut it to rate x target,
    # 16 here): 12 held at 262 a second is 46 ms
    assert adaptive_cap(16, 12, 262.0, 0.06, 2, 32) == pytest.approx(16 * 0.06 * 262 / 12)
    # over the target but never full (nothing held back): shrinking would lower no latency
    assert adaptive_cap(16, 10, 100.0, 0.06, 2, 32, bound=False) == 16
    assert adaptive_cap(16, 10, 100.0, 0.06, 2, 32, bound=True) == pytest.approx(9.6)
    # a quarter of a window moves it by the ratio's fourth root
    assert adaptive_cap(32, 32, 100.0, 0.06, 2, 32, step=0.25) == pytest.approx(32 * 0.25**0.25)
    # a fast replica gets its full batches, a stalled one one request per worker; idle: kept
    assert adaptive_cap(4, 4, 5000.0, 0.06, 2, 32) == 16
    assert adaptive_cap(8, 8, 0.0, 0.06, 2, 32) == 2
    assert adaptive_cap(7, 0, 0.0, 0.06, 2, 32) == 7
    for bad in ({"lo": 0}, {"hi": 1, "lo": 2}, {"target_s": 0.0}, {"step": 0.0}, {"step": 1.5}):
        args = {"cap": 1, "held": 1, "rate": 1.0, "target_s": 0.06, "lo": 1, "hi": 32, **bad}
        with pytest.raises(ValueError):
            adaptive_cap(**args)


def _look(queued=0, **servers):
    """``show stat``'s rows as backend_stats reads them: server -> (cap, held, answered)."""
    rows = {"BACKEND": {"qcur": str(queued)}}
    for name, (cap, held, answered) in servers.items():
        rows[name] = {"slim": str(cap), "scur": str(held), "hrsp_2xx": str(answered)}
    return rows


def test_cap_controller_decides_from_each_replicas_looks():
    caps = CapController("unused", target_s=0.06, lo=2, hi=32)
    assert caps.step_share == 0.25
    # one look measures nothing: the caps stay as HAProxy has them
    assert caps.decide(_look(r0=(32, 32, 0), r1=(32, 2, 0)), now=0.0) == []
    assert caps.caps == {"r0": 32, "r1": 32}
    # a quarter of a second later r0 is full answering 100 a second (32 held: 320 ms each):
    # down by the 4x limit's fourth root; r1 answers 100 a second holding 2 (20 ms): it would
    # grow, and is at the ceiling already
    changes = caps.decide(_look(r0=(32, 32, 25), r1=(32, 2, 25)), now=0.25)
    assert changes == ["set maxconn server ingress/r0 23"]  # 32 x 0.25 ** 0.25 = 22.6
    assert caps.caps == {"r0": 23, "r1": 32}
    # r1 over the target (20 held at 100 a second; 8 on average over the window) but not full
    # and nothing queued: kept
    caps.decide(_look(r0=(caps.caps["r0"], 23, 50), r1=(32, 20, 50)), now=0.5)
    assert caps.caps["r1"] == 32
    # ... and shrunk once requests wait in the front's queue (its cap holds them back):
    # 11 held on average at 100 a second is 110 ms, 0.55 of the target: 32 x 0.55 ** 0.25
    r0 = caps.caps["r0"]
    changes = caps.decide(_look(queued=5, r0=(r0, r0, 75), r1=(32, 20, 75)), now=0.75)
    assert "set maxconn server ingress/r1 28" in changes and caps.caps["r1"] == 28
    # HAProxy restarted (counters back near 0): r0's window starts again, nothing is decided
    r0 = caps.caps["r0"]
    changes = caps.decide(_look(r0=(r0, 5, 3), r1=(28, 1, 100)), now=1.0)
    assert not [c for c in changes if "/r0 " in c] and caps.caps["r0"] == r0
    # a cap set by hand on the runtime API (4) is where the next move starts from: 2.3 held on
    # average at 74 a second is well within the target, so it grows from 4, not from r0's
    caps.decide(_look(r0=(4, 1, 10), r1=(28, 1, 125)), now=1.25)
    assert caps.caps["r0"] == 4
    changes = caps.decide(_look(r0=(4, 1, 40), r1=(28, 1, 150)), now=1.5)
    assert "set maxconn server ingress/r0 5" in changes and caps.caps["r0"] == 5


def test_backend_stats_reads_show_stat():
    text = (
        "# pxname,svname,qcur,scur,slim,rate,\n"
        "kuberank,FRONTEND,,3,2048,40,\n"
        "ingress,replica0,0,4,8,120,\n"
        "ingress,BACKEND,2,4,,120,\n"
    )
    rows = backend_stats(text)
    assert set(rows) == {"replica0", "BACKEND"}
    assert rows["replica0"]["slim"] == "8" and rows["BACKEND"]["qcur"] == "2"
    with pytest.raises(ValueError, match="show stat"):
        backend_stats("Unknown command.\n")


def test_shed_response_is_the_apps_error_shape():
    head, _, body = shed_response(2).partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and "Retry-After: 2" in head
    assert f"Content-Length: {len(body)}" in head
    assert json.loads(body)["error"]["status"] == 503


def test_connections_fit_the_open_file_limit():
    assert max_connections(1024) == 412
    assert max_connections(100_000) == 4096
    assert max_connections(10) == 64


class _Slow(http.server.BaseHTTPRequestHandler):
    """One request at a time per server (HTTPServer is not threaded); /readyz at once."""

    delay = 0.3
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.path != "/readyz":
            time.sleep(getattr(self.server, "delay", self.delay))
        self.server.seen += 1
        body = json.dumps({"port": self.server.server_port}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _get(url: str) -> tuple[int, dict, object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers  # case-insensitive


@pytest.fixture
def replicas():
    yield from _two_replicas(http.server.HTTPServer, timeout=0.5)


def _two_replicas(server_class, **attributes):
    """Two _Slow servers of ``server_class`` on free ports, each serving in a thread of its
    own, with ``attributes`` set; shut down after the test."""
    servers = []
    for _ in range(2):
        server = server_class(("127.0.0.1", free_port()), _Slow)
        server.seen = 0
        for name, value in attributes.items():
            setattr(server, name, value)
        threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_haproxy_spreads_bounds_and_sheds(replicas):
    find_haproxy()  # a dependency of ray[serve]: never skipped
    ports = [s.server_port for s in replicas]
    # each replica holds one request; a request may wait 40 ms (40% of a 100 ms budget)
    front = HAProxyFront(
        free_port(), ports, conns_per_server=1, budget_ms=100, metrics_port=free_port()
    ).start()
    try:
        status, body, _ = _get(front.url + "/readyz")
        assert status == 200 and body["port"] in ports
        seen_before = sum(s.seen for s in replicas)
        # 8 requests at once against two replicas of one slot each that take 300 ms
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: _get(front.url + "/work"), range(8)))
        statuses = sorted(r[0] for r in results)
        served = [r[1]["port"] for r in results if r[0] == 200]
        shed = [r for r in results if r[0] == 503]
        assert set(statuses) == {200, 503}, statuses
        assert set(served) == set(ports)  # both replicas served: leastconn spread them
        assert len(served) == 2, statuses  # one at a time each: the rest were shed
        for _, body, headers in shed:
            assert body["error"]["status"] == 503 and "overloaded" in body["error"]["message"]
            assert headers.get("Retry-After") == "1"
        # the queue holds one more round of slots (2): those waited past 40 ms, the others
        # found it full and were answered at once
        messages = sorted(body["error"]["message"] for _, body, _ in shed)
        assert messages.count(SHED_WAITED) <= 2 and messages.count(SHED_FULL) >= 4, messages
        # the shed requests never reached a replica
        assert sum(s.seen for s in replicas) - seen_before == 2
        # HAProxy's own exporter counts the requests shed at once
        with urllib.request.urlopen(front.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("haproxy_frontend_intercepted_requests_total")
            and 'proxy="kuberank"' in x
        )
        assert float(line.rsplit(" ", 1)[1]) == messages.count(SHED_FULL)
    finally:
        front.stop()
    assert front.process is None


def test_a_port_left_in_time_wait_by_an_earlier_front_is_free():
    # a front stopped right after traffic leaves its accepted connections in TIME_WAIT;
    # haproxy binds over them, and so must the check before it
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end waits in TIME_WAIT
    client.close()
    listener.close()
    _check_free(port)


def test_a_front_that_cannot_start_says_why(replicas):
    port = replicas[0].server_port  # taken
    with pytest.raises(KuberankError, match=f"port {port} is in use"):
        HAProxyFront(port, [replicas[1].server_port], 1, 100).start()


def _caps(front: HAProxyFront) -> list[int]:
    """Each replica's cap as haproxy holds it now."""
    rows = backend_stats(runtime_api(front.caps.admin_socket, "show stat"))
    return [int(rows[f"replica{i}"]["slim"]) for i in range(len(front.servers))]


def _load_until(front: HAProxyFront, wanted: list[int], clients: int = 8, limit_s: float = 15):
    """Closed-loop clients on /work until the caps are ``wanted`` (or ``limit_s`` passed)."""
    done = threading.Event()

    def client():
        while not done.is_set():
            _get(front.url + "/work")

    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and _caps(front) != wanted:
            time.sleep(0.2)
        done.set()
    return _caps(front)


@pytest.fixture
def threaded_replicas():
    """Two replicas that answer requests side by side (a thread each), 300 ms per request."""
    yield from _two_replicas(http.server.ThreadingHTTPServer, delay=0.3, daemon_threads=True)


def test_each_replicas_cap_follows_its_measured_speed(threaded_replicas):
    replicas = threaded_replicas
    ports = [s.server_port for s in replicas]
    # caps between 1 and 4 requests per replica; 60 ms of the 100 ms budget in the replica
    front = HAProxyFront(
        free_port(), ports, conns_per_server=4, budget_ms=100, min_conns_per_server=1
    ).start()
    try:
        assert _caps(front) == [4, 4]
        # 300 ms a request: at most 13 requests/s a replica, which hold 1 within 60 ms; 8
        # clients keep the caps binding
        assert _load_until(front, [1, 1]) == [1, 1]
        # the same replicas now answer at once: hundreds a second fill their 4 slots again
        for server in replicas:
            server.delay = 0.0
        assert _load_until(front, [4, 4]) == [4, 4]
    finally:
        front.stop()
    assert front.caps is None and front.process is None
