"""kuberank/longtail.py: popularity terciles, novelty and the long-tail boost."""

import numpy as np
import pytest

from kuberank import longtail


def test_novelty_is_self_information_with_add_one():
    assert longtail.novelty(np.array([0, 3, 7]), 7).tolist() == pytest.approx([3.0, 1.0, 0.0])


def test_terciles_cut_the_catalogue_by_popularity_and_the_tail_is_the_last():
    popularity = np.array([5.0, 9.0, 0.0, 2.0, 2.0, 7.0])
    # most popular first, ties by index: 1, 5 | 0, 3 | 4, 2
    assert longtail.popularity_terciles(popularity).tolist() == [1, 0, 2, 1, 2, 0]
    assert longtail.long_tail(popularity).tolist() == [False, False, True, False, True, False]
    assert longtail.popularity_terciles(np.zeros(6)).tolist() == [0, 0, 1, 1, 2, 2]


def test_boost_mixes_scaled_relevance_with_long_tail_membership():
    relevance = np.array([3.0, 2.0, 1.0, 0.0])  # scaled: 1, 2/3, 1/3, 0
    in_tail = np.array([False, False, True, True])
    assert longtail.boosted_order(relevance, in_tail, 0.0).tolist() == [0, 1, 2, 3]
    # beta 1: every tail candidate first, each part in the model's order
    assert longtail.boosted_order(relevance, in_tail, 1.0).tolist() == [2, 3, 0, 1]
    # beta 1/3: 2/3 * (1, 2/3, 1/3, 0) + 1/3 * (0, 0, 1, 1): item 2 passes item 1 only
    third = longtail.boost(relevance, in_tail, 1 / 3)
    assert third.tolist() == pytest.approx([2 / 3, 4 / 9, 5 / 9, 1 / 3])
    assert longtail.boosted_order(relevance, in_tail, 1 / 3).tolist() == [0, 2, 1, 3]
    assert longtail.boosted_order(np.ones(2), np.ones(2, bool), 0.5).tolist() == [0, 1]
