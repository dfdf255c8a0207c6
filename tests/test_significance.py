"""Seeds and significance: the pure statistics behind the rec-peers and search benchmarks."""

import numpy as np
import pytest
from scipy import stats

from kuberank import metrics
from kuberank.significance import average_per_query, mean_sd, paired_test, per_query_metric


def test_per_query_metric_averages_to_evaluate_run():
    qrels = {"a": {"x": 1}, "b": {"y": 1}, "c": {"z": 1}, "unjudged": {"x": 0}}
    run = {"a": ["x", "y"], "b": ["x", "y"], "c": ["x"]}
    values = per_query_metric(run, qrels, "ndcg@10")
    assert values == pytest.approx({"a": 1.0, "b": 1 / np.log2(3), "c": 0.0})
    assert np.mean(list(values.values())) == pytest.approx(
        metrics.evaluate_run(run, qrels)["ndcg@10"]
    )


def test_mean_sd_uses_the_sample_deviation():
    assert mean_sd([0.1, 0.2, 0.3]) == pytest.approx((0.2, 0.1))
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_paired_test_matches_scipy_and_detects_a_shift():
    rng = np.random.default_rng(1)
    base = rng.random(400)
    a = {f"q{i}": v + 0.05 + rng.normal(0, 0.05) for i, v in enumerate(base)}
    b = {f"q{i}": v for i, v in enumerate(base)}
    b["only-b"] = 1.0  # not paired: ignored
    result = paired_test(a, b, resamples=2000)
    keys = sorted(set(a))
    expected = stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue
    assert result["queries"] == 400 and result["t_p"] == pytest.approx(expected)
    assert result["difference"] == pytest.approx(result["mean_a"] - result["mean_b"])
    assert result["t_p"] < 1e-6 and result["bootstrap_p"] == pytest.approx(1 / 2000)
    low, high = result["bootstrap_ci95"]
    assert low < result["difference"] < high and low > 0
    assert paired_test(a, b, resamples=2000) == result  # seeded: the same answer


def test_paired_test_finds_no_difference_in_noise():
    rng = np.random.default_rng(2)
    a = {f"q{i}": v for i, v in enumerate(rng.random(300))}
    b = {q: v + rng.normal(0, 0.1) for q, v in a.items()}
    b = {q: v - (np.mean(list(b.values())) - np.mean(list(a.values()))) for q, v in b.items()}
    result = paired_test(a, b, resamples=2000)
    assert result["t_p"] > 0.5 and result["bootstrap_p"] > 0.5
    same = paired_test(a, a, resamples=100)
    assert same["t_p"] == 1.0 and same["difference"] == 0.0
    with pytest.raises(ValueError, match="1 common queries"):
        paired_test({"q": 1.0}, {"q": 0.0})


def test_average_per_query_over_seeds():
    assert average_per_query([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.5, "c": 1.0}]) == {
        "a": 0.5,
        "b": 0.25,
    }
