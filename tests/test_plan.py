"""The capacity calculator: each formula on hand-computed cases, the combined plan, the CLI."""

import json
import math

import pytest

from kuberank import plan as p
from kuberank.errors import KuberankError
from kuberank.pipelines.cli import build_parser


def test_replicas_are_ceil_of_load_over_useful_throughput():
    assert p.replicas_for(1000, 500, 1.0) == 2
    assert p.replicas_for(1001, 500, 1.0) == 3
    assert p.replicas_for(1000, 4000, 0.6) == 1  # 1000 / 2400
    assert p.replicas_for(1000, 4000, 0.6, minimum=2) == 2
    assert p.replicas_for(20_000, 4000, 0.6) == 9  # ceil(8.33)
    with pytest.raises(KuberankError, match="--utilisation"):
        p.replicas_for(10, 10, 1.5)
    with pytest.raises(KuberankError, match="--qps"):
        p.replicas_for(-1, 10, 0.5)


def test_index_bytes_and_shards():
    assert p.index_bytes(1_000_000, 384, 4) == 1_536_000_000
    assert p.index_bytes(1_000_000, 384, 4, hnsw_m=32) == 1_536_000_000 + 256_000_000
    assert p.index_bytes(10, 384, 1) == 3840
    gib = p.GIB
    assert p.index_shards(10 * gib, 16 * gib, 0.7) == 1
    assert p.index_shards(12 * gib, 16 * gib, 0.7) == 2  # 12 > 11.2
    assert p.index_shards(0, 16 * gib, 0.7) == 1


def test_training_workers_fit_the_budget_with_sublinear_scaling():
    # 1.2M rows x 1 epoch at 1000 rows/s = 20 min on one worker
    assert p.training_workers(1_200_000, 1, 1000, 20, 0.85) == 1
    assert p.training_workers(1_200_000, 1, 1000, 10, 1.0) == 2
    # needs 4 single-worker units: 1 + ceil(3 / 0.85) = 5 workers
    assert p.training_workers(1_200_000, 2, 1000, 10, 0.85) == 5
    n = p.training_workers(100_000_000, 4, 2000, 60, 0.85)
    assert 2000 * 60 * 60 * (1 + (n - 1) * 0.85) >= 400_000_000 > 2000 * 3600 * (1 + (n - 2) * 0.85)
    with pytest.raises(KuberankError, match="--train-budget-minutes"):
        p.training_workers(1, 1, 1, 0, 1)


def test_plan_combines_the_formulas_from_the_baseline():
    b = p.Baseline()
    result = p.plan(20_000, 50_000_000, train_rows=100_000_000, epochs=4, train_budget_minutes=60)
    assert result["triton_gpus"] == math.ceil(20_000 / (b.triton_qps_per_gpu * 0.6))
    assert result["serve_replicas"] == math.ceil(20_000 / (b.serve_qps_per_replica * 0.6))
    assert result["index"]["ann"] is True
    assert result["index"]["bytes"] == 50_000_000 * (384 * 4 + 2 * 32 * 4)
    assert result["index"]["shards"] == math.ceil(result["index"]["bytes"] / (16 * p.GIB * 0.7))
    assert result["training_workers"] == p.training_workers(
        100_000_000, 4, b.train_rows_per_s_per_worker, 60, 0.85
    )
    small = p.plan(10, 1682)  # MovieLens-100K: exact search, the minimum replica counts
    assert small["index"]["ann"] is False and small["index"]["shards"] == 1
    assert small["triton_gpus"] == small["serve_replicas"] == 2
    assert "training_workers" not in small
    measured = p.plan(
        315 * 0.6 * 3,
        1682,
        baseline=p.Baseline(triton_qps_per_gpu=p.MEASURED_HERE["triton_cpu_qps_2_cores"]),
    )
    assert measured["triton_gpus"] == 3
    with pytest.raises(KuberankError, match="--items"):
        p.plan(10, 0)


def test_cli_plan(capsys):
    parser = build_parser()
    args = parser.parse_args(
        ["plan", "--qps", "20000", "--items", "50000000", "--json", "--gpu-qps", "2000"]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["triton_gpus"] == 17 and out["baseline"]["triton_qps_per_gpu"] == 2000
    args = parser.parse_args(["plan", "--qps", "100", "--items", "1682", "--train-rows", "97171"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "Triton GPUs (query encoder)" in text and "training workers" in text
