"""The targets of ``kuberank bench`` besides the app (serving/bench.py): (d) ``limit``, the raw
model's batched throughput in process (:func:`in_process_limit`), ``bare-triton``, the Triton
ensemble alone over gRPC, and what (c) ``naive`` serves."""

import asyncio
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kuberank.config import base_model_path
from kuberank.errors import KuberankError
from kuberank.serving.bench_load import Level, stats
from kuberank.serving.launcher import http_json


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
    # local: the CLI's parser imports this module (see tests/test_layers.py)
    from threadpoolctl import threadpool_limits

    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import PipelineRequest, load_pipeline
    from kuberank.serving.settings import Settings

    settings = Settings(onnx_precision=precision, onnx_threads=threads, candidates=candidates)
    encoding = QueryEncoding("", settings, streams)
    pipe = load_pipeline(store, encoding)
    intra = encoding.onnx_threads()
    totals: dict[str, float] = {}
    lock = threading.Lock()

    def one_batch(start: int) -> None:
        texts = [queries[(start + j) % len(queries)] for j in range(batch_size)]
        reqs = [PipelineRequest(t, [], None, k, False, retrieval=retrieval) for t in texts]
        results, timings = pipe.run(reqs, None, settings)
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


def wait_http(url: str, process: subprocess.Popen, timeout: float) -> None:
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

    return base_model_path()
