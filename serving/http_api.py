"""The HTTP side of the ranking application: the request and response schema (part of the
OpenAPI schema at ``/openapi.json``), the error shape ``{"error": {"status", "message",
"details"?}}`` and the problems a request can have, the JSON fast path's answer, and the ASGI
middleware (body limits, admission's early 503, metrics per route and status).
:func:`new_api` is the FastAPI app the Ingress serves its routes on (serving/app.py)."""

import json
import logging
import re
import time
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kuberank.serving import admission, hybrid, json_routes
from kuberank.serving.admission import Overloaded
from kuberank.serving.explain import Explanation
from kuberank.serving.filters import Filter, FilterError, attribute_table
from kuberank.serving.metrics import replica_metrics
from kuberank.serving.policies import BlockedQuery
from kuberank.serving.reranking import missing as reranking_missing

# Request limits (part of the OpenAPI schema)
MAX_QUERY_CHARS = 512
MAX_K = 100
MAX_HISTORY = 200
MAX_ID_CHARS = 128
MAX_BODY_BYTES = 64 * 1024
MAX_DEADLINE_MS = 60_000
MALFORMED_BODY = "malformed JSON body"


QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]
# A query needs a character that is not whitespace: what str.isspace() calls whitespace (what
# str.strip() removes), spelled out, since \s differs between regex engines (ECMA-262's, which
# JSON Schema patterns use, leaves out U+001C-U+001F and U+0085). The schema's pattern and the
# server's check (check_not_blank) are this one expression.
NOT_BLANK = (
    r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)
_NOT_BLANK = re.compile(NOT_BLANK)
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]


def _integral(value):
    """JSON has one number type: 3.0 is the integer 3 (JSON Schema's ``integer``); strict
    validation still refuses "3", true and 3.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# the bounds before the validator, so that the schema keeps them (minimum, maximum)
TopK = Annotated[int, Field(ge=1, le=MAX_K), BeforeValidator(_integral)]
DeadlineMs = Annotated[int, Field(ge=1, le=MAX_DEADLINE_MS), BeforeValidator(_integral)]


def _one_reranking_schema(schema: dict) -> None:
    # exactly one property, none of them null (their Python default None is not a value)
    schema.update(minProperties=1, maxProperties=1)
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)


class Diversity(BaseModel):
    """One re-ranking of F's candidates (serving/reranking.py): MMR (each pick maximises
    lambda * relevance - (1 - lambda) * its largest cosine to the items already picked),
    calibration to the genre shares of the history (Steck 2018), or the long-tail boost."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_reranking_schema)
    mmr_lambda: float = Field(
        None,
        ge=0.0,
        le=1.0,
        description="MMR: 1 is F's order; smaller: more diverse lists (items stay scored by F)",
    )
    calibration: float = Field(
        None,
        ge=0.0,
        le=1.0,
        description="calibration: 0 is F's order; larger: closer to the genre shares of the "
        "history (needs an index with genres)",
    )
    tail_boost: float = Field(
        None,
        ge=0.0,
        le=1.0,
        description="long-tail boost: (1 - B) relevance (min-max scaled) + B for the items in "
        "the long tail (the least popular third); 0 is F's order, 1 the tail first (needs an "
        "index of an interaction log)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "Diversity":
        if len(self.model_fields_set) != 1:
            raise ValueError("exactly one of mmr_lambda, calibration, tail_boost")
        return self

    def reranking(self) -> tuple[str, float]:
        (kind,) = self.model_fields_set
        return kind, float(getattr(self, kind))


class _UserContext(BaseModel):
    """What both routes take besides the query: the user, the history and k."""

    model_config = ConfigDict(extra="forbid", strict=True)
    history: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description="item ids the user interacted with, most recent last",
    )
    k: TopK = Field(10, description="number of items to return")
    deadline_ms: DeadlineMs | None = Field(
        None,
        description="this request's latency budget in milliseconds, when smaller than the "
        "server's (latency_budget_ms): a request that cannot be answered within it gets 503 "
        "with Retry-After at once",
    )
    explain: StrictBool = Field(
        False, description="add to each item the terms of F behind its score (`explain`)"
    )
    filter: Filter | None = Field(
        None, description="which items may be returned, applied before top-k (serving/filters.py)"
    )
    diversity: Diversity | None = Field(
        None, description="re-ranking for diversity; without it, the server's default"
    )


class SearchRequest(_UserContext):
    query: QueryText = Field(
        description="query text (1-512 characters, at least one of them not whitespace)",
        # enforced by check_not_blank (a 422 that says "blank")
        json_schema_extra={"pattern": NOT_BLANK},
    )
    user_id: ItemId | None = Field(
        None,
        description="a user the model knows (personalisation; 404 when the model has users and "
        "this is not one of them, ignored by a model without users)",
    )
    retrieval: Literal["dense", "bm25", "hybrid"] | None = Field(
        None,
        description="how candidates are retrieved: dense (Q·I), bm25 (the store's lexical "
        "index) or hybrid (both fused with the store's fitted fusion; `score` is then the fused "
        "score and `explain` gives its `dense` and `lexical` terms). Default: the store's "
        "recorded retrieval (hybrid only where fusion beat dense on its tuning queries). "
        "bm25/hybrid on a store without a lexical index: 422 (`kuberank index` builds it)",
    )


class RecommendRequest(_UserContext):
    """A recommendation needs a signal: at least one history item, or a user_id (422 without
    either)."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["history"], "properties": {"history": {"minItems": 1}}},
                {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
            ]
        }
    )
    user_id: ItemId | None = Field(
        None,
        description="a user the model knows (404 when it does not: when the model has users, "
        "or when the history is empty and the user is the only signal)",
    )

    @model_validator(mode="after")
    def _needs_a_signal(self) -> "RecommendRequest":
        if not self.history and self.user_id is None:
            # a ValidationError at ``history``, so the 422 names the field
            problem = PydanticCustomError(
                "history_or_user_id", "give at least one item id, or a user_id"
            )
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [InitErrorDetails(type=problem, loc=("history",), input=self.history)],
            )
        return self


class ScoredItem(BaseModel):
    id: str
    score: float
    explain: Explanation | None = Field(None, description="with `explain: true` only")


class RankResponse(BaseModel):
    model_version: str
    fingerprint: str
    kind: str
    items: list[ScoredItem]


class ErrorBody(BaseModel):
    status: int
    message: str
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(
    status: int, message: str, details: list | None = None, headers: dict | None = None
) -> JSONResponse:
    body: dict = {"status": status, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class RequestProblem(Exception):
    def __init__(
        self, status: int, message: str, details: list | None = None, retry_after_s: int = 1
    ):
        self.status, self.message, self.details = status, message, details
        self.retry_after_s = retry_after_s
        super().__init__(message)

    @classmethod
    def shed(cls, exc: Overloaded) -> "RequestProblem":
        return cls(503, str(exc), retry_after_s=exc.retry_after_s)


def unknown_items_problem(ids: list[str]) -> RequestProblem:
    """404 for history item ids the model does not know, naming each (at most 20): a
    well-formed request about items that are not in this model's catalogue, like an unknown
    user_id. Every path that meets unknown ids (checked_state, the stages, the colocated
    batch) answers with this."""
    return RequestProblem(
        404,
        "history: unknown item ids",
        [{"field": "history", "problem": f"unknown item id {i!r}"} for i in ids[:20]],
    )


def checked_state(state, user_id: str | None, history: list[str], need_signal: bool, flt=None):
    """``state`` (the replica's Pipeline) when a request's user, history and filter are ones
    it serves: 503 before a model is loaded, 422 for a filter the index cannot answer, 404 for
    unknown history items or an unknown user_id (when it matters)."""
    if state is None:
        raise RequestProblem(503, "model not loaded yet")
    if flt is not None and flt.where:  # a predicate the index cannot answer: 422
        try:
            attribute_table(state.index).check(flt)
        except FilterError as exc:
            detail = {"field": exc.field, "problem": exc.problem, "type": "filter"}
            raise RequestProblem(422, f"invalid request: {exc.field}", [detail]) from None
    unknown = [h for h in history if h not in state.items]
    if unknown:
        raise unknown_items_problem(unknown)
    # a user_id the model does not know: 404 when the model has users, or when it is the
    # request's only signal (a recommendation with an empty history; RecommendRequest requires
    # history or user_id); a search model without users ignores it otherwise
    only_signal = need_signal and not history
    if user_id is not None and (state.users or only_signal) and user_id not in state.users:
        problem = "not a user of this model" + ("" if state.users else " (it has none)")
        raise RequestProblem(
            404,
            f"unknown user_id {user_id!r}",
            [{"field": "user_id", "problem": problem}],
        )
    return state


def check_not_blank(query: str) -> None:
    """422 at ``query`` for a query of whitespace only (the schema's NOT_BLANK pattern)."""
    if _NOT_BLANK.search(query) is None:
        raise RequestProblem(
            422, "query: blank", [{"field": "query", "problem": "must contain text"}]
        )


def chosen_reranking(state, body, settings) -> tuple[str, float] | None:
    """The request's re-ranking, else the server's default (``settings.reranking()``, checked
    against the index at load); 422 at ``diversity.<kind>`` when the index cannot serve it."""
    if body.diversity is None:
        return settings.reranking()
    kind, value = body.diversity.reranking()
    why = reranking_missing(state.index, kind)
    if why is not None:
        field_name = f"diversity.{kind}"
        detail = {"field": field_name, "problem": why, "type": "reranking"}
        raise RequestProblem(422, f"invalid request: {field_name}", [detail])
    return kind, value


def chosen_retrieval(state, body) -> str:
    """The search's retrieval (serving/hybrid.py); 422 at ``retrieval`` when the store cannot
    serve it."""
    try:
        return hybrid.choose(body.retrieval, state.lexical)
    except hybrid.RetrievalUnavailable as exc:
        detail = {"field": "retrieval", "problem": str(exc), "type": "retrieval"}
        raise RequestProblem(422, "invalid request: retrieval", [detail]) from None


def screen_query(state, query: str, metrics) -> str | None:
    """The query as the policy lets it through (serving/policies.py), counted in ``metrics``;
    None when the policy cut every term; 422 at ``query`` when it blocks the query."""
    policy = state.index.policy
    if policy is None:
        return query
    try:
        query, decision = policy.screen(query)
    except BlockedQuery as exc:
        metrics.policy_decisions({("blocked_terms", "rejected"): 1})
        detail = {"field": "query", "problem": str(exc), "type": "policy"}
        raise RequestProblem(422, "invalid request: query", [detail]) from None
    if decision is not None:
        metrics.policy_decisions({("blocked_terms", decision): 1})
    return query


RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}

ERRORS = {
    400: {"model": ErrorResponse, "description": "the body is not JSON"},
    404: {
        "model": ErrorResponse,
        "description": "a user_id or history item id this model does not know",
    },
    413: {"model": ErrorResponse, "description": f"a body over {MAX_BODY_BYTES} bytes"},
    422: {"model": ErrorResponse, "description": "a field is invalid (the error names it)"},
    503: {
        "model": ErrorResponse,
        "description": "overloaded: the request cannot be answered within its latency budget "
        "(the server's, or the client's deadline_ms), or the model is not loaded yet or a stage "
        "is unavailable; retry after Retry-After",
        "headers": RETRY_AFTER,
    },
}


def invalid_request_response(problems: list[dict], loc_start: int = 0) -> JSONResponse:
    """400 for a body that is not JSON, else 422 naming each invalid field. ``loc_start``: how
    many leading parts of each error's location to drop (FastAPI puts ``body`` first)."""
    if any(p.get("type") == "json_invalid" for p in problems):
        return error_response(400, MALFORMED_BODY)
    details = [
        {
            "field": ".".join(str(x) for x in p.get("loc", ())[loc_start:]) or "body",
            "problem": str(p.get("msg", "invalid")),
            "type": str(p.get("type", "")),
        }
        for p in problems
    ]
    fields = ", ".join(d["field"] for d in details)
    return error_response(422, f"invalid request: {fields}", details)


def problem_response(exc: RequestProblem) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.status == 503 else None
    return error_response(exc.status, exc.message, exc.details, headers)


async def _invalid_request(request: Request, exc: RequestValidationError):
    return invalid_request_response(exc.errors(), loc_start=1)


async def _request_problem(request: Request, exc: RequestProblem):
    return problem_response(exc)


async def _http_problem(request: Request, exc: StarletteHTTPException):
    """FastAPI's own refusals (404 unknown path, 405 method, 400 unparseable body) in the app's
    error shape. FastAPI raises 400 only when it cannot parse the body at all."""
    message = MALFORMED_BODY if exc.status_code == 400 else str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def answer_json(raw: bytes, model: type[BaseModel], route) -> JSONResponse:
    """What a FastAPI route with a ``model`` body answers, without FastAPI (JsonRoutes): parse
    the JSON, validate it with ``model``, ``await route(body)``, render the dict or the error."""
    try:
        # from_attributes as FastAPI validates bodies, so a non-object body gets its error
        body = model.model_validate(json.loads(raw), from_attributes=True)
    except ValidationError as exc:
        return invalid_request_response(exc.errors())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser
        return error_response(400, MALFORMED_BODY)
    try:
        return JSONResponse(await route(body))
    except RequestProblem as exc:
        return problem_response(exc)


ROUTES = {"/search", "/recommend", "/healthz", "/readyz", "/metrics", "/openapi.json"}


class _BodyTooLarge(Exception):
    pass


RANKED = ("/search", "/recommend")  # the routes admission sheds


async def _send_shed(send, shed: Overloaded) -> None:
    """The 503 of a shed request, straight to the ASGI server (the same JSON error shape)."""
    body = json.dumps({"error": {"status": 503, "message": str(shed)}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(shed.retry_after_s).encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LimitsAndMetrics:
    """Pure ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs a task group and memory
    streams per request): 413 for bodies over MAX_BODY_BYTES (declared or streamed), a JSON 500
    for a bug, and every answered request counted per route and status."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = json_routes.route_path(scope)
        route = path if path in ROUTES else "other"
        status = 0

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        if route in RANKED and scope["method"] == "POST":  # shed before reading the body
            shed = admission.gate()
            if shed is not None:
                replica_metrics().shed(shed.reason)
                await _send_shed(send, shed)
                replica_metrics().observe_request(route, 503, time.perf_counter() - started)
                return
        too_big = f"request body over {MAX_BODY_BYTES} bytes"
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await error_response(413, too_big)(scope, receive, counted_send)
        else:
            try:
                await self.app(scope, bounded_receive if length is None else receive, counted_send)
            except _BodyTooLarge:
                if not status:
                    await error_response(413, too_big)(scope, receive, counted_send)
            except Exception as exc:  # a bug, not the client's fault: JSON 500, counted, logged
                logging.getLogger("ray.serve").exception("kuberank: request failed")
                if not status:
                    problem = f"internal error: {type(exc).__name__}"
                    await error_response(500, problem)(scope, receive, counted_send)
        if route != "/metrics":  # requests refused before a route runs (413, 400, 422) count too
            replica_metrics().observe_request(route, status or 500, time.perf_counter() - started)


def new_api() -> FastAPI:
    """The application's FastAPI app: its error handlers and middleware (the Ingress adds the
    routes). Starlette runs the last added middleware outermost: limits and metrics wrap the
    JSON fast path."""
    api = FastAPI(
        title="kuberank", version="1", description="Real-time search and recommendation ranking"
    )
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(RequestProblem, _request_problem)
    api.add_exception_handler(StarletteHTTPException, _http_problem)
    api.add_middleware(json_routes.JsonRoutes)
    api.add_middleware(LimitsAndMetrics)
    return api
