"""kuberank/calibration.py: Steck's calibrated re-ranking and the miscalibration metric."""

import math

import numpy as np
import pytest

from kuberank import calibration as cal


def test_group_matrix_splits_an_items_weight_over_its_groups():
    names, groups = cal.group_matrix([["Drama", "Comedy"], "Drama", None, [], ["Drama", "Drama"]])
    assert names == ["Comedy", "Drama"]
    assert groups.tolist() == [[0.5, 0.5], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]


def test_target_is_the_mean_of_the_grouped_history():
    _, groups = cal.group_matrix([["a"], ["b"], None, ["a", "b"]])
    assert cal.target(groups, [0, 0, 1, 2]).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert cal.target(groups, [2]) is None and cal.target(groups, []) is None


def test_kl_is_zero_for_a_matching_list_and_finite_for_a_missing_group():
    p = np.array([0.7, 0.3])
    assert cal.kl(p, p) == pytest.approx(0.0)
    only_first = cal.kl(p, np.array([1.0, 0.0]))
    expected = 0.7 * math.log(0.7 / (0.99 + 0.007)) + 0.3 * math.log(0.3 / 0.003)
    assert only_first == pytest.approx(expected) and math.isfinite(only_first)


def test_calibration_follows_the_history_shares_as_lambda_grows():
    # the model ranks four dramas above four comedies; the user watched 50% of each
    _, groups = cal.group_matrix(["drama"] * 4 + ["comedy"] * 4)
    relevance = np.array([1.0, 0.95, 0.9, 0.85, 0.5, 0.45, 0.4, 0.35])
    p = np.array([0.5, 0.5])  # columns: comedy, drama
    assert cal.calibrate(relevance, groups, p, 0.0, 4).tolist() == list(range(8))
    order = cal.calibrate(relevance, groups, p, 0.9, 4)
    top = order[:4]
    assert sorted(top.tolist()) == [0, 1, 4, 5]  # two of each, the best of each
    assert sorted(order.tolist()) == list(range(8))  # the rest follow, nothing lost
    assert order[4:].tolist() == [2, 3, 6, 7]
    before = cal.miscalibration([[0, 1, 2, 3]], [[0, 4]], groups, 4)
    after = cal.miscalibration([top.tolist()], [[0, 4]], groups, 4)
    assert after == pytest.approx(0.0) and before > 1.0


def test_miscalibration_skips_users_without_a_target():
    _, groups = cal.group_matrix(["a", "b", None])
    assert cal.miscalibration([[0, 1]], [[2]], groups, 2) == 0.0
    value = cal.miscalibration([[0, 1], [0, 1]], [[2], [0]], groups, 2)
    assert value == pytest.approx(cal.kl(np.array([1.0, 0.0]), np.array([0.5, 0.5])))
