"""``kuberank bench`` of retrieval's cost: the same app loaded with ``retrieval: dense`` and
``hybrid`` requests in the same run (serving/hybrid.py), and the in-process limit of each."""

import os

from kuberank.errors import KuberankError
from kuberank.serving.bench_load import (
    Level,
    bench_queries,
    cores_line,
    cores_note,
    pinned,
    run_load,
    started_apart,
)
from kuberank.serving.bench_targets import in_process_limit
from kuberank.serving.hybrid import BUILD_HINT, load_stage
from kuberank.serving.launcher import LocalServing
from kuberank.serving.loading import load_checked_index

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
    split: tuple[set[int], set[int]] | None = None,
) -> dict:
    """The lexical stage's cost (serving/hybrid.py): one store with a lexical index served once
    (``kuberank serve --no-triton``'s defaults: the in-process ONNX Runtime encoder, as in
    (d)), loaded at each closed-loop level with the same queries asking ``retrieval: dense``
    and then ``hybrid``; and the app's batch step in this process ((d), batches of 32, one
    stream) with each, with its stages' mean milliseconds per query. Each level runs
    ``rounds`` times in alternating order (dense, hybrid, hybrid, dense, ...) and keeps each
    mode's best round (most answers per second; all rounds under ``rounds``), so drift of a
    shared host weighs on both alike. ``ratios``:
    hybrid / dense of throughput and latency. ``split``: (the app's cores, the load
    generator's), as in :func:`kuberank.serving.bench.serve_and_bench`; None: shared."""
    store = str(store)
    _, index = load_checked_index(store)
    if load_stage(store, index.ids) is None:
        raise KuberankError(f"bench: {store} has no lexical index; {BUILD_HINT}")
    texts = bench_queries(queries)

    def body(mode: str):
        return lambda i: {"query": texts[i % len(texts)], "k": 10, "retrieval": mode}

    with pinned(split[0] if split else None):
        limit = {
            mode: in_process_limit(store, texts, seconds=limit_seconds, retrieval=mode)
            for mode in RETRIEVAL_MODES
        }
    served: dict[str, list[dict]] = {mode: [] for mode in RETRIEVAL_MODES}
    every: list[dict] = []
    serving = LocalServing(store, use_triton=False, settings=settings, restart_ray=True)
    with started_apart(serving, split) as running:
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
            "cores": cores_note(split),  # None: the app and the load generator share them
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
    where = f" ({cores_line(cfg['cores'])})" if "cores" in cfg else ""
    lines = [
        f"The lexical stage's cost: {cfg['items']} items, {cfg['queries']} queries, "
        f"{cfg['cpus']} CPUs{where}; hybrid / dense in the same run (served: each mode's best "
        f"of {cfg.get('rounds', 1)} alternating rounds per level).",
        "",
        "| path | dense q/s | hybrid q/s | q/s ratio | dense p50 / p99 ms | "
        "hybrid p50 / p99 ms | p99 ratio | dense / hybrid 503s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    d, h = limit["dense"], limit["hybrid"]
    lines.append(
        f"| (d) in process, batch {d['level']} | {d['qps']} | {h['qps']} | "
        f"{result['ratios']['limit_qps']} | - | - | - | - |"
    )
    for d, h, r in zip(served["dense"], served["hybrid"], result["ratios"]["served"], strict=True):
        lines.append(
            f"| served, c={d['level']:g} | {d['qps']} | {h['qps']} | {r['qps']} | "
            f"{d['p50_ms']} / {d['p99_ms']} | {h['p50_ms']} / {h['p99_ms']} | {r['p99']} | "
            f"{d.get('shed', 0)} of {d['requests']} / {h.get('shed', 0)} of {h['requests']} |"
        )
    for mode in RETRIEVAL_MODES:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in limit[mode]["stage_ms"].items())
        lines.append(f"\n(d) {mode}, ms per query by stage (lexical is part of retrieve): {stages}")
    return "\n".join(lines)
