"""``kuberank bench``: load benchmark of the ranking app against its baselines, loopback only.

One run compares, on the same machine and in the same run (so only ratios are meaningful):

(a) ``kuberank-triton``  Ray Serve app + the bundled tritonserver (query encoder over gRPC)
(b) ``kuberank-onnx``    Ray Serve app, queries encoded in process by ONNX Runtime (int8)
(c) ``naive``            one FastAPI/uvicorn process, transformers fp32 per request
(d) ``limit``            the raw model's batched throughput in process (encode + retrieve +
                         rank in batches, no HTTP): the ceiling
and ``bare-triton``      the Triton ensemble alone over gRPC (the best serving peer measured
                         in the issue), when (a) runs, and ``serve-floor``: GET /healthz on
                         the Ingress with no model work, straight to the replica (direct
                         ingress) and through Serve's proxy: the ceiling of each HTTP path.

(a) and (b) run with the launcher's ``ingress`` (default ``direct``: the Ingress replica serves
HTTP itself; ``proxy``: through Serve's proxy actor, see kuberank.serving.launcher).

Load: closed loop (``concurrency`` clients, each sends its next request when the last one
answers) or open loop (Poisson arrivals at a fixed mean ``rate``; latency counted from the
scheduled send time, so a slow server is not flattered by coordinated omission). Every level is bounded by a
request count and a time limit. Results: p50/p95/p99/max latency, QPS, errors by status; a
JSON document and a PNG of latency versus achieved throughput.

A closed loop throttles itself: a client waits for its answer, so a server's hiccup delays the
next arrivals instead of piling them up. ``open_at`` adds, after the closed-loop levels,
fixed-rate levels at fractions of (d): the rate the app *sustains* at p99 <= budget when
arrivals do not wait for it, which is what a service behind a load balancer sees.

Pure core: :func:`run_load` (a request factory + a level -> stats), :func:`summarize`
(targets and ratios), :func:`format_table`; :func:`serve_and_bench` starts the targets one
after another and measures them (what ``kuberank bench`` and ``make demo`` call).
"""

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kuberank.errors import KuberankError
from kuberank.progress import bar
from kuberank.serving.launcher import DEFAULT_INGRESS

HOST = "127.0.0.1"
KUBERANK_TARGETS = ("kuberank-triton", "kuberank-onnx")
TARGETS = (*KUBERANK_TARGETS, "naive", "limit")
P99_BUDGET_S = 0.050
REQUEST_TIMEOUT_S = 10.0  # a request of the load generator past this counts as an error (599)
# a fixed-rate level of serve_and_bench's open_at lasts at least this long: one stall of a small
# machine decides the p99 of a shorter one
OPEN_MIN_SECONDS = 4.0
CONCURRENCY_LEVELS = (1, 8, 16, 32)  # closed-loop clients per level, by default
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


@dataclass
class Level:
    mode: str  # "closed" | "open"
    value: float  # concurrency or rate (requests per second)
    requests: int
    max_seconds: float


def stats(latencies: list[float], statuses: list[int], seconds: float, level: Level) -> dict:
    ok = np.array([s for s, st in zip(latencies, statuses, strict=True) if st == 200])
    errors: dict[str, int] = {}
    for st in statuses:
        if st != 200:
            errors[str(st)] = errors.get(str(st), 0) + 1

    def q(p):
        return round(float(np.percentile(ok, p)) * 1000, 2) if len(ok) else None

    shed = np.array([s for s, st in zip(latencies, statuses, strict=True) if st == 503])
    return {
        "mode": level.mode,
        "level": level.value,
        "requests": len(statuses),
        "ok": int(len(ok)),
        # the 503s (admission's fast refusals) and how fast they came
        "shed": int(len(shed)),
        "shed_p50_ms": round(float(np.percentile(shed, 50)) * 1000, 2) if len(shed) else None,
        "shed_p99_ms": round(float(np.percentile(shed, 99)) * 1000, 2) if len(shed) else None,
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
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.keep_alive = True

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

    async def send(self, raw: bytes) -> int:
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


async def _load(urls: list[str], make_body: Callable[[int], dict] | None, level: Level) -> dict:
    from urllib.parse import urlsplit

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
                        status = await conn.send(raw)
                    except BaseException:
                        if conn is not None:
                            conn.close()
                        conn = None
                        raise
                    if conn.usable:
                        idle[t].append(conn)
        except (TimeoutError, OSError):
            status = 599
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
    return stats(latencies, statuses, seconds, level)


def run_load(url: str | list[str], make_body: Callable[[int], dict] | None, level: Level) -> dict:
    """One load level against ``url`` (POST JSON; GET when ``make_body`` is None); bounded by
    ``level.requests`` and ``level.max_seconds`` (plus the 10 s timeout of the requests in
    flight). Several URLs (the replicas of one app) share the load as a Kubernetes Service
    would: each closed-loop client keeps to one of them, open-loop arrivals go round-robin."""
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise KuberankError("bench: no target URL")
    for one in urls:
        if not one.startswith(f"http://{HOST}:"):
            raise KuberankError(f"bench: only loopback targets (http://{HOST}:PORT), got {one}")
    return asyncio.run(_load(urls, make_body, level))


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


# --------------------------------------------------------------------------- targets


def request_factory(kind: str, ids: list[str], queries: list[str], k: int = 10, seed: int = 0):
    """Request bodies: search queries, or recommendation histories of 5-20 index items."""
    rng = random.Random(seed)
    if kind == "recommendation":
        histories = [
            rng.sample(ids, min(len(ids), rng.randint(5, 20))) for _ in range(len(queries))
        ]
        return "/recommend", lambda i: {"history": histories[i % len(histories)], "k": k}
    return "/search", lambda i: {"query": queries[i % len(queries)], "k": k}


def in_process_limit(
    store: str,
    queries: list[str],
    batch_size: int = 32,
    precision: str = "int8",
    candidates: int = 100,
    k: int = 10,
    seconds: float = 5.0,
    streams: int = 1,
    threads: int = 0,
    retrieval: str = "dense",
) -> dict:
    """(d) in one configuration: the app's own batch step (``Pipeline.run``: encode + retrieve
    + rank) in this process, no serving, ``streams`` threads each running its own batches on one
    shared session with ``threads`` ONNX Runtime intra-op threads (0 = the cores shared among
    the streams): queries per second over ``seconds`` (at least one pass over ``queries``),
    after one untimed pass that warms ONNX Runtime up. ``retrieval``: the requests' (dense,
    bm25, hybrid; serving/hybrid.py); ``stage_ms``: each stage's mean milliseconds per query
    (``lexical`` is a part of ``retrieve``)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import PipelineRequest, load_pipeline
    from kuberank.serving.settings import Settings

    encoding = QueryEncoding("", Settings(onnx_precision=precision, onnx_threads=threads), streams)
    pipe = load_pipeline(store, encoding)
    intra = encoding.onnx_threads()
    totals: dict[str, float] = {}
    lock = threading.Lock()

    def one_batch(start: int) -> None:
        texts = [queries[(start + j) % len(queries)] for j in range(batch_size)]
        reqs = [PipelineRequest(t, [], None, k, False, retrieval=retrieval) for t in texts]
        results, timings = pipe.run(reqs, None, candidates, 5000)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        with lock:
            for stage, seconds in timings.items():
                totals[stage] = totals.get(stage, 0.0) + seconds

    def stream(n: int, started: float) -> int:
        # BLAS and OpenMP pools of one thread, as in the app's replicas (settings.STAGE_ENV); the
        # OpenMP limit is per thread, so each stream sets it
        with threadpool_limits(limits=1):
            done, offset = 0, n * len(queries) // streams
            while done * streams < len(queries) or time.perf_counter() - started < seconds:
                one_batch(offset + done)
                done += batch_size
            return done

    with threadpool_limits(limits=1):
        for start in range(0, len(queries), batch_size):  # warm-up, untimed
            one_batch(start)
    totals.clear()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        started = time.perf_counter()
        runs = [pool.submit(stream, n, started) for n in range(streams)]
        counts = [run.result() for run in runs]  # a stream's failure is raised here
        elapsed = time.perf_counter() - started
    done = sum(counts)
    return {
        "target": "limit",
        "mode": "batched",
        "level": batch_size,
        "streams": streams,
        "onnx_threads": intra,
        "retrieval": retrieval,
        "stage_ms": {stage: round(t * 1000 / done, 3) for stage, t in totals.items()},
        "requests": done,
        "ok": done,
        "errors": {},
        "error_rate": 0.0,
        "seconds": round(elapsed, 3),
        "qps": round(done / elapsed, 1),
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "max_ms": None,
    }


def best_in_process_limit(store: str, queries: list[str], seconds: float = 10.0, **kw) -> dict:
    """(d), the limit: the faster of one batch at a time on every core and one batch per core
    side by side (one intra-op thread each), so the app is compared with the best the model
    does in this process, whichever way the app runs it. The other one is kept under
    ``other``."""
    from kuberank.serving.settings import usable_cores

    cores = usable_cores()
    tried = [in_process_limit(store, queries, seconds=seconds / 2, streams=1, **kw)]
    if cores > 1:
        tried.append(in_process_limit(store, queries, seconds=seconds / 2, streams=cores, **kw))
    tried.sort(key=lambda r: r["qps"], reverse=True)
    best = dict(tried[0])
    best["other"] = [{key: r[key] for key in ("streams", "onnx_threads", "qps")} for r in tried[1:]]
    return best


def bare_triton(
    grpc_url: str,
    queries: list[str],
    concurrency: int,
    requests: int,
    max_seconds: float,
    model: str = "query_encoder",
) -> dict:
    """The Triton ensemble alone (closed loop over gRPC): the serving peer to compare with."""
    import tritonclient.grpc.aio as grpcclient

    async def main() -> dict:
        client = grpcclient.InferenceServerClient(grpc_url)
        latencies, statuses = [], []
        counter = iter(range(requests))
        started = time.perf_counter()
        deadline = started + max_seconds

        async def worker():
            for i in counter:
                if time.perf_counter() >= deadline:
                    return
                data = np.array([queries[i % len(queries)].encode()], dtype=object).reshape(1, 1)
                text = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
                text.set_data_from_numpy(data)
                t = time.perf_counter()
                try:
                    await client.infer(model, [text], client_timeout=10)
                    statuses.append(200)
                except Exception:
                    statuses.append(599)
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        await client.close()
        return stats(
            latencies, statuses, seconds, Level("closed", concurrency, requests, max_seconds)
        )

    return {"target": "bare-triton", **asyncio.run(main())}


def _wait_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    from kuberank.serving.launcher import http_json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise KuberankError(f"naive server exited with code {process.returncode}")
        try:
            if http_json("GET", url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise KuberankError(f"naive server not ready at {url} after {timeout:.0f}s")


def naive_model_dir(store: str, manifest: dict) -> str:
    """The transformers model of the store (the export's source) or the base MiniLM."""
    source = (manifest.get("model") or {}).get("source")
    if source and Path(source, "config.json").is_file():
        return source
    from kuberank.config import base_model_path

    return base_model_path()


# --------------------------------------------------------------------------- summary


def best_under(results: list[dict], p99_ms: float) -> dict | None:
    """The highest-QPS level whose p99 is within ``p99_ms`` and that had no errors."""
    good = [
        r
        for r in results
        if r.get("p99_ms") is not None and r["p99_ms"] <= p99_ms and r["error_rate"] == 0
    ]
    return max(good, key=lambda r: r["qps"]) if good else None


def _best_kuberank(results: dict[str, list[dict]], p99_ms: float, mode: str | None = None):
    best = None
    for name in KUBERANK_TARGETS:
        rows = [r for r in results.get(name, []) if mode is None or r.get("mode") == mode]
        level = best_under(rows, p99_ms)
        if level and (best is None or level["qps"] > best["qps"]):
            best = {**level, "target": name}
    return best


def summarize(results: dict[str, list[dict]], p99_budget_ms: float = P99_BUDGET_S * 1000) -> dict:
    """Targets of the issue: (a) or (b) sustains >= 50% of (d) with p99 <= budget, and >= 5x
    (c)'s throughput at the same p99; and how far the best kuberank is from bare Triton. Open-
    loop levels, when there are any, also give ``open_best``: the highest fixed rate held within
    the budget, and ``open_vs_limit``."""
    limit_row = (results.get("limit") or [{}])[0]
    limit = limit_row.get("qps")
    best = _best_kuberank(results, p99_budget_ms)
    out: dict = {"p99_budget_ms": p99_budget_ms, "limit_qps": limit, "best": best}
    opened = [
        r for name in KUBERANK_TARGETS for r in results.get(name, []) if r.get("mode") == "open"
    ]
    if opened:
        held = _best_kuberank(results, p99_budget_ms, mode="open")
        out["open_rates"] = sorted({r["level"] for r in opened})
        out["open_best"] = held
        out["open_vs_limit"] = round(held["qps"] / limit, 3) if held and limit else None
    if limit_row.get("streams"):
        out["limit_how"] = (
            f"{limit_row['streams']} batch stream(s) x {limit_row['onnx_threads']} ONNX thread(s)"
        )
    fastest = [
        {**r, "target": name}
        for name in KUBERANK_TARGETS
        for r in results.get(name, [])
        if r.get("error_rate") == 0 and r.get("qps")
    ]
    out["fastest"] = max(fastest, key=lambda r: r["qps"]) if fastest else None
    if best:
        naive = best_under(results.get("naive", []), max(best["p99_ms"], p99_budget_ms))
        naive_any = max((r["qps"] for r in results.get("naive", [])), default=None)
        out["naive_qps_same_p99"] = naive["qps"] if naive else None
        out["naive_best_qps"] = naive_any
        out["vs_limit"] = round(best["qps"] / limit, 3) if limit else None
        base = naive["qps"] if naive else naive_any
        out["vs_naive"] = round(best["qps"] / base, 2) if base else None
        out["target_half_of_limit"] = bool(limit and best["qps"] >= 0.5 * limit)
        out["target_5x_naive"] = bool(base and best["qps"] >= 5 * base)
    floor = results.get("serve-floor")
    if floor:
        out["serve_floor_qps"] = {r.get("via", "proxy"): r["qps"] for r in floor}
    peer = results.get("bare-triton")
    if peer:
        p = max(peer, key=lambda r: r["qps"])
        out["bare_triton_qps"] = p["qps"]
        out["bare_triton_p99_ms"] = p["p99_ms"]
        if best:
            out["vs_bare_triton"] = round(best["qps"] / p["qps"], 3) if p["qps"] else None
        if out["fastest"]:
            out["fastest_vs_bare_triton"] = (
                round(out["fastest"]["qps"] / p["qps"], 3) if p["qps"] else None
            )
    return out


def _gap(peer_qps: float, qps: float) -> str:
    gap = round(peer_qps - qps, 1)
    return f"{gap} req/s behind" if gap >= 0 else f"{-gap} req/s ahead"


def format_table(result: dict) -> str:
    """A markdown latency table of a :func:`serve_and_bench` result, then the verdicts."""
    cols = (
        "target",
        "mode",
        "level",
        "requests",
        "qps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "error_rate",
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rows in result["results"].values():
        for r in rows:
            lines.append(
                "| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |"
            )
    s = result.get("summary") or {}
    if s.get("best"):
        b = s["best"]
        lines.append("")
        lines.append(
            f"best kuberank under p99 <= {s['p99_budget_ms']:.0f} ms: {b['target']} "
            f"{b['qps']} req/s (p99 {b['p99_ms']} ms) at {b['mode']} {b['level']}"
        )
        if s.get("vs_limit") is not None:
            lines.append(
                f"  vs in-process batched limit {s['limit_qps']} q/s"
                + (f" ({s['limit_how']})" if s.get("limit_how") else "")
                + f": {s['vs_limit']:.0%} "
                f"(target >= 50%: {'met' if s['target_half_of_limit'] else 'NOT met'})"
            )
        if s.get("vs_naive") is not None:
            lines.append(
                f"  vs naive FastAPI+PyTorch: {s['vs_naive']}x "
                f"(target >= 5x: {'met' if s['target_5x_naive'] else 'NOT met'})"
            )
        if s.get("vs_bare_triton") is not None:
            lines.append(
                f"  vs bare Triton ensemble {s['bare_triton_qps']} req/s (p99 "
                f"{s['bare_triton_p99_ms']} ms): {s['vs_bare_triton']:.0%} of it "
                f"({_gap(s['bare_triton_qps'], b['qps'])})"
            )
    if s.get("open_rates"):
        rates = ", ".join(f"{r:g}" for r in s["open_rates"])
        held = s.get("open_best")
        if held:
            share = f" = {s['open_vs_limit']:.0%} of the limit" if s.get("open_vs_limit") else ""
            verdict = f"{held['target']} holds {held['qps']} req/s{share} (p99 {held['p99_ms']} ms)"
        else:
            verdict = f"no rate held p99 <= {s['p99_budget_ms']:.0f} ms without errors"
        lines.append(f"  open loop (fixed rate, tried {rates} req/s): {verdict}")
    if s.get("serve_floor_qps") and result["results"]:
        paths = ", ".join(f"{via} {qps} req/s" for via, qps in s["serve_floor_qps"].items())
        lines.append(
            f"  Ray Serve HTTP floor (GET /healthz on the Ingress, no model work): {paths}"
        )
    if not s.get("best") and result["results"]:
        lines.append(
            f"\nno kuberank level met p99 <= {s.get('p99_budget_ms', 50):.0f} ms without errors"
        )
    f = s.get("fastest")
    if f and f is not s.get("best") and f != s.get("best"):
        lines.append(
            f"fastest kuberank level: {f['target']} {f['qps']} req/s (p99 {f['p99_ms']} ms) "
            f"at {f['mode']} {f['level']}"
        )
        if s.get("limit_qps"):
            lines.append(
                f"  {f['qps'] / s['limit_qps']:.0%} of the in-process limit {s['limit_qps']} q/s"
            )
        if s.get("fastest_vs_bare_triton") is not None:
            lines.append(
                f"  {s['fastest_vs_bare_triton']:.0%} of bare Triton {s['bare_triton_qps']} req/s "
                f"(p99 {s['bare_triton_p99_ms']} ms), {_gap(s['bare_triton_qps'], f['qps'])}"
            )
    return "\n".join(lines)


def plot(result: dict, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in result["results"].items():
        for mode in ("closed", "open"):
            series = sorted(
                (r for r in rows if r.get("p99_ms") is not None and r.get("mode") == mode),
                key=lambda r: r["qps"],
            )
            if not series:
                continue
            label = name if mode == "closed" else f"{name} (fixed rate)"
            qps = [r["qps"] for r in series]
            ax.plot(qps, [r["p99_ms"] for r in series], "o-", label=f"{label} p99")
            ax.plot(qps, [r["p50_ms"] for r in series], "x--", alpha=0.5, label=f"{label} p50")
    limit = (result.get("summary") or {}).get("limit_qps")
    if limit:
        ax.axvline(limit, color="grey", linestyle=":", label=f"in-process limit {limit:.0f} q/s")
    ax.axhline(P99_BUDGET_S * 1000, color="red", linestyle=":", linewidth=0.8, label="p99 budget")
    ax.set_xlabel("achieved throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("kuberank: latency versus load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the run


def serve_and_bench(
    store: str,
    *,
    targets: tuple[str, ...] = TARGETS,
    mode: str = "closed",
    levels: tuple[float, ...] = CONCURRENCY_LEVELS,
    requests: int = 200,
    max_seconds: float = 15.0,
    queries: int = 200,
    out_dir: str | os.PathLike | None = None,
    settings: dict | None = None,
    model_dir: str | None = None,
    ingress: str = DEFAULT_INGRESS,
    open_at: tuple[float, ...] = (),
    ingress_replicas: int = 0,
) -> dict:
    """Start each target in turn on 127.0.0.1, load it at each level, stop it; return
    ``{"config", "results": {target: [level stats]}, "summary", "plot"?}``. The demo calls this
    and prints :func:`format_table` of the result.

    ``open_at``: fractions of (d); after its closed-loop levels each kuberank target also gets
    fixed-rate levels at these fractions of the limit, which is then measured first."""
    from kuberank.serving.launcher import LocalServing
    from kuberank.serving.loading import load_checked_index

    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise KuberankError(f"bench: unknown targets {sorted(unknown)}; choose from {TARGETS}")
    if mode not in ("closed", "open"):
        raise KuberankError(f"bench: mode {mode!r} is not 'closed' or 'open'")
    if requests < 1 or max_seconds <= 0 or not levels or min(levels) <= 0:
        raise KuberankError("bench: requests, max_seconds and every level must be positive")
    if open_at and (mode != "closed" or "limit" not in targets or min(open_at) <= 0):
        raise KuberankError(
            "bench: open_at (fractions of the in-process limit, each > 0) goes with closed-loop "
            "levels and the limit target"
        )
    store = str(store)
    manifest, index = load_checked_index(store)
    kind = index.meta.get("kind", "search")
    if open_at and kind != "search":
        raise KuberankError(
            "bench: open_at needs search traffic (the limit is measured on queries)"
        )
    texts = bench_queries(queries)
    route, make_body = request_factory(kind, index.ids, texts)
    plan = [Level(mode, float(v), requests, max_seconds) for v in levels]
    results: dict[str, list[dict]] = {}
    replicas = None  # Ingress replicas the kuberank targets ran with
    if "limit" in targets and kind == "search":  # first: the open-loop rates are shares of it
        results["limit"] = [best_in_process_limit(store, texts, seconds=min(max_seconds, 10.0))]
    open_plan = []
    for share in open_at:  # each fixed rate runs at least OPEN_MIN_SECONDS (bounded as ever)
        rate = round(share * results["limit"][0]["qps"], 1)
        count = max(requests, math.ceil(rate * OPEN_MIN_SECONDS))
        open_plan.append(Level("open", rate, count, max_seconds))
    for name in KUBERANK_TARGETS:
        if name not in targets:
            continue
        with LocalServing(
            store,
            use_triton=name == "kuberank-triton",
            settings=settings,
            ingress=ingress,
            ingress_replicas=ingress_replicas,
            restart_ray=True,  # the demo calls this after training on a Ray cluster of its own
        ) as running:
            replicas = len(running.urls)
            endpoints = [url + route for url in running.endpoints]  # the front, or each replica
            results[name] = sweep(name, endpoints, make_body, plan)
            if open_plan:
                results[name] += sweep(name, endpoints, make_body, open_plan, warmup=0)
            if "serve-floor" not in results:  # the HTTP paths to the Ingress, no model work
                top = Level(
                    "closed", max(levels) if mode == "closed" else 32, requests, max_seconds
                )
                paths = {ingress: running.endpoints}
                if ingress == "haproxy":  # the replicas without the front
                    paths["direct"] = running.urls
                if running.proxy_url != running.url:
                    paths["proxy"] = [running.proxy_url]
                results["serve-floor"] = [
                    {
                        "target": f"serve-floor-{via}",
                        "via": via,
                        **run_load([url + "/healthz" for url in urls], None, top),
                    }
                    for via, urls in paths.items()
                ]
            if running.triton is not None and kind == "search":
                top = int(max(levels)) if mode == "closed" else 32
                results["bare-triton"] = [
                    bare_triton(running.triton.grpc_url, texts, top, requests, max_seconds)
                ]
                from kuberank.serving.metrics import scrape, triton_summary

                results["kuberank-triton"][-1]["triton"] = triton_summary(
                    scrape(running.triton.metrics_url)
                )
    if "naive" in targets:
        if kind != "search":
            results["naive"] = []
        else:
            from kuberank.serving.triton import free_port

            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "kuberank.serving.naive_server",
                "--model",
                model_dir or naive_model_dir(store, manifest),
                "--store",
                store,
                "--port",
                str(port),
                "--max-length",
                str(manifest["embedding"]["max_length"]),
            ]
            env = {**os.environ, "KUBERANK_PROGRESS": "0"}
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                _wait_http(f"http://{HOST}:{port}/readyz", proc, 120)
                results["naive"] = sweep("naive", f"http://{HOST}:{port}/search", make_body, plan)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
    result = {
        "config": {
            "store": store,
            "kind": kind,
            "route": route,
            "mode": mode,
            "levels": list(levels),
            "requests_per_level": requests,
            "max_seconds_per_level": max_seconds,
            "queries": len(texts),
            "items": len(index),
            "model_version": manifest.get("version"),
            "cpus": os.cpu_count(),
            "ingress": ingress,
            "ingress_replicas": replicas,
            "open_at": list(open_at),
        },
        "results": results,
    }
    result["summary"] = summarize(results)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["plot"] = str(plot(result, out / "latency_vs_load.png"))
        (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- retrieval

RETRIEVAL_MODES = ("dense", "hybrid")
RETRIEVAL_LEVELS = (1, 8, 32)


def retrieval_cost(
    store: str,
    *,
    levels: tuple[int, ...] = RETRIEVAL_LEVELS,
    requests: int = 400,
    max_seconds: float = 10.0,
    queries: int = 200,
    limit_seconds: float = 5.0,
    settings: dict | None = None,
    rounds: int = 2,
) -> dict:
    """The lexical stage's cost (serving/hybrid.py): one store with a lexical index served once
    (``kuberank serve``'s defaults, in-process ONNX Runtime), loaded at each closed-loop level
    with the same queries asking ``retrieval: dense`` and then ``hybrid``; and the app's batch
    step in this process ((d), batches of 32, one stream) with each, with its stages' mean
    milliseconds per query. Each level runs ``rounds`` times in alternating order (dense,
    hybrid, hybrid, dense, ...) and keeps each mode's best round (most answers per second; all
    rounds under ``rounds``), so drift of a shared host weighs on both alike. ``ratios``:
    hybrid / dense of throughput and latency."""
    from kuberank.serving.hybrid import BUILD_HINT, load_stage
    from kuberank.serving.launcher import LocalServing
    from kuberank.serving.loading import load_checked_index

    store = str(store)
    _, index = load_checked_index(store)
    if load_stage(store, index.ids) is None:
        raise KuberankError(f"bench: {store} has no lexical index; {BUILD_HINT}")
    texts = bench_queries(queries)

    def body(mode: str):
        return lambda i: {"query": texts[i % len(texts)], "k": 10, "retrieval": mode}

    limit = {
        mode: in_process_limit(store, texts, seconds=limit_seconds, retrieval=mode)
        for mode in RETRIEVAL_MODES
    }
    served: dict[str, list[dict]] = {mode: [] for mode in RETRIEVAL_MODES}
    every: list[dict] = []
    with LocalServing(store, settings=settings, restart_ray=True) as running:
        endpoints = [url + "/search" for url in running.endpoints]
        for mode in RETRIEVAL_MODES:  # warm both paths up, untimed
            run_load(endpoints, body(mode), Level("closed", 4, 40, 30))
        for value in levels:  # each level: both modes, alternating, on the same warm app
            plan = Level("closed", float(value), requests, max_seconds)
            runs: dict[str, list[dict]] = {mode: [] for mode in RETRIEVAL_MODES}
            for n in range(max(1, rounds)):
                for mode in RETRIEVAL_MODES[:: 1 if n % 2 == 0 else -1]:
                    one = {"target": mode, "round": n, **run_load(endpoints, body(mode), plan)}
                    runs[mode].append(one)
                    every.append(one)
            for mode in RETRIEVAL_MODES:
                served[mode].append(max(runs[mode], key=lambda r: r["qps"]))

    def ratio(a, b):
        return round(b / a, 3) if a and b else None

    rows = [
        {
            "level": d["level"],
            "qps": ratio(d["qps"], h["qps"]),
            "p50": ratio(d["p50_ms"], h["p50_ms"]),
            "p99": ratio(d["p99_ms"], h["p99_ms"]),
        }
        for d, h in zip(served["dense"], served["hybrid"], strict=True)
    ]
    return {
        "config": {
            "store": store,
            "items": len(index),
            "queries": len(texts),
            "levels": list(levels),
            "requests_per_level": requests,
            "max_seconds_per_level": max_seconds,
            "rounds": max(1, rounds),
            "cpus": os.cpu_count(),
        },
        "limit": limit,
        "served": served,
        "rounds": every,
        "ratios": {
            "limit_qps": ratio(limit["dense"]["qps"], limit["hybrid"]["qps"]),
            "served": rows,
        },
    }


def format_retrieval_cost(result: dict) -> str:
    """Markdown: (d) and each served level, dense beside hybrid, and the ratios."""
    cfg, limit, served = result["config"], result["limit"], result["served"]
    lines = [
        f"The lexical stage's cost: {cfg['items']} items, {cfg['queries']} queries, "
        f"{cfg['cpus']} CPUs; hybrid / dense in the same run (served: each mode's best of "
        f"{cfg.get('rounds', 1)} alternating rounds per level).",
        "",
        "| path | dense q/s | hybrid q/s | q/s ratio | dense p50 / p99 ms | "
        "hybrid p50 / p99 ms | p99 ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    d, h = limit["dense"], limit["hybrid"]
    lines.append(
        f"| (d) in process, batch {d['level']} | {d['qps']} | {h['qps']} | "
        f"{result['ratios']['limit_qps']} | - | - | - |"
    )
    for d, h, r in zip(served["dense"], served["hybrid"], result["ratios"]["served"], strict=True):
        lines.append(
            f"| served, c={d['level']:g} | {d['qps']} | {h['qps']} | {r['qps']} | "
            f"{d['p50_ms']} / {d['p99_ms']} | {h['p50_ms']} / {h['p99_ms']} | {r['p99']} |"
        )
    for mode in RETRIEVAL_MODES:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in limit[mode]["stage_ms"].items())
        lines.append(f"\n(d) {mode}, ms per query by stage (lexical is part of retrieve): {stages}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- overload

OVERLOAD_FACTORS = (0.5, 1.0, 2.0, 5.0, 10.0)


# the before/after of deadline-aware admission: the former defaults (direct ingress, no
# admission: Serve's 256 ongoing + 512 queued per replica) and the current ones
OVERLOAD_RUNS = {
    "before": {"ingress": "direct", "settings": {"admission": False}},
    "now": {"ingress": "haproxy", "settings": {}},
}
STORM_CLIENTS = (8, 32, 128, 512)  # hey's closed-loop clients (no think time, no back-off)


def hey_storm(url: str, body: dict, clients: int, seconds: float) -> dict:
    """``hey`` (an independent load generator) with ``clients`` closed-loop clients POSTing
    ``body`` to ``url`` for ``seconds``; per status: count and p50/p99 latency."""
    import shutil
    import tempfile

    hey = shutil.which("hey")
    if hey is None:
        raise KuberankError("hey not found (Debian: apt-get install hey)")
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as out:
        subprocess.run(
            [
                hey,
                "-z",
                f"{seconds}s",
                "-c",
                str(clients),
                "-m",
                "POST",
                "-T",
                "application/json",
                "-d",
                json.dumps(body),
                "-o",
                "csv",
                url,
            ],
            stdout=open(out.name, "w"),  # noqa: SIM115 - hey writes, the context closes it
            stderr=subprocess.DEVNULL,
            check=True,
            timeout=seconds + 60,
        )
        import csv

        rows = list(csv.DictReader(open(out.name)))  # noqa: SIM115
    by: dict[str, list[float]] = {}
    for row in rows:
        by.setdefault(row["status-code"], []).append(float(row["response-time"]))
    row = {"clients": clients, "requests": len(rows), "seconds": seconds}
    for status, times in sorted(by.items()):
        t = np.array(times) * 1000
        row[status] = {
            "count": len(t),
            "per_s": round(len(t) / seconds, 1),
            "p50_ms": round(float(np.percentile(t, 50)), 1),
            "p99_ms": round(float(np.percentile(t, 99)), 1),
        }
    return row


def overload(
    store: str,
    factors: tuple[float, ...] = OVERLOAD_FACTORS,
    seconds: float = 6.0,
    out_dir: str | os.PathLike | None = None,
    storm: tuple[int, ...] = STORM_CLIENTS,
) -> dict:
    """``kuberank serve`` of ``store`` (search traffic, in-process encoder) under overload, with
    the former defaults (``before``: direct ingress, no admission) and the current ones
    (``now``: the HAProxy front and deadline-aware admission), each on the one URL a client
    uses (the first replica's, without the front).

    Open loop: Poisson arrivals at ``factors`` x the capacity (the closed-loop throughput of
    32 clients, ``before``); per level the offered and achieved rate, goodput (200/s),
    admitted p50/p99, the 503s and their p99. The generator shares the cores: its
    ``offered_qps`` shows where it could not keep up. Storm: ``hey`` with ``storm`` closed-loop
    clients that never back off (skipped without hey)."""
    import shutil

    from kuberank.serving.admission import DEFAULT_BUDGET_MS
    from kuberank.serving.launcher import LocalServing

    path, make_body = request_factory("search", [], bench_queries(200))
    runs: dict[str, list[dict]] = {}
    storms: dict[str, list[dict]] = {}
    capacity = 0.0
    for label, how in OVERLOAD_RUNS.items():
        with LocalServing(
            store,
            use_triton=False,
            settings=how["settings"],
            ingress=how["ingress"],
            restart_ray=True,
        ) as running:
            url = running.url + path
            run_load(url, make_body, Level("closed", 8, 400, 30))  # warm every replica
            if label == "before":
                capacity = run_load(url, make_body, Level("closed", 32, 100_000, seconds))["qps"]
            rows = []
            for factor in bar(factors, desc=f"overload, {label}", unit="level"):
                rate = factor * capacity
                level = Level("open", rate, int(rate * seconds) + 1, seconds)
                row = run_load(url, make_body, level)
                row["factor"] = factor
                row["offered_qps"] = round(row["requests"] / max(row["seconds"], 1e-9), 1)
                rows.append(row)
            runs[label] = rows
            if storm and shutil.which("hey"):
                storms[label] = [
                    hey_storm(url, make_body(0), clients, seconds)
                    for clients in bar(storm, desc=f"storm, {label}", unit="level")
                ]
    result = {
        "capacity_qps": capacity,
        "budget_ms": DEFAULT_BUDGET_MS,
        "seconds_per_level": seconds,
        "runs": runs,
        "storm": storms,
    }
    now = runs["now"]
    result["summary"] = {
        "min_goodput_vs_capacity": round(min(r["qps"] for r in now) / capacity, 3)
        if capacity
        else None,
        "max_admitted_p99_ms": max((r["p99_ms"] or 0) for r in now),
        "max_shed_p99_ms": max((r["shed_p99_ms"] or 0) for r in now),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overload.json").write_text(json.dumps(result, indent=2))
        plot_overload(result, out / "overload.png")
    return result


def format_overload(result: dict) -> str:
    lines = [
        f"capacity (closed loop, 32 clients, before): {result['capacity_qps']:.0f} req/s; "
        f"budget {result['budget_ms']:.0f} ms; {result['seconds_per_level']:g} s per level",
        "",
        "| defaults | offered (x capacity) | offered req/s | goodput req/s | goodput / capacity "
        "| admitted p50 ms | admitted p99 ms | 503s | 503 p99 ms | other errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cap = result["capacity_qps"] or 1.0
    for label, rows in result["runs"].items():
        for r in rows:
            other = {k: v for k, v in r["errors"].items() if k != "503"}
            lines.append(
                f"| {label} | {r['factor']:g} | {r['offered_qps']:.0f} | {r['qps']:.0f} | "
                f"{r['qps'] / cap:.2f} | {r['p50_ms']} | {r['p99_ms']} | {r['shed']} | "
                f"{r['shed_p99_ms']} | {other or '-'} |"
            )
    if result.get("storm"):
        lines += [
            "",
            "hey, closed loop without back-off (one URL):",
            "",
            "| defaults | clients | 200/s | 200 p50 ms | 200 p99 ms | 503/s | 503 p50 ms "
            "| 503 p99 ms | other |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, rows in result["storm"].items():
            for r in rows:
                ok, shed = r.get("200", {}), r.get("503", {})
                other = {
                    k: v["count"] for k, v in r.items() if k.isdigit() and k not in ("200", "503")
                }
                lines.append(
                    f"| {label} | {r['clients']} | {ok.get('per_s', 0)} | {ok.get('p50_ms', '-')} "
                    f"| {ok.get('p99_ms', '-')} | {shed.get('per_s', 0)} | {shed.get('p50_ms', '-')} "
                    f"| {shed.get('p99_ms', '-')} | {other or '-'} |"
                )
    return "\n".join(lines)


def plot_overload(result: dict, path: str | os.PathLike) -> Path:
    """Goodput and admitted p50/p99 against offered load, admission on and off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in result["runs"].items():
        x = [r["factor"] for r in rows]
        left.plot(x, [r["qps"] for r in rows], marker="o", label=label)
        right.plot(
            x,
            [r["p99_ms"] or float("nan") for r in rows],
            marker="o",
            label=f"p99, {label}",
        )
        right.plot(
            x,
            [r["p50_ms"] or float("nan") for r in rows],
            marker=".",
            linestyle="--",
            label=f"p50, {label}",
        )
    left.axhline(result["capacity_qps"], color="grey", linestyle=":", label="capacity")
    left.set(xlabel="offered load (x capacity)", ylabel="goodput (200/s)", xscale="log")
    right.axhline(result["budget_ms"], color="grey", linestyle=":", label="budget")
    right.set(
        xlabel="offered load (x capacity)",
        ylabel="admitted latency (ms)",
        xscale="log",
        yscale="log",
    )
    left.legend()
    right.legend(fontsize=7)
    fig.suptitle("kuberank serve under overload (open loop, Poisson arrivals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
