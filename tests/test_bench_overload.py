"""serving/bench_overload.py: hey's storm counted per status, and the overload table."""

from __future__ import annotations

import threading

from test_bench import _row

from kuberank.serving import bench_overload


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
        row = bench_overload.hey_storm(url, {"query": "q", "k": 1}, clients=4, seconds=1)
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
    # half the capacity offered, all of it served: not a shortfall of goodput
    half = {**level, "factor": 0.5, "offered_qps": 50.0, "qps": 50.0, "shed": 0}
    slower = {
        **row,
        "200": {**row["200"], "p99_ms": 2 * row["200"]["p99_ms"]},
        "503": {**row["503"], "p99_ms": 4 * row["503"]["p99_ms"]},
    }
    result = {
        "capacity_qps": 100.0,
        "budget_ms": 100.0,
        "seconds_per_level": 1,
        "runs": {"before": [level], "fixed cap": [level], "now": [half, level]},
        "storm": {"fixed cap": [slower], "now": [row]},
    }
    summary = bench_overload.summarise(result)
    # goodput 90/s of 100: met; admitted p99 of _row against the 100 ms budget; 503 p99 5 ms
    assert summary["min_goodput_vs_servable"] == 0.9
    assert summary["goals_met"]["min_goodput_vs_servable"]
    assert summary["goals_met"]["max_shed_p99_ms"]
    assert (
        summary["max_admitted_p99_vs_budget"] == 0.1
        and summary["goals_met"]["max_admitted_p99_vs_budget"]
    )
    versus = summary["storm_adaptive_vs_fixed"]
    assert (versus["clients"], versus["200_p99"], versus["503_p99"]) == (4, 0.5, 0.25)
    assert versus["200_per_s"] == 1.0
    table = bench_overload.format_overload(result)
    assert "app and generators share every core" in table  # a result without "cpus"
    assert "| before | 1 | 100 |" in table and "| now | 1 | 100 |" in table
    assert "| fixed cap | 1 | 100 |" in table
    assert f"| now | 4 | {row['200']['per_s']} |" in table
    assert "- max_shed_p99_ms: 5.0 (goal <= 10): met" in table
    assert "200 p99 0.5x, 503 p99 0.25x, 200/s 1.0x" in table
    split = bench_overload.format_overload({**result, "cpus": {"app": [0], "generator": [1]}})
    assert "app on cores [0], generators (open loop, hey) on [1]" in split
