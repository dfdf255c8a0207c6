"""A small typed client of the kuberank ranking API, standard library only (urllib).

    from kuberank.client import KuberankClient

    client = KuberankClient("http://127.0.0.1:8000", timeout_s=2.0, retries=3)
    result = client.search("space opera", k=5)
    for item in result.items:
        print(item.id, round(item.score, 3))
    client.recommend(history=["50", "172"], k=10)      # items the user interacted with

Every call returns a :class:`RankResult` (``items`` of :class:`ScoredItem` with ``id`` and
``score``, ``model_version``, ``fingerprint``, ``kind``).

- A 503 (the server sheds a request it cannot answer within its latency budget, or a stage is
  unavailable) and a 429 are retried up to ``retries`` times, each after the server's
  ``Retry-After`` (seconds or an HTTP date), capped at ``max_retry_wait_s``; without the header
  after an exponential backoff from ``backoff_s``. A refused or reset connection and a timeout
  are retried the same way (both routes only read). When the retries run out the last
  answer is raised: :class:`UnavailableError` for a 503, :class:`TransportError` for the rest.
- Any other 4xx or 5xx raises :class:`ApiError` at once, carrying the server's JSON error
  (``status``, ``message``, ``details``; e.g. 422 naming the field, 404 an unknown user or item).
- ``timeout_s`` bounds each attempt (connect and read).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

RETRY_STATUSES = (429, 503)


@dataclass(frozen=True)
class ScoredItem:
    """One ranked item."""

    id: str
    score: float
    explain: dict | None = None  # with explain=True: the terms of F behind the score


@dataclass(frozen=True)
class RankResult:
    """The answer of ``/search`` and ``/recommend``: items best first, and the model that
    ranked them."""

    items: list[ScoredItem]
    model_version: str
    fingerprint: str = ""
    kind: str = ""

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items]

    @classmethod
    def from_json(cls, body: dict) -> RankResult:
        try:
            return cls(
                items=[
                    ScoredItem(str(i["id"]), float(i["score"]), i.get("explain"))
                    for i in body["items"]
                ],
                model_version=str(body["model_version"]),
                fingerprint=str(body.get("fingerprint", "")),
                kind=str(body.get("kind", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"not a ranking answer ({exc!r}): {body!r:.200}") from None


class ClientError(Exception):
    """Everything this client raises."""


class ProtocolError(ClientError):
    """The server answered 200 with something that is not the documented JSON."""


class TransportError(ClientError):
    """No HTTP answer: connection refused or reset, or a timeout (after the retries)."""


@dataclass(eq=False)
class ApiError(ClientError):
    """An HTTP error answer: ``status``, and the server's JSON error ``{"error": {"status",
    "message", "details"?}}`` as ``message``, ``details`` and ``body``."""

    status: int
    message: str
    details: list = field(default_factory=list)
    body: dict | str | None = None
    retry_after_s: float | None = None
    url: str = ""

    def __post_init__(self):
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" from {self.url}" if self.url else ""
        text = f"HTTP {self.status}{where}: {self.message}"
        problems = [
            f"{d.get('field', '?')}: {d.get('problem', d)}" if isinstance(d, dict) else str(d)
            for d in self.details or []
        ]
        return text + (f" ({'; '.join(problems)})" if problems else "")


class UnavailableError(ApiError):
    """503 (or 429) on every attempt: the server is overloaded or a stage is unavailable."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date; None when absent or
    not understood."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class KuberankClient:
    """``/search`` and ``/recommend`` of a kuberank server at ``url`` (see the module
    docstring for retries, timeouts and errors)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        max_retry_wait_s: float = 5.0,
        backoff_s: float = 0.1,
        headers: dict | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected http:// or https://, got {url!r}")
        if timeout_s <= 0 or retries < 0 or max_retry_wait_s < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be positive; retries and waits not negative")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries = timeout_s, retries
        self.max_retry_wait_s, self.backoff_s = max_retry_wait_s, backoff_s
        self.headers = dict(headers or {})
        self._sleep = sleep
        self.waits: list[float] = []  # the waits before retries of the last call (seconds)

    # ------------------------------------------------------------------ the API

    def search(
        self,
        query: str,
        k: int = 10,
        user_id: str | None = None,
        history: Sequence[str] | None = None,
        deadline_ms: int | None = None,
        **options,
    ) -> RankResult:
        """The ``k`` best items for ``query`` (personalised by ``user_id`` and ``history``
        when the model uses them). ``options``: ``explain=True``, ``filter={...}``,
        ``diversity={"mmr_lambda": ...}`` as the API takes them (docs/serving.md)."""
        body = {"query": query, "k": k, **_context(user_id, history, deadline_ms), **options}
        return RankResult.from_json(self._post("/search", body))

    def recommend(
        self,
        history: Sequence[str] | None = None,
        k: int = 10,
        user_id: str | None = None,
        deadline_ms: int | None = None,
        **options,
    ) -> RankResult:
        """The ``k`` best items for a user: from the items in ``history`` (excluded from the
        answer) and/or a ``user_id`` the model knows (the server needs one of them);
        ``options`` as :meth:`search`'s."""
        body = {"k": k, **_context(user_id, history, deadline_ms), **options}
        return RankResult.from_json(self._post("/recommend", body))

    def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200 (one attempt, no retries)."""
        try:
            with urllib.request.urlopen(
                self._request("GET", "/readyz", None), timeout=self.timeout_s
            ) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, body: dict | None) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **self.headers}
        if data is not None:
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.url + path, data=data, method=method, headers=headers)

    def _post(self, path: str, body: dict) -> dict:
        self.waits = []
        attempt = 0
        while True:
            try:
                return self._once(path, body)
            except (UnavailableError, TransportError) as exc:
                if attempt >= self.retries:
                    raise
                hint = exc.retry_after_s if isinstance(exc, UnavailableError) else None
                wait = hint if hint is not None else self.backoff_s * 2**attempt
                wait = min(wait, self.max_retry_wait_s)
                self.waits.append(wait)
                self._sleep(wait)
                attempt += 1

    def _once(self, path: str, body: dict) -> dict:
        request = self._request("POST", path, body)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._api_error(exc) from None
        except TimeoutError as exc:
            raise TransportError(
                f"{request.full_url}: no answer within {self.timeout_s} s"
            ) from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise TransportError(
                    f"{request.full_url}: no answer within {self.timeout_s} s"
                ) from exc
            raise TransportError(f"{request.full_url}: {reason}") from exc
        except (OSError, http.client.HTTPException) as exc:  # reset, cut short, not HTTP
            raise TransportError(f"{request.full_url}: {exc!r}") from exc
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise ProtocolError(f"{request.full_url}: not JSON: {raw[:200]!r}") from None
        if not isinstance(parsed, dict):
            raise ProtocolError(f"{request.full_url}: not a JSON object: {raw[:200]!r}")
        return parsed

    def _api_error(self, exc: urllib.error.HTTPError) -> ApiError:
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        text = raw.decode(errors="replace")
        body: dict | str = text
        message, details = text.strip()[:500] or (exc.reason or ""), []
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            body = parsed
            error = parsed.get("error")
            if isinstance(error, dict):
                message = str(error.get("message", message))
                details = list(error.get("details") or [])
            elif "detail" in parsed:  # a framework's own refusal
                message = str(parsed["detail"])
        cls = UnavailableError if exc.code in RETRY_STATUSES else ApiError
        return cls(
            status=exc.code,
            message=str(message),
            details=details,
            body=body,
            retry_after_s=retry_after_seconds(
                exc.headers.get("Retry-After") if exc.headers else None
            ),
            url=exc.url or "",
        )


def _context(user_id: str | None, history: Sequence[str] | None, deadline_ms: int | None) -> dict:
    body: dict = {}
    if user_id is not None:
        body["user_id"] = user_id
    if history is not None:
        if isinstance(history, str):
            raise TypeError("history: a sequence of item ids, not one string")
        body["history"] = list(history)
    if deadline_ms is not None:
        body["deadline_ms"] = deadline_ms
    return body
