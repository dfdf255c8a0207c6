"""The hot routes without FastAPI's per-request machinery.

FastAPI spends most of a small request's CPU outside the handler: its middleware stack, route
matching, dependency resolution, and a second validation pass of the response. On the Ingress
replica that was about 40% of the CPU of a ``POST /search`` (docs/serving.md, measured with a
model-free batch: 3.5k req/s through FastAPI, 5.5k req/s here). :class:`JsonRoutes` is a pure
ASGI middleware that hands a JSON ``POST`` on a registered path straight to its handler, which
validates with the same pydantic models and answers with the same JSON and errors as the
FastAPI route; FastAPI keeps serving everything else (other routes, other content types, empty
or chunked bodies) and the OpenAPI schema.

The handlers are registered per process by the replica (:func:`register`): Serve pickles the
deployment class by value, so the registry lives in this module, imported by reference.
"""

from collections.abc import Awaitable, Callable

# path -> handler(raw JSON body) -> an ASGI response (starlette Response)
Handler = Callable[[bytes], Awaitable[Callable]]
_handlers: dict[str, Handler] = {}


def register(path: str, handler: Handler) -> None:
    _handlers[path] = handler


def route_path(scope) -> str:
    """The path the app routes on: without the application's route prefix (``root_path``),
    as Starlette's router sees it (the limits-and-metrics middleware labels routes by it)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _is_json(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int]:
    """(content type is JSON, declared length or -1)."""
    json_type, length = False, -1
    for key, value in headers:
        if key == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            json_type = media == b"application/json"
        elif key == b"content-length" and value.isdigit():
            length = int(value)
    return json_type, length


class JsonRoutes:
    """Pure ASGI: ``POST`` + ``application/json`` + a declared non-empty body on a registered
    path -> that path's handler; anything else -> the wrapped app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        handler = _handlers.get(route_path(scope)) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        json_type, length = _is_json(scope["headers"])
        if not json_type or length <= 0:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        response = await handler(b"".join(chunks))
        await response(scope, receive, send)
