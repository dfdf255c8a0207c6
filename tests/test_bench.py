"""The load benchmark (serving/bench.py): the verdicts of the summary, the CLI's and
serve_and_bench's refusals, and a bounded serve_and_bench run of the naive baseline and the
in-process limit with its JSON, table and plot. The load generator, the overload and retrieval
runs and the in-process limit: tests/test_bench_load.py, test_bench_overload.py,
test_bench_retrieval.py, test_bench_targets.py."""

from __future__ import annotations

import json

import pytest
from test_index import serving_store

from kuberank.errors import KuberankError
from kuberank.serving import bench


def _row(target, level, qps, p99, errors=0.0):
    return {
        "target": target,
        "mode": "closed",
        "level": level,
        "requests": 100,
        "qps": qps,
        "p50_ms": p99 / 2,
        "p95_ms": p99 * 0.9,
        "p99_ms": p99,
        "max_ms": p99 * 1.2,
        "error_rate": errors,
        "errors": {},
    }


def test_summary_verdicts_and_table():
    results = {
        "kuberank-onnx": [
            _row("kuberank-onnx", 1, 50, 10),
            _row("kuberank-onnx", 32, 400, 45),
            _row("kuberank-onnx", 64, 500, 90),
            _row("kuberank-onnx", 16, 450, 30, 0.1),
        ],
        "naive": [_row("naive", 1, 40, 30), _row("naive", 8, 70, 120)],
        "limit": [{**_row("limit", 32, 700, 0), "p99_ms": None}],
        "bare-triton": [_row("bare-triton", 32, 800, 60)],
        "serve-floor": [
            {**_row("serve-floor", 32, 1800, 30), "via": "direct"},
            {**_row("serve-floor", 32, 900, 40), "via": "proxy"},
        ],
    }
    s = bench.summarize(results)
    assert (
        s["best"]["qps"] == 400 and s["best"]["target"] == "kuberank-onnx"
    )  # 500 is over budget, 450 had errors
    assert s["naive_qps_same_p99"] == 40 and s["vs_naive"] == 10.0 and s["target_5x_naive"]
    assert s["vs_limit"] == round(400 / 700, 3) and s["target_half_of_limit"]
    assert s["vs_bare_triton"] == 0.5
    table = bench.format_table({"results": results, "summary": s})
    assert "| kuberank-onnx | closed | 32 | 100 | 400 |" in table and "50% of it" in table
    assert "(400 req/s behind)" in table and "HTTP floor" in table
    assert "direct 1800 req/s, proxy 900 req/s" in table
    assert s["fastest"]["qps"] == 500 and s["fastest_vs_bare_triton"] == 0.625
    slow = bench.summarize(
        {
            "kuberank-onnx": [_row("kuberank-onnx", 8, 100, 80)],
            "limit": results["limit"],
            "bare-triton": results["bare-triton"],
        }
    )
    assert slow["best"] is None
    table = bench.format_table({"results": {"x": []}, "summary": slow})
    assert (
        "no kuberank level met" in table
        and "fastest kuberank level: kuberank-onnx 100 req/s" in table
    )
    assert "12% of bare Triton 800 req/s" in table and "700 req/s behind" in table
    ahead = bench.summarize({**results, "kuberank-onnx": [_row("kuberank-onnx", 32, 900, 40)]})
    assert "(100 req/s ahead)" in bench.format_table({"results": results, "summary": ahead})


def test_open_loop_levels_give_the_rate_held_within_budget():
    closed = [_row("kuberank-onnx", 32, 400, 30)]
    fixed = [
        {**_row("kuberank-onnx", rate, qps, p99), "mode": "open"}
        for rate, qps, p99 in ((210.0, 210, 20), (280.0, 279, 45), (350.0, 300, 400))
    ]
    limit = [{**_row("limit", 32, 700, 0), "p99_ms": None}]
    s = bench.summarize({"kuberank-onnx": closed + fixed, "limit": limit})
    # the closed-loop verdict is unchanged; the open loop holds 280/s, not the overrun 350/s
    assert s["best"]["qps"] == 400 and s["best"]["mode"] == "closed"
    assert s["open_rates"] == [210.0, 280.0, 350.0]
    assert s["open_best"]["level"] == 280.0 and s["open_vs_limit"] == round(279 / 700, 3)
    table = bench.format_table({"results": {"kuberank-onnx": closed + fixed}, "summary": s})
    assert "| kuberank-onnx | open | 280.0 |" in table
    assert (
        "open loop (fixed rate, tried 210, 280, 350 req/s): kuberank-onnx holds 279 req/s "
        "= 40% of the limit (p99 45 ms)" in table
    )
    overrun = bench.summarize({"kuberank-onnx": closed + fixed[2:], "limit": limit})
    assert overrun["open_best"] is None and overrun["open_vs_limit"] is None
    assert "tried 350 req/s): no rate held p99 <= 50 ms" in bench.format_table(
        {"results": {}, "summary": overrun}
    )
    assert "open_rates" not in bench.summarize({"kuberank-onnx": closed, "limit": limit})


@pytest.mark.parametrize(
    "kw",
    [
        {"targets": ("kuberank-onnx",), "open_at": (0.5,)},  # no limit to take shares of
        {"mode": "open", "open_at": (0.5,)},  # the levels are rates already
        {"open_at": (0.5, 0.0)},
    ],
)
def test_open_at_needs_closed_levels_and_the_limit(kw):
    with pytest.raises(KuberankError, match="open_at"):
        bench.serve_and_bench("/no/store", **kw)


def test_bench_cli_names_a_bad_number_list(capsys):
    from kuberank.cli import main

    for flag in ("--concurrency", "--rates", "--open-at"):
        assert main(["bench", "--model-store", "/no/store", flag, "8,x"]) == 2
        assert f"{flag}: expected comma-separated numbers, got '8,x'" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_and_bench_naive_and_limit(tmp_path_factory, tmp_path):
    """With the cores split (two or more), the run records the split, names it under the
    table, and gives this thread its cores back."""
    import os

    from kuberank.serving.bench_load import split_cpus

    store, _, _ = serving_store(tmp_path_factory)
    before = os.sched_getaffinity(0)
    split = split_cpus(before)
    result = bench.serve_and_bench(
        str(store),
        targets=("naive", "limit"),
        levels=(2,),
        requests=20,
        max_seconds=20,
        queries=20,
        out_dir=tmp_path,
        split=split,
    )
    assert os.sched_getaffinity(0) == before
    if split is not None:
        app, generator = sorted(split[0]), sorted(split[1])
        assert result["config"]["cores"] == {"app": app, "generator": generator}
        assert f"on cores {app}, load generator on {generator}" in bench.format_table(result)
    naive = result["results"]["naive"][0]
    assert naive["ok"] == 20 and naive["qps"] > 0
    assert result["results"]["limit"][0]["qps"] > 0
    assert (tmp_path / "latency_vs_load.png").stat().st_size > 1000
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["items"] == 6
    assert "| naive | closed | 2.0 | 20 |" in bench.format_table(result)
