"""kuberank.client against a scripted HTTP server on 127.0.0.1 (the standard library's
http.server, real sockets): typed results, retries on 503 honouring Retry-After within bounds,
timeouts, refused connections, and 4xx errors carrying the server's JSON error."""

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kuberank.client import (
    ApiError,
    KuberankClient,
    ProtocolError,
    RankResult,
    ScoredItem,
    TransportError,
    UnavailableError,
    retry_after_seconds,
)
from kuberank.serving.triton import free_port

ANSWER = {
    "model_version": "3",
    "fingerprint": "sha256:abc",
    "kind": "search",
    "items": [{"id": "d2", "score": 0.91}, {"id": "d5", "score": 0.42}],
}


def reply(status=200, body=ANSWER, headers=None, delay=0.0):
    return {"status": status, "body": body, "headers": headers or {}, "delay": delay}


def error(status, message, details=None, headers=None):
    body = {"error": {"status": status, "message": message}}
    if details:
        body["error"]["details"] = details
    return reply(status, body, headers)


class Scripted:
    """An HTTP server answering POSTs from a script (the last answer repeats), recording each
    request's path, headers and JSON body."""

    def __init__(self, *script):
        self.script, self.requests = list(script), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                owner.requests.append((self.path, dict(self.headers), body))
                step = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                time.sleep(step["delay"])
                data = step["body"]
                raw = data if isinstance(data, bytes) else json.dumps(data).encode()
                try:
                    self.send_response(step["status"])
                    ctype = "application/json" if not isinstance(data, bytes) else "text/plain"
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(raw)))
                    for key, value in step["headers"].items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_search_and_recommend_send_the_documented_body_and_return_typed_results():
    with Scripted(reply()) as server:
        client = KuberankClient(server.url + "/", timeout_s=2)
        result = client.search("space opera", k=2, user_id="u1", history=["d1"], deadline_ms=50)
        again = client.recommend(history=("d1", "d3"), k=5)
        client.recommend(user_id="u0")
    assert result == RankResult(
        [ScoredItem("d2", 0.91), ScoredItem("d5", 0.42)], "3", "sha256:abc", "search"
    )
    assert result.ids == ["d2", "d5"] and again == result
    (p1, h1, b1), (p2, _, b2), (_, _, b3) = server.requests
    assert p1 == "/search" and p2 == "/recommend"
    assert b1 == {
        "query": "space opera",
        "k": 2,
        "user_id": "u1",
        "history": ["d1"],
        "deadline_ms": 50,
    }
    assert b2 == {"k": 5, "history": ["d1", "d3"]} and b3 == {"k": 10, "user_id": "u0"}
    assert h1["Content-Type"] == "application/json" and client.waits == []
    with pytest.raises(TypeError, match="history"):
        client.search("x", history="d1")


def test_explain_filter_and_diversity_are_sent_and_explanations_returned():
    why = {"relevance": 0.91}
    answer = {**ANSWER, "items": [{"id": "d2", "score": 0.91, "explain": why}]}
    with Scripted(reply(body=answer)) as server:
        client = KuberankClient(server.url, timeout_s=2)
        result = client.search(
            "pasta", k=1, explain=True, filter={"exclude": ["d1"]}, diversity={"mmr_lambda": 0.5}
        )
        client.recommend(history=["d1"], filter={"where": {"year": {"gte": 1990}}})
    assert result.items == [ScoredItem("d2", 0.91, why)]
    (_, _, b1), (_, _, b2) = server.requests
    assert b1 == {
        "query": "pasta",
        "k": 1,
        "explain": True,
        "filter": {"exclude": ["d1"]},
        "diversity": {"mmr_lambda": 0.5},
    }
    assert b2 == {"k": 10, "history": ["d1"], "filter": {"where": {"year": {"gte": 1990}}}}


def test_503_is_retried_after_retry_after_and_the_answer_returned():
    shed = error(503, "overloaded: cannot answer within 40 ms", headers={"Retry-After": "1"})
    with Scripted(shed, shed, reply()) as server:
        client = KuberankClient(server.url, retries=3, max_retry_wait_s=5)
        started = time.monotonic()
        result = client.search("pasta")
        elapsed = time.monotonic() - started
    assert result.ids == ["d2", "d5"] and len(server.requests) == 3
    assert client.waits == [1.0, 1.0] and 2.0 <= elapsed < 4.0  # the server's Retry-After, slept


def test_retry_after_is_capped_and_the_retries_are_bounded():
    shed = error(503, "query encoder unavailable", headers={"Retry-After": "120"})
    with Scripted(shed) as server:
        client = KuberankClient(server.url, retries=2, max_retry_wait_s=0.2)
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            client.search("pasta")
        elapsed = time.monotonic() - started
    assert len(server.requests) == 3 and client.waits == [0.2, 0.2] and elapsed < 2.0
    exc = caught.value
    assert isinstance(exc, ApiError) and exc.status == 503 and exc.retry_after_s == 120
    assert exc.message == "query encoder unavailable" and "HTTP 503" in str(exc)
    # without Retry-After: exponential backoff from backoff_s, capped
    with Scripted(error(503, "busy")) as server:
        client = KuberankClient(server.url, retries=4, backoff_s=0.01, max_retry_wait_s=0.05)
        with pytest.raises(UnavailableError):
            client.recommend(history=["d1"])
    assert client.waits == [0.01, 0.02, 0.04, 0.05] and len(server.requests) == 5


@pytest.mark.parametrize(
    ("status", "message", "details"),
    [
        (422, "invalid request", [{"field": "k", "problem": "must be at most 100"}]),
        (404, "history: unknown item ids", [{"field": "history", "problem": "unknown 'zz'"}]),
        (413, "body: larger than 65536 bytes", None),
        (500, "internal error", None),
    ],
)
def test_other_errors_raise_at_once_with_the_servers_json_error(status, message, details):
    with Scripted(error(status, message, details)) as server:
        client = KuberankClient(server.url, retries=3)
        with pytest.raises(ApiError) as caught:
            client.search("pasta", k=101)
    exc = caught.value
    assert not isinstance(exc, UnavailableError) and len(server.requests) == 1
    assert (exc.status, exc.message, exc.details) == (status, message, details or [])
    assert exc.body == {
        "error": {"status": status, "message": message, **({"details": details} if details else {})}
    }
    if details:
        assert f"{details[0]['field']}: {details[0]['problem']}" in str(exc)


def test_a_non_json_error_and_a_non_json_answer():
    with Scripted(reply(502, b"Bad Gateway from the proxy")) as server:
        with pytest.raises(ApiError, match="HTTP 502.*Bad Gateway from the proxy") as caught:
            KuberankClient(server.url).search("pasta")
    assert caught.value.body == "Bad Gateway from the proxy" and len(server.requests) == 1
    with Scripted(reply(200, b"<html>")) as server, pytest.raises(ProtocolError, match="not JSON"):
        KuberankClient(server.url).search("pasta")
    with Scripted(reply(200, {"items": "nope"})) as server:
        with pytest.raises(ProtocolError, match="not a ranking answer"):
            KuberankClient(server.url).search("pasta")


def test_a_slow_server_times_out_each_attempt():
    with Scripted(reply(delay=1.5)) as server:
        client = KuberankClient(server.url, timeout_s=0.2, retries=1, backoff_s=0.05)
        started = time.monotonic()
        with pytest.raises(TransportError, match="no answer within 0.2 s"):
            client.search("pasta")
        elapsed = time.monotonic() - started
    assert len(server.requests) == 2 and client.waits == [0.05]
    assert elapsed < 1.2  # two attempts of 0.2 s and one wait, not the server's 1.5 s


def test_a_refused_connection_is_retried_then_raised():
    client = KuberankClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01)
    with pytest.raises(TransportError, match="refused"):
        client.search("pasta")
    assert client.waits == [0.01, 0.02]
    assert client.ready() is False


def test_retry_after_forms():
    now = time.time()
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(" 0 ") == 0.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= retry_after_seconds(date, now=now) <= 31
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    with pytest.raises(ValueError, match="url"):
        KuberankClient("127.0.0.1:8000")
