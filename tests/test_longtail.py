"""kuberank/longtail.py: the long-tail boost."""

import numpy as np
import pytest

from kuberank import longtail


def test_novelty_is_self_information_with_add_one():
    assert longtail.novelty(np.array([0, 3, 7]), 7).tolist() == pytest.approx([3.0, 1.0, 0.0])


def test_boost_trades_relevance_for_rarity():
    relevance = np.array([3.0, 2.0, 1.0])
    rarity = np.array([0.0, 1.0, 5.0])  # the best item is the most popular
    assert longtail.boosted_order(relevance, rarity, 0.0).tolist() == [0, 1, 2]
    assert longtail.boosted_order(relevance, rarity, 1.0).tolist() == [2, 1, 0]
    # beta 0.5: 0.5 * (1, 0.5, 0) + 0.5 * (0, 0.2, 1) = (0.5, 0.35, 0.5): a tie keeps the order
    assert longtail.boost(relevance, rarity, 0.5).tolist() == pytest.approx([0.5, 0.35, 0.5])
    assert longtail.boosted_order(relevance, rarity, 0.5).tolist() == [0, 2, 1]
    assert longtail.boosted_order(np.ones(2), np.ones(2), 0.5).tolist() == [0, 1]
