"""serving/bench_load.py: the load generator against raw loopback servers and the real app
(keep-alive connections, split responses, statuses, broken answers, replicas, the open-loop
pool) and the loopback-only guard."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import pytest
from test_app import serving  # noqa: F401 - the shared session fixture

from kuberank.errors import KuberankError
from kuberank.serving import bench_load


def test_queries_are_distinct_and_bounded():
    queries = bench_load.bench_queries(200)
    assert len(set(queries)) == 200 and all(2 <= len(q.split()) <= 3 for q in queries)


def test_loopback_only():
    with pytest.raises(KuberankError, match="loopback"):
        bench_load.run_load(
            "http://10.0.0.1:8000/search", lambda i: {}, bench_load.Level("closed", 1, 1, 1)
        )


def test_split_cpus_gives_the_generator_cores_of_its_own():
    assert bench_load.split_cpus([0, 1]) == ({0}, {1})
    assert bench_load.split_cpus(range(16)) == (set(range(12)), set(range(12, 16)))
    assert bench_load.split_cpus([3, 1, 2, 0], generator=2) == ({0, 1}, {2, 3})
    assert bench_load.split_cpus([0]) is None  # one core: nothing to split
    assert bench_load.split_cpus([0, 1], generator=0) is None  # asked to share
    with pytest.raises(KuberankError, match="leaves none"):
        bench_load.split_cpus([0, 1], generator=2)
    with pytest.raises(KuberankError, match="0 or more"):
        bench_load.split_cpus([0, 1], generator=-1)


def test_generator_split_reads_the_environment(monkeypatch):
    import os

    cores = os.sched_getaffinity(0)
    monkeypatch.setenv(bench_load.GENERATOR_CPUS_ENV, "0")
    assert bench_load.generator_split() is None
    monkeypatch.setenv(bench_load.GENERATOR_CPUS_ENV, "two")
    with pytest.raises(KuberankError, match="KUBERANK_BENCH_GENERATOR_CPUS: 'two'"):
        bench_load.generator_split()
    monkeypatch.delenv(bench_load.GENERATOR_CPUS_ENV)
    assert bench_load.generator_split() == bench_load.split_cpus(cores)


def test_pinned_places_started_processes_and_restores_the_thread():
    """A process started inside the block runs on the block's cores; the thread gets its
    own cores back after it."""
    import os
    import subprocess
    import sys

    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("one core: nothing to pin apart")  # CI machines have two or more
    one = {min(before)}
    probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    with bench_load.pinned(one):
        assert os.sched_getaffinity(0) == one
        child = subprocess.run(probe, capture_output=True, text=True, check=True).stdout
    assert child.strip() == str(sorted(one))
    assert os.sched_getaffinity(0) == before
    with bench_load.pinned(None):
        assert os.sched_getaffinity(0) == before
    with pytest.raises(RuntimeError, match="inside"), bench_load.pinned(one):
        raise RuntimeError("inside")
    assert os.sched_getaffinity(0) == before


def test_started_apart_enters_the_app_on_its_cores_and_runs_the_block_on_the_others():
    import os

    before = os.sched_getaffinity(0)
    split = bench_load.split_cpus(before)
    if split is None:
        pytest.skip("one core: nothing to split")  # CI machines have two or more
    seen = {}

    @contextmanager
    def app():
        seen["entered on"] = os.sched_getaffinity(0)
        yield "running"
        seen["left on"] = os.sched_getaffinity(0)

    with bench_load.started_apart(app(), split) as running:
        assert running == "running" and os.sched_getaffinity(0) == split[1]
    assert seen == {"entered on": split[0], "left on": before}
    assert os.sched_getaffinity(0) == before
    with pytest.raises(RuntimeError, match="block"), bench_load.started_apart(app(), split):
        raise RuntimeError("block")
    assert os.sched_getaffinity(0) == before
    with bench_load.started_apart(app(), None):
        assert os.sched_getaffinity(0) == before
    assert bench_load.cores_line(bench_load.cores_note(split)) == (
        f"app on cores {sorted(split[0])}, load generator on {sorted(split[1])}"
    )
    assert bench_load.cores_line(None, "generators") == "app and generators share every core"


@contextmanager
def raw_http_server(answer):
    """A loopback TCP server in its own thread and event loop; ``answer(reader, writer)``
    handles each connection. Yields (port, connections opened)."""
    loop = asyncio.new_event_loop()
    ready, state = threading.Event(), {"connections": 0}

    async def on_connect(reader, writer):
        state["connections"] += 1
        try:
            await answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def run():
        server = loop.run_until_complete(asyncio.start_server(on_connect, "127.0.0.1", 0))
        state["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield state["port"], state
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def _load(port, level, body=lambda i: {"query": "x"}):
    return bench_load.run_load(f"http://127.0.0.1:{port}/search", body, level)


def test_load_generator_keeps_connections_and_parses_split_responses():
    async def byte_by_byte(reader, writer):
        while True:
            request = await read_request(reader)
            assert request.startswith(b"POST /search HTTP/1.1") and b'"query"' in request
            for byte in b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"ok": true}':
                writer.write(bytes([byte]))
                await writer.drain()

    with raw_http_server(byte_by_byte) as (port, state):
        result = _load(port, bench_load.Level("closed", 3, 30, 30))
    assert result["ok"] == 30 and result["errors"] == {}
    assert state["connections"] == 3  # one keep-alive connection per client


def answer_once(response: bytes):
    """A connection handler: read one request, write ``response``, close."""

    async def answer(reader, writer):
        await read_request(reader)
        writer.write(response)
        await writer.drain()

    return answer


def test_load_generator_reconnects_and_counts_statuses_and_broken_answers():
    busy = answer_once(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    with raw_http_server(busy) as (port, state):
        result = _load(port, bench_load.Level("closed", 2, 10, 30))
    assert result["errors"] == {"503": 10} and state["connections"] == 10

    cut_short = answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    with raw_http_server(cut_short) as (port, _):
        result = _load(port, bench_load.Level("open", 50, 8, 30))
    assert result["ok"] == 0 and result["errors"] == {"599": 8}


def test_load_generator_spreads_over_replicas_and_opens_its_pool_first():
    def keep_alive(counts: list):
        async def answer(reader, writer):
            while True:
                await read_request(reader)
                counts.append(1)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()

        return answer

    a, b = [], []
    with raw_http_server(keep_alive(a)) as (pa, sa), raw_http_server(keep_alive(b)) as (pb, sb):
        urls = [f"http://127.0.0.1:{p}/search" for p in (pa, pb)]
        closed = bench_load.run_load(
            urls, lambda i: {"query": "x"}, bench_load.Level("closed", 4, 40, 30)
        )
        assert closed["ok"] == 40 and len(a) + len(b) == 40 and a and b
        assert sa["connections"] == sb["connections"] == 2  # each client keeps to one replica
        before = len(a), len(b)
        opened = bench_load.run_load(
            urls, lambda i: {"query": "x"}, bench_load.Level("open", 200, 40, 30)
        )
        assert opened["ok"] == 40 and (len(a) - before[0], len(b) - before[1]) == (20, 20)
        # a pool of max(8, one 50 ms budget of arrivals) opened before the clock, half on each
        before = sa["connections"], sb["connections"]
        bench_load.run_load(urls, None, bench_load.Level("open", 400, 0, 30))
        for _ in range(200):  # the servers' threads accept them a moment later
            new = (sa["connections"] - before[0], sb["connections"] - before[1])
            if new == (10, 10):
                break
            time.sleep(0.01)
        assert new == (10, 10)
    with pytest.raises(KuberankError, match="no target URL"):
        bench_load.run_load([], None, bench_load.Level("closed", 1, 1, 1))


def test_samples_name_each_answer_from_its_body_and_clients_pause():
    """``answer`` sees each response's status and whole body (split over writes, and a body
    from the previous response not left over); each closed-loop client pauses ``pause_s``."""
    served: list[float] = []

    async def alternate(reader, writer):
        while True:
            await read_request(reader)
            served.append(time.perf_counter())
            body = b'{"n": %d, "pad": "%s"}' % (len(served), b"x" * 3000)
            status = b"200 OK" if len(served) % 2 else b"503 Busy"
            writer.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n" % (status, len(body)))
            for start in range(0, len(body), 1000):
                writer.write(body[start : start + 1000])
                await writer.drain()

    def answer(status, body):
        import json

        seen = json.loads(body)
        assert len(seen["pad"]) == 3000
        return f"{status} {seen['n'] % 2}"

    with raw_http_server(alternate) as (port, state):
        samples = bench_load.run_samples(
            f"http://127.0.0.1:{port}/search",
            lambda i: {"query": "x"},
            bench_load.Level("closed", 1, 6, 30),
            pause_s=0.05,
            answer=answer,
        )
    assert [kind for kind, _ in samples] == ["200 1", "503 0"] * 3
    assert state["connections"] == 1
    gaps = [b - a for a, b in zip(served, served[1:])]
    assert min(gaps) >= 0.05  # the client's pause between one answer and its next request


@pytest.mark.slow
def test_load_levels_against_the_app(serving):  # noqa: F811
    url = serving["base"] + "/search"
    make = lambda i: {"query": f"pasta {i % 5}", "k": 3}  # noqa: E731
    closed = bench_load.run_load(url, make, bench_load.Level("closed", 4, 40, 30))
    assert closed["requests"] == closed["ok"] == 40 and closed["errors"] == {}
    assert closed["p50_ms"] <= closed["p95_ms"] <= closed["p99_ms"] <= closed["max_ms"]
    opened = bench_load.run_load(url, make, bench_load.Level("open", 20, 20, 30))
    assert opened["requests"] == 20 and opened["ok"] == 20
    health = bench_load.run_load(
        serving["base"] + "/healthz", None, bench_load.Level("closed", 2, 10, 30)
    )
    assert health["ok"] == 10  # GET when there is no body
    bad = bench_load.run_load(url, lambda i: {"query": ""}, bench_load.Level("closed", 2, 6, 30))
    assert bad["ok"] == 0 and bad["errors"] == {"422": 6} and bad["p99_ms"] is None
