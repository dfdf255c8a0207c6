"""Explanations (kuberank.serving.explain): the terms of F behind each returned score, on the
Ranker's core (fast), and served with "explain": true on both request paths, with query vectors
from the real tritonserver and from ONNX Runtime in process (slow, the shared serving session
of tests/test_app.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures import QUERIES
from test_app import in_process, serving, write_recommendation_store  # noqa: F401
from test_app import post_admitted as post
from test_index import serving_store

from kuberank.serving.explain import TOP_HISTORY, explain_rows, total
from kuberank.serving.launcher import http_json
from kuberank.serving.stages import RankRequest


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    store, _, _ = serving_store(tmp_path_factory)
    rec = write_recommendation_store(store, tmp_path_factory.mktemp("explain-rec") / "store")
    return store, rec


def _all_rows(index, but=()):
    return np.array([i for i in range(len(index)) if index.ids[i] not in but], dtype=np.int64)


def test_a_search_model_explains_with_relevance_only(stores):
    encoder, index, ranker = in_process(stores[0])
    query = encoder.encode([QUERIES["q2"]])[0]
    req = RankRequest(query, _all_rows(index), [], None, 4, explain=True)
    rows, scores = ranker.rank(req)
    explained = explain_rows(ranker, req, rows)
    assert [set(e) for e in explained] == [{"relevance"}] * 4
    assert np.allclose([e["relevance"] for e in explained], scores, atol=1e-4)
    assert np.allclose(scores, index.embeddings[rows] @ query, atol=1e-5)  # Q·I itself


def test_a_plain_encoder_recommendation_is_the_history_mean(stores):
    _, index, ranker = in_process(stores[0])
    history = ["d1", "d5", "d1"]
    req = RankRequest(None, _all_rows(index, history), history, None, 3, explain=True)
    rows, scores = ranker.rank(req)
    explained = explain_rows(ranker, req, rows)
    for why, score in zip(explained, scores, strict=True):
        assert set(why) == {"behaviour", "history"}
        assert abs(total(why) - score) < 1e-4
        # d1 twice: one entry with two thirds of the weight
        weights = {h["id"]: h["attention"] for h in why["history"]}
        assert weights == pytest.approx({"d1": 2 / 3, "d5": 1 / 3})
        assert sum(h["contribution"] for h in why["history"]) == pytest.approx(why["behaviour"])


def test_F_explains_behaviour_and_collaborative_terms(stores):
    encoder, index, ranker = in_process(stores[1])
    history = ["d1", "d3", "d4", "d6"]
    candidates = _all_rows(index, history)
    req = RankRequest(None, candidates, history, "u0", 2, explain=True)
    rows, scores = ranker.rank(req)
    explained = explain_rows(ranker, req, rows)
    for why, score in zip(explained, scores, strict=True):
        assert set(why) == {"behaviour", "collaborative", "history"}
        assert abs(total(why) - score) < 1e-4
        contributions = [h["contribution"] for h in why["history"]]
        assert len(contributions) == TOP_HISTORY and contributions == sorted(contributions)[::-1]
        assert {h["id"] for h in why["history"]} <= set(history)
        assert all(0 <= h["attention"] <= 1 for h in why["history"])
    # with query text all three terms enter, and still sum to the score
    query = encoder.encode([QUERIES["q1"]])[0]
    req = RankRequest(query, candidates, history, "u1", 2, explain=True)
    rows, scores = ranker.rank(req)
    for why, score in zip(explain_rows(ranker, req, rows), scores, strict=True):
        assert {"relevance", "behaviour", "collaborative"} <= set(why)
        assert abs(total(why) - score) < 1e-4


def test_kuberank_explain_offline(stores, capsys):
    from kuberank.cli import main

    rec = str(stores[1])
    args = ["explain", "--model-store", rec, "--history", "d1", "d3", "--user-id", "u0"]
    assert main([*args, "--k", "3", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["kind"] == "recommendation" and len(body["items"]) == 3
    assert not {i["id"] for i in body["items"]} & {"d1", "d3"}  # history excluded
    _check_sums(body)
    assert main([*args, "--k", "2"]) == 0  # the table: one line per item and history item
    table = capsys.readouterr().out
    assert "behaviour" in table and "collaborative" in table and "history d" in table
    assert main(["explain", "--model-store", str(stores[0]), "--query", "pasta", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["items"][0]["id"] == "d2" and set(body["items"][0]["explain"]) == {"relevance"}
    _check_sums(body)
    for bad, message in [
        (["--history", "nope"], "--history: unknown item ids ['nope']"),
        (["--user-id", "u9"], "--user-id: 'u9' is not a user of this model"),
        ([], "--history or --user-id"),
        (["--query", " "], "--query: blank"),
    ]:
        assert main(["explain", "--model-store", rec, *bad]) == 2
        assert message in capsys.readouterr().err


def test_kuberank_explain_screens_blocked_terms_as_search_does(stores, tmp_path, capsys):
    """The store's policy screens the offline query as /search screens it
    (http_api.screen_query): ``reject`` a CLI error naming the policy where /search answers
    422, ``filter`` the answer to the query without the blocked terms (none left: no items)."""
    from types import SimpleNamespace

    from kuberank.cli import main
    from kuberank.serving.http_api import RequestProblem, screen_query
    from kuberank.serving.loading import load_checked_index
    from kuberank.serving.metrics import AppMetrics

    assert main(["explain", "--model-store", str(stores[0]), "--query", "pasta", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["items"]
    assert plain[0]["id"] == "d2"
    for action in ("reject", "filter"):
        store = tmp_path / action
        shutil.copytree(stores[0], store, symlinks=True)
        rules = tmp_path / f"{action}.json"
        rules.write_text(json.dumps({"blocked_terms": ["casino"], "on_blocked_term": action}))
        assert main(["policy", "set", "--model-store", str(store), "--file", str(rules)]) == 0
        capsys.readouterr()
        served = SimpleNamespace(index=load_checked_index(str(store))[1])
        args = ["explain", "--model-store", str(store), "--json", "--query"]
        assert main([*args, "pasta"]) == 0  # no blocked term: as without a policy
        assert json.loads(capsys.readouterr().out)["items"] == plain
        if action == "reject":
            with pytest.raises(RequestProblem) as refused:
                screen_query(served, "Casino pasta", AppMetrics())
            assert refused.value.status == 422
            assert main([*args, "Casino pasta"]) == 2
            err = capsys.readouterr().err
            assert refused.value.details[0]["problem"] in err
            assert "--query: " in err and "policy 1, fingerprint " in err
            assert "on_blocked_term: reject" in err
        else:
            assert screen_query(served, "Casino pasta", AppMetrics()) == "pasta"
            assert main([*args, "Casino pasta"]) == 0
            assert json.loads(capsys.readouterr().out)["items"] == plain
            assert screen_query(served, "casino", AppMetrics()) is None  # /search: no items
            assert main([*args, "casino"]) == 0
            assert json.loads(capsys.readouterr().out)["items"] == []


def _check_sums(body):
    for item in body["items"]:
        assert abs(total(item["explain"]) - item["score"]) < 1e-4, item


# --------------------------------------------------------------------------- served (slow)


@pytest.mark.slow
def test_served_explanations_on_both_paths_and_from_triton(serving):  # noqa: F811
    query = {"query": QUERIES["q3"], "k": 5}
    status, plain = post(serving, "/search", query)
    assert status == 200 and all("explain" not in item for item in plain["items"])
    answers = {}
    for prefix in ("", "/tri"):  # ONNX Runtime in process, and the real tritonserver
        status, body = post(serving, prefix + "/search", {**query, "explain": True})
        assert status == 200, body
        assert [set(i["explain"]) for i in body["items"]] == [{"relevance"}] * 5
        _check_sums(body)
        answers[prefix] = body
    assert [i["id"] for i in answers[""]["items"]] == [i["id"] for i in answers["/tri"]["items"]]
    # Triton's int8 query vector and ONNX Runtime's: the same terms within encoder noise
    assert np.allclose(
        [i["explain"]["relevance"] for i in answers[""]["items"]],
        [i["explain"]["relevance"] for i in answers["/tri"]["items"]],
        atol=1e-2,
    )
    # the stage deployments (split path) with F's behaviour and collaborative terms
    history = ["d2", "d4"]
    status, body = post(
        serving, "/rec/recommend", {"user_id": "u1", "history": history, "k": 3, "explain": True}
    )
    assert status == 200, body
    _check_sums(body)
    for item in body["items"]:
        assert set(item["explain"]) == {"behaviour", "collaborative", "history"}
        assert {h["id"] for h in item["explain"]["history"]} == set(history)
    # FastAPI (a +json media type) answers as the JSON fast path: absent terms stay absent
    fastapi = http_json(
        "POST",
        serving["base"] + "/rec/recommend",
        {"user_id": "u1", "history": history, "k": 3, "explain": True},
        timeout=30,
        headers={"Content-Type": "application/vnd.kuberank+json"},
    )
    assert fastapi == (200, body)
