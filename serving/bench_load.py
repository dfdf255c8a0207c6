"""The load generator of ``kuberank bench``: request bodies (:func:`bench_queries`,
:func:`request_factory`) and :func:`run_load`, one :class:`Level` of closed-loop clients or
open-loop (Poisson) arrivals over kept-alive HTTP/1.1 connections -> latency percentiles, QPS
and errors by status (:func:`stats`). :func:`split_cpus` and :func:`pinned` give the served app
and the generator cores of their own."""

import asyncio
import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from kuberank.errors import KuberankError
from kuberank.progress import bar

HOST = "127.0.0.1"
P99_BUDGET_S = 0.050
REQUEST_TIMEOUT_S = 10.0  # a request of the load generator past this counts as an error (599)
# open loop: connections at once, as a client's keep-alive pool; later arrivals wait for one
# (their latency still counts from the scheduled time). Without a cap, a backlog turned every
# late arrival into a new connection, and the connection set-ups alone kept the server behind:
# measured at 1600 req/s on 2 cores, 1421 req/s at p99 750 ms with 1024, 1576 at p99 89 with 128
MAX_CONNECTIONS = 128
_WORDS = (
    "library",
    "catalog",
    "information",
    "retrieval",
    "indexing",
    "science",
    "search",
    "classification",
    "documents",
    "citation",
    "journal",
    "research",
    "computer",
    "language",
    "users",
    "query",
    "evaluation",
    "relevance",
    "system",
    "automatic",
    "medical",
    "history",
    "education",
    "public",
    "university",
    "analysis",
    "data",
    "storage",
    "book",
    "abstract",
)


def bench_queries(count: int = 200, seed: int = 0) -> list[str]:
    """``count`` short distinct queries (two or three words)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        words = rng.sample(_WORDS, rng.choice((2, 3)))
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


# cores the load generator gets of its own (0: it shares every core with the served app)
GENERATOR_CPUS_ENV = "KUBERANK_BENCH_GENERATOR_CPUS"


def split_cpus(
    cpus: Iterable[int], generator: int | None = None
) -> tuple[set[int], set[int]] | None:
    """(the served app's cores, the load generator's): the generator gets the last
    ``generator`` of ``cpus`` (default: a quarter, at least one) and the app the rest, so that
    what is measured is the app, not the generator's share of the same cores. None (both
    share every core) for one core or ``generator`` 0."""
    cpus = sorted(set(cpus))
    if generator is None:
        generator = max(1, len(cpus) // 4)
    if generator < 0:
        raise KuberankError(f"{GENERATOR_CPUS_ENV}: {generator} cores; need 0 or more")
    if generator == 0 or len(cpus) < 2:
        return None
    if generator >= len(cpus):
        raise KuberankError(
            f"{GENERATOR_CPUS_ENV}: {generator} cores for the load generator leaves none of "
            f"the {len(cpus)} for the app"
        )
    return set(cpus[:-generator]), set(cpus[-generator:])


def generator_split() -> tuple[set[int], set[int]] | None:
    """:func:`split_cpus` of this thread's cores, the generator's share from
    ``KUBERANK_BENCH_GENERATOR_CPUS`` when set."""
    if not hasattr(os, "sched_getaffinity"):
        return None  # not Linux: no affinity to split
    raw = os.environ.get(GENERATOR_CPUS_ENV, "").strip()
    try:
        generator = int(raw) if raw else None
    except ValueError:
        raise KuberankError(f"{GENERATOR_CPUS_ENV}: {raw!r} is not a number of cores") from None
    return split_cpus(os.sched_getaffinity(0), generator)


@contextlib.contextmanager
def pinned(cpus: set[int] | None):
    """The block runs with this thread on ``cpus`` (what it starts, processes and threads,
    inherits them: Ray's raylet and workers, HAProxy, hey); the thread's cores are restored
    after. ``None``: unchanged."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def started_apart(app, split: tuple[set[int], set[int]] | None):
    """Enter ``app`` (a context manager: the served app, e.g. ``LocalServing``) on the app's
    cores of ``split`` (what it starts inherits them), then run the block on the load
    generator's cores; yields what ``app`` yields. The thread's cores are restored after, and
    ``app`` is left after the block. ``split`` None: both share every core."""
    app_cpus, generator_cpus = split or (None, None)
    with contextlib.ExitStack() as stack:
        with pinned(app_cpus):
            running = stack.enter_context(app)
        stack.enter_context(pinned(generator_cpus))
        yield running


def cores_note(split: tuple[set[int], set[int]] | None) -> dict | None:
    """A result's record of :func:`split_cpus` (its ``cores``): ``{"app": [...],
    "generator": [...]}``, None where both share every core."""
    return {"app": sorted(split[0]), "generator": sorted(split[1])} if split else None


def cores_line(note: dict | None, generator: str = "load generator") -> str:
    """How a report names :func:`cores_note`'s record."""
    if not note:
        return f"app and {generator} share every core"
    return f"app on cores {note['app']}, {generator} on {note['generator']}"


@dataclass
class Level:
    mode: str  # "closed" | "open"
    value: float  # concurrency or rate (requests per second)
    requests: int
    max_seconds: float


def percentile_ms(seconds, p: float) -> float | None:
    """The ``p``-th percentile of latencies in seconds, in milliseconds (None for none)."""
    return round(float(np.percentile(seconds, p)) * 1000, 2) if len(seconds) else None


def stats(latencies: list[float], statuses: list[int], seconds: float, level: Level) -> dict:
    ok = np.array([s for s, st in zip(latencies, statuses, strict=True) if st == 200])
    errors: dict[str, int] = {}
    for st in statuses:
        if st != 200:
            errors[str(st)] = errors.get(str(st), 0) + 1

    def q(p):
        return percentile_ms(ok, p)

    shed = np.array([s for s, st in zip(latencies, statuses, strict=True) if st == 503])
    return {
        "mode": level.mode,
        "level": level.value,
        "requests": len(statuses),
        "ok": int(len(ok)),
        # the 503s (admission's fast refusals) and how fast they came
        "shed": int(len(shed)),
        "shed_p50_ms": percentile_ms(shed, 50),
        "shed_p99_ms": percentile_ms(shed, 99),
        "errors": errors,
        "error_rate": round(1 - len(ok) / max(1, len(statuses)), 4),
        "seconds": round(seconds, 3),
        "qps": round(len(ok) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": q(50),
        "p95_ms": q(95),
        "p99_ms": q(99),
        "max_ms": round(float(ok.max()) * 1000, 2) if len(ok) else None,
    }


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the load generator. Responses are parsed by
    httptools (llhttp, the parser uvicorn uses), so a client costs the machine far less CPU than
    a general-purpose client would: on a small machine the load generator shares the cores
    with the server it measures."""

    def __init__(self):
        import httptools  # local: the CLI's parser imports this module (see tests/test_layers.py)

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.keep_alive = True
        self.body: bytearray | None = None  # the response's body, when send keeps it

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # httptools.HttpParserError: a malformed response
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))

    def connection_lost(self, exc):
        self.transport = None
        self._fail(ConnectionError("connection closed"))

    # httptools callbacks
    def on_body(self, chunk: bytes):
        if self.body is not None:
            self.body += chunk

    def on_message_complete(self):
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.get_status_code())

    def _fail(self, exc: Exception):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    @property
    def usable(self) -> bool:
        return self.transport is not None and self.keep_alive

    async def send(self, raw: bytes, keep_body: bool = False) -> int:
        """The response's status (its body in :attr:`body` when ``keep_body``)."""
        self.body = bytearray() if keep_body else None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def close(self):
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def _raw_request(host: str, port: int, path: str, body: dict | None) -> bytes:
    head = f"Host: {host}:{port}\r\nUser-Agent: kuberank-bench\r\n"
    if body is None:
        return f"GET {path} HTTP/1.1\r\n{head}\r\n".encode()
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def _load(
    urls: list[str],
    make_body: Callable[[int], dict] | None,
    level: Level,
    pause_s: float = 0.0,
    answer: Callable[[int, bytes], str] | None = None,
) -> tuple[list[float], list, float]:
    targets = []
    for url in urls:
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        targets.append((parts.hostname, parts.port or 80, path))
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    statuses: list[int] = []
    idle: list[list[_Connection]] = [[] for _ in targets]  # keep-alive connections not in use
    opened: list[_Connection] = []
    # at most this many connections at once (a closed loop needs one per client)
    slots = asyncio.Semaphore(int(level.value) if level.mode == "closed" else MAX_CONNECTIONS)

    async def one(i: int, scheduled: float, t: int) -> None:
        host, port, path = targets[t]
        raw = _raw_request(host, port, path, None if make_body is None else make_body(i))
        conn = None
        try:
            # the timeout counts from the scheduled send, a wait for a free connection included
            async with asyncio.timeout(REQUEST_TIMEOUT_S - (time.perf_counter() - scheduled)):
                async with slots:
                    try:
                        conn = idle[t].pop() if idle[t] else None
                        if conn is None or not conn.usable:
                            _, conn = await loop.create_connection(_Connection, host, port)
                            opened.append(conn)
                        status = await conn.send(raw, keep_body=answer is not None)
                        if answer is not None:
                            status = answer(status, bytes(conn.body))
                    except BaseException:
                        if conn is not None:
                            conn.close()
                        conn = None
                        raise
                    if conn.usable:
                        idle[t].append(conn)
        except (TimeoutError, OSError):
            status = 599 if answer is None else "599"
        latencies.append(time.perf_counter() - scheduled)
        statuses.append(status)

    try:
        if level.mode == "open":
            # a keep-alive pool opened before the clock starts, as a client service keeps one:
            # enough connections for the arrivals of one latency budget
            want = min(MAX_CONNECTIONS, max(8, math.ceil(level.value * P99_BUDGET_S)))
            for n in range(want):
                host, port, _ = targets[n % len(targets)]
                try:
                    _, conn = await loop.create_connection(_Connection, host, port)
                except OSError:
                    break  # the requests will find out and count it
                opened.append(conn)
                idle[n % len(targets)].append(conn)
        started = time.perf_counter()
        deadline = started + level.max_seconds
        if level.mode == "closed":
            counter = iter(range(level.requests))

            async def client(t: int) -> None:  # each client keeps to one target
                for i in counter:
                    if time.perf_counter() >= deadline:
                        return
                    await one(i, time.perf_counter(), t)
                    if pause_s:
                        await asyncio.sleep(pause_s)

            clients = int(level.value)
            await asyncio.gather(*(client(c % len(targets)) for c in range(clients)))
        else:
            # Poisson arrivals (seeded): exponential gaps at the mean rate, as independent
            # users send; a strictly periodic stream would flatter the tail
            gaps = random.Random(0)
            tasks = []
            scheduled = started
            for i in range(level.requests):
                if i:
                    scheduled += gaps.expovariate(level.value)
                if scheduled >= deadline:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, scheduled, i % len(targets))))
            await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
    finally:
        for conn in opened:
            conn.close()
    return latencies, statuses, seconds


def _targets(url: str | list[str]) -> list[str]:
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise KuberankError("bench: no target URL")
    for one in urls:
        if not one.startswith(f"http://{HOST}:"):
            raise KuberankError(f"bench: only loopback targets (http://{HOST}:PORT), got {one}")
    return urls


def run_load(url: str | list[str], make_body: Callable[[int], dict] | None, level: Level) -> dict:
    """One load level against ``url`` (POST JSON; GET when ``make_body`` is None); bounded by
    ``level.requests`` and ``level.max_seconds`` (plus the 10 s timeout of the requests in
    flight). Several URLs (the replicas of one app) share the load as a Kubernetes Service
    would: each closed-loop client keeps to one of them, open-loop arrivals go round-robin."""
    latencies, statuses, seconds = asyncio.run(_load(_targets(url), make_body, level))
    return stats(latencies, statuses, seconds, level)


def run_samples(
    url: str | list[str],
    make_body: Callable[[int], dict] | None,
    level: Level,
    pause_s: float = 0.0,
    answer: Callable[[int, bytes], str] | None = None,
) -> list[tuple[int | str, float]]:
    """:func:`run_load`'s requests one by one: (status, seconds) in the order they ended
    (599: the generator's timeout, a refused, closed or malformed connection). ``pause_s``:
    each closed-loop client waits this long between its requests. ``answer``: (status, body)
    of an answered request -> the name it is given in place of its status (``"599"`` for the
    rest)."""
    latencies, statuses, _ = asyncio.run(
        _load(_targets(url), make_body, level, pause_s=pause_s, answer=answer)
    )
    return list(zip(statuses, latencies, strict=True))


def sweep(
    name: str, url: str | list[str], make_body, levels: list[Level], warmup: int = 20
) -> list[dict]:
    if warmup:  # at least one client per replica, so that none is measured cold
        replicas = 1 if isinstance(url, str) else len(url)
        run_load(url, make_body, Level("closed", max(4, replicas), max(warmup, 5 * replicas), 30))
    out = []
    for level in bar(levels, desc=f"bench {name}", unit="level"):
        out.append({"target": name, **run_load(url, make_body, level)})
    return out


def request_factory(kind: str, ids: list[str], queries: list[str], k: int = 10, seed: int = 0):
    """Request bodies: search queries, or recommendation histories of 5-20 index items."""
    rng = random.Random(seed)
    if kind == "recommendation":
        histories = [
            rng.sample(ids, min(len(ids), rng.randint(5, 20))) for _ in range(len(queries))
        ]
        return "/recommend", lambda i: {"history": histories[i % len(histories)], "k": k}
    return "/search", lambda i: {"query": queries[i % len(queries)], "k": k}
