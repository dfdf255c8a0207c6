"""Hybrid fusion: normalisation, ranks, RRF, the convex combination and its fitted weight."""

import numpy as np
import pytest

from kuberank import fusion


def test_minmax_scales_rows_and_zeroes_constant_rows():
    out = fusion.minmax(np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]))
    assert out.tolist() == [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]


def test_ranks_are_one_based_and_ties_go_to_the_lower_index():
    assert fusion.ranks(np.array([[0.2, 0.9, 0.2, 0.5]])).tolist() == [[3, 1, 4, 2]]


def test_rrf_sums_reciprocal_ranks():
    dense, lexical = np.array([[3.0, 2.0, 1.0]]), np.array([[1.0, 2.0, 3.0]])
    out = fusion.rrf(dense, lexical, k=60)
    expected = [1 / 61 + 1 / 63, 1 / 62 + 1 / 62, 1 / 63 + 1 / 61]
    assert np.allclose(out, [expected])
    # an item first in both rankings wins whatever the scales
    assert fusion.rrf(np.array([[100.0, 1.0]]), np.array([[0.3, 0.1]])).argmax() == 0


def test_convex_interpolates_normalised_scores():
    dense, lexical = np.array([[0.0, 1.0]]), np.array([[10.0, 0.0]])
    assert np.allclose(fusion.convex(dense, lexical, 1.0), [[0.0, 1.0]])
    assert np.allclose(fusion.convex(dense, lexical, 0.0), [[1.0, 0.0]])
    assert np.allclose(fusion.convex(dense, lexical, 0.25), [[0.75, 0.25]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fusion.convex(dense, lexical, 1.5)


def test_fit_weight_takes_the_best_grid_point_and_breaks_ties_towards_half():
    dense, lexical = np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])
    # quality: 1 when item 1 wins (dense side), else 0
    weight, curve = fusion.fit_weight(dense, lexical, lambda s: float(s[0, 1] > s[0, 0]))
    assert weight == 0.55 and curve[0.5] == 0.0 and curve[1.0] == 1.0
    flat, _ = fusion.fit_weight(dense, lexical, lambda s: 0.3)
    assert flat == 0.5


def test_fuse_names_bad_methods_and_missing_weights():
    one = np.ones((1, 2))
    with pytest.raises(ValueError, match="one of"):
        fusion.fuse(one, one, "max")
    with pytest.raises(ValueError, match="needs a weight"):
        fusion.fuse(one, one, "convex")


@pytest.mark.parametrize("method, weight", [("rrf", None), ("convex", 0.3)])
def test_terms_sum_to_the_fused_score(method, weight):
    rng = np.random.default_rng(0)
    dense, lexical = rng.normal(size=(2, 7)), rng.gamma(2.0, size=(2, 7))
    parts = fusion.terms(dense, lexical, method, weight)
    assert set(parts) == {"dense", "lexical"}
    assert np.array_equal(
        parts["dense"] + parts["lexical"], fusion.fuse(dense, lexical, method, weight)
    )
    if method == "convex":
        assert np.allclose(parts["dense"], 0.3 * fusion.minmax(dense))
    else:
        assert np.allclose(parts["lexical"], 1.0 / (fusion.RRF_K + fusion.ranks(lexical)))
