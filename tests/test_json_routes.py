"""JsonRoutes: which requests take the fast path (JSON POST with a declared body on a
registered path, under the app's route prefix) and which go on to the wrapped FastAPI app.
Driven with plain ASGI messages; the answers themselves are compared with FastAPI's in
test_app.test_json_fast_path_answers_like_fastapi."""

import asyncio

import pytest
from starlette.responses import JSONResponse

from kuberank.serving import json_routes


class Recorder:
    """The wrapped app: records that it was called."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await JSONResponse({"via": "app"})(scope, receive, send)


def call(app, method="POST", path="/search", body=b'{"q": 1}', headers=None, root_path=""):
    if headers is None:
        headers = [(b"content-type", b"application/json")]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "method": method,
        "path": root_path + path,
        "root_path": root_path,
        "headers": headers,
    }
    chunks = [body[:3], body[3:]] if body else [b""]
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


@pytest.fixture
def fast(monkeypatch):
    seen = []

    async def handler(raw):
        seen.append(raw)
        return JSONResponse({"via": "fast"})

    monkeypatch.setattr(json_routes, "_handlers", {"/search": handler})
    return seen


def test_json_post_on_a_registered_path_skips_the_app(fast):
    app = Recorder()
    sent = call(json_routes.JsonRoutes(app), root_path="/rec")
    assert app.calls == 0 and fast == [b'{"q": 1}']
    assert sent[0]["status"] == 200 and b"fast" in sent[1]["body"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "GET", "body": b""},
        {"path": "/healthz"},
        {"headers": [(b"content-type", b"text/plain"), (b"content-length", b"8")]},
        {"headers": [(b"content-type", b"application/vnd.x+json"), (b"content-length", b"8")]},
        {"headers": [(b"content-type", b"application/json")]},  # chunked: no declared length
        {"headers": [(b"content-type", b"application/json"), (b"content-length", b"0")]},
    ],
)
def test_everything_else_goes_to_the_app(fast, kwargs):
    app = Recorder()
    call(json_routes.JsonRoutes(app), **kwargs)
    assert app.calls == 1 and fast == []


def test_route_path_drops_the_route_prefix():
    assert json_routes.route_path({"path": "/rec/search", "root_path": "/rec"}) == "/search"
    assert json_routes.route_path({"path": "/search", "root_path": "/rec"}) == "/search"
    assert json_routes.route_path({"path": "/rec", "root_path": "/rec"}) == "/"
