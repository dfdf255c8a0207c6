"""``kuberank bench`` under overload: open-loop rates past the app's limit and ``hey`` storms
of closed-loop clients, before and after deadline-aware admission (serving/admission.py)."""

import csv
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from kuberank.errors import KuberankError
from kuberank.progress import bar
from kuberank.serving.admission import DEFAULT_BUDGET_MS
from kuberank.serving.bench_load import (
    Level,
    bench_queries,
    cores_line,
    cores_note,
    percentile_ms,
    request_factory,
    run_load,
    run_samples,
    started_apart,
)
from kuberank.serving.front import SHED_FULL, SHED_WAITED
from kuberank.serving.launcher import LocalServing

OVERLOAD_FACTORS = (0.5, 1.0, 2.0, 5.0, 10.0)


# the before/after of deadline-aware admission: the former defaults (direct ingress, no
# admission: Serve's 256 ongoing + 512 queued per replica), the current ones with the front's
# former fixed cap (two batches a worker), and the current defaults (the adaptive cap)
OVERLOAD_RUNS = {
    "before": {"ingress": "direct", "settings": {"admission": False}},
    "fixed cap": {"ingress": "haproxy", "settings": {}, "adaptive_caps": False},
    "now": {"ingress": "haproxy", "settings": {}},
}
GOALS = {  # issue 19's goals up to 10x the capacity
    "min_goodput_vs_servable": (">=", 0.9),
    "max_admitted_p99_vs_budget": ("<=", 2.0),
    "max_shed_p99_ms": ("<=", 10.0),
}
STORM_CLIENTS = (8, 32, 128, 512)  # hey's closed-loop clients (no think time, no back-off)
# beside each storm: a few keep-alive clients that pause between requests, timing each answer
# by who gave it (a light client's view, apart from hey's own wait for its core)
PROBE_CLIENTS, PROBE_PAUSE_S = 2, 0.01


def shed_kind(status: int, body: bytes) -> str:
    """Who answered and why, from a response's status and the app's error body: ``200``,
    ``503 front: queue full`` / ``503 front: waited`` (HAProxy), ``503 replica: estimated
    wait`` / ``503 replica: waited`` (the replica's admission), else the status."""
    if status != 503:
        return str(status)
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "503"
    if message == SHED_FULL:
        return "503 front: queue full"
    if message == SHED_WAITED:
        return "503 front: waited"
    for start in ("estimated wait", "waited"):
        if message.startswith(f"overloaded: {start} "):
            return f"503 replica: {start}"
    return "503"


def probe(url: str, body: dict, seconds: float, clients: int = PROBE_CLIENTS) -> dict:
    """``clients`` keep-alive clients POSTing ``body`` to ``url`` for ``seconds``, each pausing
    :data:`PROBE_PAUSE_S` between requests; per :func:`shed_kind`: count, p50/p99 latency
    (``599``: a refused connection or no answer in 10 s)."""
    level = Level("closed", clients, requests=10**9, max_seconds=seconds)
    times: dict[str, list[float]] = {}
    for kind, took in run_samples(
        url, lambda _: body, level, pause_s=PROBE_PAUSE_S, answer=shed_kind
    ):
        times.setdefault(kind, []).append(took)
    return {kind: _latencies(t) for kind, t in sorted(times.items())}


def _latencies(seconds: list[float]) -> dict:
    return {
        "count": len(seconds),
        "p50_ms": percentile_ms(seconds, 50),
        "p99_ms": percentile_ms(seconds, 99),
    }


def hey_storm(url: str, body: dict, clients: int, seconds: float) -> dict:
    """``hey`` (an independent load generator) with ``clients`` closed-loop clients POSTing
    ``body`` to ``url`` for ``seconds``; per status: count and p50/p99 latency. ``probe``:
    what :func:`probe`'s light clients saw meanwhile, by who answered."""
    hey = shutil.which("hey")
    if hey is None:
        raise KuberankError("hey not found (Debian: apt-get install hey)")
    seen: dict = {}  # the probe's answers; none if it failed (the table then has no rows)
    beside = threading.Thread(target=lambda: seen.update(probe(url, body, seconds)), daemon=True)
    beside.start()
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

        rows = list(csv.DictReader(open(out.name)))  # noqa: SIM115
    beside.join(seconds + 60)
    by: dict[str, list[float]] = {}
    for row in rows:
        by.setdefault(row["status-code"], []).append(float(row["response-time"]))
    row = {"clients": clients, "requests": len(rows), "seconds": seconds}
    for status, times in sorted(by.items()):
        row[status] = {"per_s": round(len(times) / seconds, 1), **_latencies(times)}
    row["probe"] = dict(seen)
    return row


def overload(
    store: str,
    factors: tuple[float, ...] = OVERLOAD_FACTORS,
    seconds: float = 6.0,
    out_dir: str | os.PathLike | None = None,
    storm: tuple[int, ...] = STORM_CLIENTS,
    split: tuple[set[int], set[int]] | None = None,
) -> dict:
    """``kuberank serve`` of ``store`` (search traffic, in-process encoder) under overload, with
    the former defaults (``before``: direct ingress, no admission) and the current ones
    (``now``: the HAProxy front and deadline-aware admission), each on the one URL a client
    uses (the first replica's, without the front).

    Open loop: Poisson arrivals at ``factors`` x the capacity (the closed-loop throughput of
    32 clients, ``before``); per level the offered and achieved rate, goodput (200/s),
    admitted p50/p99, the 503s and their p99; ``offered_qps`` shows where the generator could
    not keep up. Storm: ``hey`` with ``storm`` closed-loop clients that never back off
    (skipped without hey). ``split``: the app's cores and the generators' (the open loop, hey;
    :func:`kuberank.serving.bench_load.generator_split`, as the bench section passes; ``cores``
    in the result), None: they share every core."""
    path, make_body = request_factory("search", [], bench_queries(200))
    runs: dict[str, list[dict]] = {}
    storms: dict[str, list[dict]] = {}
    capacity = 0.0
    for label, how in OVERLOAD_RUNS.items():
        serving = LocalServing(
            store,
            use_triton=False,
            settings=how["settings"],
            ingress=how["ingress"],
            adaptive_caps=how.get("adaptive_caps", True),
            restart_ray=True,
        )
        with started_apart(serving, split) as running:
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
        "cores": cores_note(split),
        "capacity_qps": capacity,
        "budget_ms": DEFAULT_BUDGET_MS,
        "seconds_per_level": seconds,
        "runs": runs,
        "storm": storms,
    }
    result["summary"] = summarise(result)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overload.json").write_text(json.dumps(result, indent=2))
        plot_overload(result, out / "overload.png")
    return result


def summarise(result: dict) -> dict:
    """The current defaults' worst level against the goals (:data:`GOALS`), and the adaptive
    cap against the fixed one in the largest storm (ratios now / fixed cap: below 1 is
    better for the latencies, above 1 for the 200s a second)."""
    now = result["runs"]["now"]
    capacity, budget = result["capacity_qps"], result["budget_ms"]
    admitted_p99 = max((r["p99_ms"] or 0) for r in now)
    summary = {
        # goodput of what could be served, the smaller of the offered rate (as the generator
        # sent it) and the capacity: a level offered less than the capacity can serve only that
        "min_goodput_vs_servable": round(
            min(r["qps"] / max(min(r["offered_qps"], capacity), 1e-9) for r in now), 3
        )
        if capacity
        else None,
        "max_admitted_p99_ms": admitted_p99,
        "max_admitted_p99_vs_budget": round(admitted_p99 / budget, 2),
        "max_shed_p99_ms": max((r["shed_p99_ms"] or 0) for r in now),
    }
    summary["goals_met"] = {
        name: value is not None and (value >= goal if op == ">=" else value <= goal)
        for name, (op, goal) in GOALS.items()
        for value in [summary[name]]
    }
    storms = result.get("storm") or {}
    if storms.get("now") and storms.get("fixed cap"):
        adaptive, fixed = storms["now"][-1], storms["fixed cap"][-1]

        def ratio(status: str, key: str):
            a, f = adaptive.get(status, {}).get(key), fixed.get(status, {}).get(key)
            return round(a / f, 2) if a is not None and f else None

        summary["storm_adaptive_vs_fixed"] = {
            "clients": adaptive["clients"],
            "200_p99": ratio("200", "p99_ms"),
            "503_p99": ratio("503", "p99_ms"),
            "200_per_s": ratio("200", "per_s"),
        }
    return summary


def format_overload(result: dict) -> str:
    lines = [
        f"capacity (closed loop, 32 clients, before): {result['capacity_qps']:.0f} req/s; "
        f"budget {result['budget_ms']:.0f} ms; {result['seconds_per_level']:g} s per level; "
        f"{cores_line(result.get('cores'), 'generators (open loop, hey)')}",
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
        probed = [
            (label, r["clients"], kind, seen)
            for label, rows in result["storm"].items()
            for r in rows
            for kind, seen in (r.get("probe") or {}).items()
        ]
        if probed:
            lines += [
                "",
                f"Meanwhile, {PROBE_CLIENTS} light keep-alive clients ({PROBE_PAUSE_S * 1000:g} ms "
                "between requests), by who answered:",
                "",
                "| defaults | hey clients | answer | count | p50 ms | p99 ms |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {label} | {clients} | {kind} | {seen['count']} | {seen['p50_ms']} "
                f"| {seen['p99_ms']} |"
                for label, clients, kind, seen in probed
            ]
    summary = result.get("summary") or summarise(result)
    lines += ["", "Goals, the current defaults' worst open-loop level up to 10x capacity:", ""]
    for name, (op, goal) in GOALS.items():
        met = "met" if summary["goals_met"][name] else "NOT met"
        lines.append(f"- {name}: {summary[name]} (goal {op} {goal:g}): {met}")
    versus = summary.get("storm_adaptive_vs_fixed")
    if versus:
        lines.append(
            f"- adaptive cap / fixed cap, hey with {versus['clients']} clients: 200 p99 "
            f"{versus['200_p99']}x, 503 p99 {versus['503_p99']}x, 200/s {versus['200_per_s']}x"
        )
    return "\n".join(lines)


def plot_overload(result: dict, path: str | os.PathLike) -> Path:
    """Goodput and admitted p50/p99 against offered load, admission on and off."""
    import matplotlib  # local: heavy, plots only

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
