"""serving/bench_overload.py: hey's storm counted per status, and the overload table."""

from __future__ import annotations

import json
import threading

from test_bench import _row

from kuberank.serving import bench_overload
from kuberank.serving.admission import Overloaded
from kuberank.serving.front import SHED_FULL, SHED_WAITED, shed_body


def test_shed_kind_names_who_answered_from_the_body():
    kind = bench_overload.shed_kind
    assert kind(503, shed_body(SHED_FULL).encode()) == "503 front: queue full"
    assert kind(503, shed_body(SHED_WAITED).encode()) == "503 front: waited"
    for reason, named in (("queue", "estimated wait"), ("expired", "waited")):
        message = str(Overloaded(reason, 0.12, 0.1))
        body = json.dumps({"error": {"status": 503, "message": message}}).encode()
        assert kind(503, body) == f"503 replica: {named}"
    assert kind(200, b"{}") == "200" and kind(502, b"") == "502"
    assert kind(503, b"Service Unavailable") == "503"


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
            body = b"{}" if status == 200 else shed_body(SHED_FULL).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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
    # the light clients beside hey: both answers, the 503s named by their body
    assert set(row["probe"]) == {"200", "503 front: queue full"}
    assert all(
        seen["count"] > 0 and seen["p99_ms"] >= seen["p50_ms"] > 0 for seen in row["probe"].values()
    )
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
    assert "app and generators (open loop, hey) share every core" in table  # no "cores"
    assert "| before | 1 | 100 |" in table and "| now | 1 | 100 |" in table
    assert "| fixed cap | 1 | 100 |" in table
    assert f"| now | 4 | {row['200']['per_s']} |" in table
    assert "- max_shed_p99_ms: 5.0 (goal <= 10): met" in table
    assert "200 p99 0.5x, 503 p99 0.25x, 200/s 1.0x" in table
    assert "| now | 4 | 503 front: queue full |" in table
    split = bench_overload.format_overload({**result, "cores": {"app": [0], "generator": [1]}})
    assert "app on cores [0], generators (open loop, hey) on [1]" in split
