"""The load benchmark: the load generator against the real app (counts, percentiles, errors),
the loopback-only guard, the verdicts of the summary, and a bounded serve_and_bench run of the
naive baseline and the in-process limit with its JSON, table and plot."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import pytest
from test_app import serving  # noqa: F401 - the shared session fixture
from test_index import serving_store

from kuberank.errors import KuberankError
from kuberank.serving import bench


def _row(target, level, qps, p99, errors=0.0):
    return {
        "target": target,
        "mode": "closed",
        "level": level,
        "requests": 100,
        "qps": qps,
        "p50_ms": p99 / 2,
        "p95_ms": p99 * 0.9,
        "p99_ms": p99,
        "max_ms": p99 * 1.2,
        "error_rate": errors,
        "errors": {},
    }


def test_summary_verdicts_and_table():
    results = {
        "kuberank-onnx": [
            _row("kuberank-onnx", 1, 50, 10),
            _row("kuberank-onnx", 32, 400, 45),
            _row("kuberank-onnx", 64, 500, 90),
            _row("kuberank-onnx", 16, 450, 30, 0.1),
        ],
        "naive": [_row("naive", 1, 40, 30), _row("naive", 8, 70, 120)],
        "limit": [{**_row("limit", 32, 700, 0), "p99_ms": None}],
        "bare-triton": [_row("bare-triton", 32, 800, 60)],
        "serve-floor": [
            {**_row("serve-floor", 32, 1800, 30), "via": "direct"},
            {**_row("serve-floor", 32, 900, 40), "via": "proxy"},
        ],
    }
    s = bench.summarize(results)
    assert (
        s["best"]["qps"] == 400 and s["best"]["target"] == "kuberank-onnx"
    )  # 500 is over budget, 450 had errors
    assert s["naive_qps_same_p99"] == 40 and s["vs_naive"] == 10.0 and s["target_5x_naive"]
    assert s["vs_limit"] == round(400 / 700, 3) and s["target_half_of_limit"]
    assert s["vs_bare_triton"] == 0.5
    table = bench.format_table({"results": results, "summary": s})
    assert "| kuberank-onnx | closed | 32 | 100 | 400 |" in table and "50% of it" in table
    assert "(400 req/s behind)" in table and "HTTP floor" in table
    assert "direct 1800 req/s, proxy 900 req/s" in table
    assert s["fastest"]["qps"] == 500 and s["fastest_vs_bare_triton"] == 0.625
    slow = bench.summarize(
        {
            "kuberank-onnx": [_row("kuberank-onnx", 8, 100, 80)],
            "limit": results["limit"],
            "bare-triton": results["bare-triton"],
        }
    )
    assert slow["best"] is None
    table = bench.format_table({"results": {"x": []}, "summary": slow})
    assert (
        "no kuberank level met" in table
        and "fastest kuberank level: kuberank-onnx 100 req/s" in table
    )
    assert "12% of bare Triton 800 req/s" in table and "700 req/s behind" in table
    ahead = bench.summarize({**results, "kuberank-onnx": [_row("kuberank-onnx", 32, 900, 40)]})
    assert "(100 req/s ahead)" in bench.format_table({"results": results, "summary": ahead})


def test_open_loop_levels_give_the_rate_held_within_budget():
    closed = [_row("kuberank-onnx", 32, 400, 30)]
    fixed = [
        {**_row("kuberank-onnx", rate, qps, p99), "mode": "open"}
        for rate, qps, p99 in ((210.0, 210, 20), (280.0, 279, 45), (350.0, 300, 400))
    ]
    limit = [{**_row("limit", 32, 700, 0), "p99_ms": None}]
    s = bench.summarize({"kuberank-onnx": closed + fixed, "limit": limit})
    # the closed-loop verdict is unchanged; the open loop holds 280/s, not the overrun 350/s
    assert s["best"]["qps"] == 400 and s["best"]["mode"] == "closed"
    assert s["open_rates"] == [210.0, 280.0, 350.0]
    assert s["open_best"]["level"] == 280.0 and s["open_vs_limit"] == round(279 / 700, 3)
    table = bench.format_table({"results": {"kuberank-onnx": closed + fixed}, "summary": s})
    assert "| kuberank-onnx | open | 280.0 |" in table
    assert (
        "open loop (fixed rate, tried 210, 280, 350 req/s): kuberank-onnx holds 279 req/s "
        "= 40% of the limit (p99 45 ms)" in table
    )
    overrun = bench.summarize({"kuberank-onnx": closed + fixed[2:], "limit": limit})
    assert overrun["open_best"] is None and overrun["open_vs_limit"] is None
    assert "tried 350 req/s): no rate held p99 <= 50 ms" in bench.format_table(
        {"results": {}, "summary": overrun}
    )
    assert "open_rates" not in bench.summarize({"kuberank-onnx": closed, "limit": limit})


@pytest.mark.parametrize(
    "kw",
    [
        {"targets": ("kuberank-onnx",), "open_at": (0.5,)},  # no limit to take shares of
        {"mode": "open", "open_at": (0.5,)},  # the levels are rates already
        {"open_at": (0.5, 0.0)},
    ],
)
def test_open_at_needs_closed_levels_and_the_limit(kw):
    with pytest.raises(KuberankError, match="open_at"):
        bench.serve_and_bench("/no/store", **kw)


def test_bench_cli_names_a_bad_number_list(capsys):
    from kuberank.cli import main

    for flag in ("--concurrency", "--rates", "--open-at"):
        assert main(["bench", "--model-store", "/no/store", flag, "8,x"]) == 2
        assert f"{flag}: expected comma-separated numbers, got '8,x'" in capsys.readouterr().err


def test_queries_are_distinct_and_bounded():
    queries = bench.bench_queries(200)
    assert len(set(queries)) == 200 and all(2 <= len(q.split()) <= 3 for q in queries)


def test_loopback_only():
    with pytest.raises(KuberankError, match="loopback"):
        bench.run_load("http://10.0.0.1:8000/search", lambda i: {}, bench.Level("closed", 1, 1, 1))


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
    return bench.run_load(f"http://127.0.0.1:{port}/search", body, level)


def test_load_generator_keeps_connections_and_parses_split_responses():
    async def byte_by_byte(reader, writer):
        while True:
            request = await read_request(reader)
            assert request.startswith(b"POST /search HTTP/1.1") and b'"query"' in request
            for byte in b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"ok": true}':
                writer.write(bytes([byte]))
                await writer.drain()

    with raw_http_server(byte_by_byte) as (port, state):
        result = _load(port, bench.Level("closed", 3, 30, 30))
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
        result = _load(port, bench.Level("closed", 2, 10, 30))
    assert result["errors"] == {"503": 10} and state["connections"] == 10

    cut_short = answer_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    with raw_http_server(cut_short) as (port, _):
        result = _load(port, bench.Level("open", 50, 8, 30))
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
        closed = bench.run_load(urls, lambda i: {"query": "x"}, bench.Level("closed", 4, 40, 30))
        assert closed["ok"] == 40 and len(a) + len(b) == 40 and a and b
        assert sa["connections"] == sb["connections"] == 2  # each client keeps to one replica
        before = len(a), len(b)
        opened = bench.run_load(urls, lambda i: {"query": "x"}, bench.Level("open", 200, 40, 30))
        assert opened["ok"] == 40 and (len(a) - before[0], len(b) - before[1]) == (20, 20)
        # a pool of max(8, one 50 ms budget of arrivals) opened before the clock, half on each
        before = sa["connections"], sb["connections"]
        bench.run_load(urls, None, bench.Level("open", 400, 0, 30))
        for _ in range(200):  # the servers' threads accept them a moment later
            new = (sa["connections"] - before[0], sb["connections"] - before[1])
            if new == (10, 10):
                break
            time.sleep(0.01)
        assert new == (10, 10)
    with pytest.raises(KuberankError, match="no target URL"):
        bench.run_load([], None, bench.Level("closed", 1, 1, 1))


@pytest.mark.slow
def test_load_levels_against_the_app(serving):  # noqa: F811
    url = serving["base"] + "/search"
    make = lambda i: {"query": f"pasta {i % 5}", "k": 3}  # noqa: E731
    closed = bench.run_load(url, make, bench.Level("closed", 4, 40, 30))
    assert closed["requests"] == closed["ok"] == 40 and closed["errors"] == {}
    assert closed["p50_ms"] <= closed["p95_ms"] <= closed["p99_ms"] <= closed["max_ms"]
    opened = bench.run_load(url, make, bench.Level("open", 20, 20, 30))
    assert opened["requests"] == 20 and opened["ok"] == 20
    health = bench.run_load(serving["base"] + "/healthz", None, bench.Level("closed", 2, 10, 30))
    assert health["ok"] == 10  # GET when there is no body
    bad = bench.run_load(url, lambda i: {"query": ""}, bench.Level("closed", 2, 6, 30))
    assert bad["ok"] == 0 and bad["errors"] == {"422": 6} and bad["p99_ms"] is None


@pytest.mark.slow
def test_serve_and_bench_naive_and_limit(tmp_path_factory, tmp_path):
    store, _, _ = serving_store(tmp_path_factory)
    result = bench.serve_and_bench(
        str(store),
        targets=("naive", "limit"),
        levels=(2,),
        requests=20,
        max_seconds=20,
        queries=20,
        out_dir=tmp_path,
    )
    naive = result["results"]["naive"][0]
    assert naive["ok"] == 20 and naive["qps"] > 0
    assert result["results"]["limit"][0]["qps"] > 0
    assert (tmp_path / "latency_vs_load.png").stat().st_size > 1000
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["items"] == 6
    assert "| naive | closed | 2.0 | 20 |" in bench.format_table(result)


def test_hey_storm_counts_each_status_and_the_overload_table_shows_both_defaults():
    """hey (Debian; installed by CI) against a stdlib server that sheds every other request."""
    import http.server

    from conftest import free_port, require_binary

    require_binary("hey", "Debian: apt-get install hey")

    class Half(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        n = 0

        def do_POST(self):  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            Half.n += 1
            status = 200 if Half.n % 2 else 503
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Half)
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/search"
        row = bench.hey_storm(url, {"query": "q", "k": 1}, clients=4, seconds=1)
    finally:
        server.shutdown()
        server.server_close()
    assert row["clients"] == 4 and row["requests"] == row["200"]["count"] + row["503"]["count"]
    assert abs(row["200"]["count"] - row["503"]["count"]) <= 4
    assert row["200"]["p99_ms"] >= row["200"]["p50_ms"] > 0
    level = {
        **_row("open", 100, 90, 10),
        "factor": 1.0,
        "offered_qps": 100.0,
        "shed": 10,
        "shed_p50_ms": 2.0,
        "shed_p99_ms": 5.0,
        "errors": {"503": 10},
    }
    result = {
        "capacity_qps": 100.0,
        "budget_ms": 100.0,
        "seconds_per_level": 1,
        "runs": {"before": [level], "now": [level]},
        "storm": {"now": [row]},
    }
    table = bench.format_overload(result)
    assert "| before | 1 | 100 |" in table and "| now | 1 | 100 |" in table
    assert f"| now | 4 | {row['200']['per_s']} |" in table


def test_retrieval_cost_needs_a_lexical_index(tmp_path_factory, tmp_path):
    import shutil

    store, _, _ = serving_store(tmp_path_factory)
    bare = tmp_path / "store"
    shutil.copytree(store, bare, symlinks=True)
    shutil.rmtree(bare / "lexical")
    with pytest.raises(KuberankError, match="no lexical index.*kuberank index"):
        bench.retrieval_cost(str(bare))


def test_in_process_limit_reports_the_lexical_stage_of_hybrid_requests(tmp_path_factory):
    store, _, _ = serving_store(tmp_path_factory)
    texts = bench.bench_queries(8)
    runs = {
        mode: bench.in_process_limit(str(store), texts, batch_size=4, seconds=0.1, retrieval=mode)
        for mode in ("dense", "hybrid")
    }
    for mode, run in runs.items():
        assert run["retrieval"] == mode and run["ok"] >= len(texts)
        assert set(run["stage_ms"]) == {"encode", "retrieve", "rank", "lexical"}
    assert runs["dense"]["stage_ms"]["lexical"] == 0.0 < runs["hybrid"]["stage_ms"]["lexical"]


@pytest.mark.slow
def test_retrieval_cost_serves_dense_and_hybrid_in_one_run(tmp_path_factory):
    store, _, _ = serving_store(tmp_path_factory)
    result = bench.retrieval_cost(
        str(store), levels=(2,), requests=20, max_seconds=20, queries=20, limit_seconds=0.2
    )
    served = result["served"]
    assert [r["target"] for r in served["dense"] + served["hybrid"]] == ["dense", "hybrid"]
    assert [r["target"] for r in result["rounds"]] == ["dense", "hybrid", "hybrid", "dense"]
    for one in result["rounds"]:  # admission may shed (503) on a loaded 2-core host
        assert one["requests"] == 20 and one["ok"] > 0 and set(one["errors"]) <= {"503"}
    assert result["ratios"]["served"][0]["level"] == 2.0
    assert result["limit"]["hybrid"]["stage_ms"]["lexical"] > 0
    table = bench.format_retrieval_cost(result)
    assert "| served, c=2 |" in table and "(d) hybrid, ms per query by stage" in table
