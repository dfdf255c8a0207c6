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

Pure core: :func:`summarize` (targets and ratios), :func:`format_table`; :func:`serve_and_bench`
starts the targets one after another and measures them (what ``kuberank bench`` and ``make
demo`` call). Beside it: serving/bench_load.py (the load generator, ``run_load``: a request
factory + a level -> stats), serving/bench_targets.py ((d), bare Triton, the naive model),
serving/bench_overload.py (past the limit, before and after admission) and
serving/bench_retrieval.py (dense versus hybrid retrieval).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from kuberank.errors import KuberankError
from kuberank.serving.bench_load import (
    HOST,
    P99_BUDGET_S,
    Level,
    bench_queries,
    cores_line,
    cores_note,
    pinned,
    request_factory,
    run_load,
    started_apart,
    sweep,
)
from kuberank.serving.bench_targets import (
    bare_triton,
    best_in_process_limit,
    naive_model_dir,
    wait_http,
)
from kuberank.serving.launcher import DEFAULT_INGRESS, LocalServing

KUBERANK_TARGETS = ("kuberank-triton", "kuberank-onnx")
TARGETS = (*KUBERANK_TARGETS, "naive", "limit")
# a fixed-rate level of serve_and_bench's open_at lasts at least this long: one stall of a small
# machine decides the p99 of a shorter one
OPEN_MIN_SECONDS = 4.0
CONCURRENCY_LEVELS = (1, 8, 16, 32)  # closed-loop clients per level, by default


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
    config = result.get("config") or {}
    if "cores" in config and result["results"]:
        lines.append(cores_line(config["cores"]) + " (the app: the targets, (d), their servers)")
    return "\n".join(lines)


def plot(result: dict, path: str | os.PathLike) -> Path:
    import matplotlib  # local: heavy, plots only

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
    split: tuple[set[int], set[int]] | None = None,
) -> dict:
    """Start each target in turn on 127.0.0.1, load it at each level, stop it; return
    ``{"config", "results": {target: [level stats]}, "summary", "plot"?}``. The demo calls this
    and prints :func:`format_table` of the result.

    ``open_at``: fractions of (d); after its closed-loop levels each kuberank target also gets
    fixed-rate levels at these fractions of the limit, which is then measured first.

    ``split``: (the app's cores, the load generator's), e.g.
    :func:`kuberank.serving.bench_load.generator_split`: the targets, their servers and (d)
    run on the first, the load generator on the second. None: both share every core."""
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
    app_cpus, generator_cpus = split or (None, None)
    if "limit" in targets and kind == "search":  # first: the open-loop rates are shares of it
        with pinned(app_cpus):
            limit = best_in_process_limit(store, texts, seconds=min(max_seconds, 10.0))
        results["limit"] = [limit]
    open_plan = []
    for share in open_at:  # each fixed rate runs at least OPEN_MIN_SECONDS (bounded as ever)
        rate = round(share * results["limit"][0]["qps"], 1)
        count = max(requests, math.ceil(rate * OPEN_MIN_SECONDS))
        open_plan.append(Level("open", rate, count, max_seconds))
    for name in KUBERANK_TARGETS:
        if name not in targets:
            continue
        serving = LocalServing(
            store,
            use_triton=name == "kuberank-triton",
            settings=settings,
            ingress=ingress,
            ingress_replicas=ingress_replicas,
            restart_ray=True,  # the demo calls this after training on a Ray cluster of its own
        )
        with started_apart(serving, split) as running:  # Ray, replicas, HAProxy, Triton: app's
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
            with pinned(app_cpus):
                proc = subprocess.Popen(
                    cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            try:
                wait_http(f"http://{HOST}:{port}/readyz", proc, 120)
                with pinned(generator_cpus):
                    results["naive"] = sweep(
                        "naive", f"http://{HOST}:{port}/search", make_body, plan
                    )
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
            "cores": cores_note(split),  # None: the app and the load generator share them
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
