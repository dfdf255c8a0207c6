"""MMR re-ranking on inputs small enough to follow by hand."""

import numpy as np
import pytest

from kuberank.diversity import mmr, mmr_reranker

# items 0 and 1 are the same direction; 2 is orthogonal to both
VECS = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
REL = np.array([1.0, 0.9, 0.5])  # scaled to [1, 0.8, 0]


def test_lambda_one_is_the_ranking_itself():
    assert mmr(REL, VECS, 1.0).tolist() == [0, 1, 2]
    assert mmr(np.array([0.2, 0.2, 0.1]), VECS, 1.0).tolist() == [0, 1, 2]  # ties: lower first


def test_a_near_duplicate_gives_way_to_a_different_item():
    # lambda 0.5, after item 0: item 1 = 0.5*0.8 - 0.5*1 = -0.1, item 2 = 0.5*0 - 0.5*0 = 0
    assert mmr(REL, VECS, 0.5).tolist() == [0, 2, 1]
    # lambda 0.6: item 1 = 0.48 - 0.4 = 0.08 > item 2 = 0: relevance still wins
    assert mmr(REL, VECS, 0.6).tolist() == [0, 1, 2]
    assert mmr(REL, VECS, 0.5, k=2).tolist() == [0, 2]


def test_degenerate_inputs():
    assert mmr(np.zeros(0), np.zeros((0, 2)), 0.5).tolist() == []
    assert mmr(np.ones(3), VECS, 0.0).tolist()[0] == 0  # equal relevance: first is first
    with pytest.raises(ValueError, match="lambda"):
        mmr(REL, VECS, 1.5)


def test_reranker_reorders_the_head_and_keeps_the_tail():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    rerank = mmr_reranker(vectors, 0.5, candidates=3)
    items = np.array([1, 0, 2, 3])  # ranked item indices, best first
    assert rerank(items, np.array([1.0, 0.9, 0.5, 0.1])).tolist() == [1, 2, 0, 3]
