"""MMR re-ranking on inputs small enough to follow by hand."""

import numpy as np
import pytest
from test_app import serving  # noqa: F401 - the shared session fixture (slow test)

from kuberank.diversity import mmr

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


def test_the_served_ranker_applies_mmr_over_its_candidates(tmp_path_factory):
    from test_app import in_process
    from test_index import serving_store

    from kuberank.serving.stages import RankRequest

    store, _, _ = serving_store(tmp_path_factory)
    encoder, index, ranker = in_process(store)
    query = encoder.encode(["run containers on a cluster"])[0]
    everything = np.arange(len(index))
    plain = ranker.rank(RankRequest(query, everything, [], None, 4))
    same = ranker.rank(RankRequest(query, everything, [], None, 4, reranking=("mmr_lambda", 1.0)))
    assert plain[0].tolist() == same[0].tolist()
    rows, scores = ranker.rank(
        RankRequest(query, everything, [], None, 4, reranking=("mmr_lambda", 0.0))
    )
    assert rows[0] == plain[0][0]  # the best item first, then the least like those picked
    vecs = index.embeddings
    rest = [r for r in everything if r != rows[0]]
    assert rows[1] == min(rest, key=lambda r: (float(vecs[r] @ vecs[rows[0]]), r))
    # the items keep F's scores (no longer in score order)
    assert np.allclose(scores, vecs[rows] @ query, atol=1e-5)


@pytest.mark.slow
def test_served_diversity_per_request(serving):  # noqa: F811
    from test_filters import post

    body = {"query": "run containers on a cluster", "k": 4}
    status, plain = post(serving, "/search", body)
    assert status == 200, plain
    status, diverse = post(serving, "/search", {**body, "diversity": {"mmr_lambda": 0.0}})
    assert status == 200 and len(diverse["items"]) == 4, diverse
    assert diverse["items"][0] == plain["items"][0]
    assert [i["id"] for i in diverse["items"]] != [i["id"] for i in plain["items"]]
    status, same = post(
        serving, "/rec/recommend", {"history": ["d1"], "diversity": {"mmr_lambda": 1}}
    )
    assert status == 200, same
    status, bad = post(serving, "/search", {**body, "diversity": {"mmr_lambda": 1.5}})
    assert status == 422 and bad["error"]["details"][0]["field"] == "diversity.mmr_lambda"
    # the fixture's index has neither genres nor popularity (serving/reranking.py)
    for kind in ("calibration", "tail_boost"):
        status, bad = post(serving, "/search", {**body, "diversity": {kind: 0.5}})
        assert status == 422 and bad["error"]["details"][0]["field"] == f"diversity.{kind}", bad
    status, bad = post(serving, "/search", {**body, "diversity": {}})
    assert status == 422 and bad["error"]["details"][0]["field"].startswith("diversity"), bad
