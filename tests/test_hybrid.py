"""Lexical and hybrid retrieval in serving (kuberank.serving.hybrid): on the colocated pipeline's
core (encode + retrieve + rank in this process, as the Ingress runs it), the served top-k of
``retrieval: hybrid`` and ``bm25`` equals ``kuberank evaluate``'s ranking of the same store;
filters, MMR and explain work on fused candidates; a store without a lexical index names the
command that builds it. Served over HTTP: tests/test_app.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures import QRELS, QUERIES, write_beir
from test_app import deploy, serving  # noqa: F401
from test_app import post_admitted as post
from test_index import serving_store

from kuberank.serving import hybrid

K = 6  # every document of the fixture: the whole ranking must match


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A copy of the served store indexed over the fixture with train/dev/test queries, so
    ``kuberank index`` fitted the convex fusion; without F (the export fixture's is a stand-in),
    as the offline tests of tests/test_index.py evaluate it."""
    from kuberank.components.index import build_index

    store, model_dir, _ = serving_store(tmp_path_factory)
    root = tmp_path_factory.mktemp("hybrid")
    copy = root / "store"
    shutil.copytree(store, copy, symlinks=True)
    split = {"train": ["q1", "q2"], "dev": ["q3", "q4"], "test": ["q5", "q6"]}
    files = {name: {q: QRELS[q] for q in qids} for name, qids in split.items()}
    dataset = f"beir:{write_beir(root / 'beir', files)}"
    build_index(model_dir, dataset, copy)
    shutil.rmtree(copy / "model")
    return copy, dataset


def _pipeline(store):
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.serving.settings import Settings

    # fp32: the query encoder `kuberank evaluate` runs on a store (the served default is int8)
    return load_pipeline(str(store), QueryEncoding("", Settings(onnx_precision="fp32")))


def _served(pipe, query, retrieval, k=K, **kw):
    from kuberank.serving.pipeline import PipelineRequest
    from kuberank.serving.settings import Settings

    request = PipelineRequest(query, [], None, k, False, True, retrieval=retrieval, **kw)
    [result], timings = pipe.run([request], None, Settings(candidates=100, rank_all_max=5000))
    return result, timings


def _offline(store, dataset, retrieval):
    from kuberank import datasets
    from kuberank.components.evaluate import rank, retrieval_ranker

    data = datasets.load(dataset)
    task = datasets.eval_task(data, "all")
    return rank(retrieval_ranker(str(store), retrieval), task)


@pytest.mark.parametrize("retrieval", ["hybrid", "bm25"])
def test_served_top_k_equals_offline_evaluate(fitted, retrieval):
    store, dataset = fitted
    pipe = _pipeline(store)
    assert pipe.lexical.fusion["method"] == "convex" and pipe.lexical.fusion["fitted_on"]
    offline = _offline(store, dataset, retrieval)
    differs = False
    for qid, text in QUERIES.items():
        (ids, scores, why), timings = _served(pipe, text, retrieval)
        assert ids == offline[qid][:K], qid
        assert scores == sorted(scores, reverse=True)
        assert timings["lexical"] > 0 and timings["retrieve"] >= timings["lexical"]
        terms = {"dense", "lexical"} if retrieval == "hybrid" else {"lexical"}
        for item, score in zip(why, scores, strict=True):  # explain sums to the fused score
            assert set(item) == terms and abs(sum(item.values()) - score) < 1e-5
        (dense_ids, _, _), dense_timings = _served(pipe, text, "dense")
        assert dense_timings["lexical"] == 0.0
        differs |= dense_ids != ids
    if retrieval == "bm25":
        assert differs  # BM25 orders the fixture differently from Q·I somewhere


def test_fused_candidates_keep_filters_and_mmr(fitted):
    from kuberank.serving.filters import Filter

    pipe = _pipeline(fitted[0])
    query = QUERIES["q1"]
    (ids, _, _), _ = _served(pipe, query, "hybrid")
    (kept, _, _), _ = _served(pipe, query, "hybrid", filter=Filter(exclude=ids[:2]))
    assert kept == ids[2:]
    (same, _, _), _ = _served(pipe, query, "hybrid", reranking=("mmr_lambda", 1.0))
    assert same == ids
    (diverse, _, why), _ = _served(pipe, query, "hybrid", k=3, reranking=("mmr_lambda", 0.0))
    assert len(diverse) == 3 and diverse[0] == ids[0] and len(why) == 3


def test_the_store_default_and_a_store_without_a_lexical_index(fitted, tmp_path):
    store, _ = fitted
    pipe = _pipeline(store)
    assert hybrid.choose(None, pipe.lexical) == pipe.lexical.fusion["default"]
    assert hybrid.choose("bm25", pipe.lexical) == "bm25"
    bare = tmp_path / "store"
    shutil.copytree(store, bare, symlinks=True)
    shutil.rmtree(bare / "lexical")
    assert _pipeline(bare).lexical is None
    assert hybrid.choose(None, None) == "dense" and hybrid.choose("dense", None) == "dense"
    for asked in ("hybrid", "bm25"):
        with pytest.raises(hybrid.RetrievalUnavailable, match="kuberank index"):
            hybrid.choose(asked, None)


def test_the_default_retrieval_is_read_from_the_lexical_metadata_alone(fitted, tmp_path):
    """The split path's Ingress (no encoding) and `kuberank evaluate` on a store whose default is
    dense learn the default from lexical.json; BM25 is loaded only where it ranks."""
    from kuberank.components.evaluate import HybridRanker, retrieval_ranker
    from kuberank.lexical import META_FILE
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.store import LEXICAL_DIR

    store, _ = fitted
    loaded = _pipeline(store).lexical
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    for path in (copy / LEXICAL_DIR).iterdir():  # BM25's files and ids gone
        if path.name != META_FILE:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    ingress = load_pipeline(str(copy), None).lexical
    assert type(ingress) is hybrid.LexicalInfo
    assert (ingress.fusion, ingress.default) == (loaded.fusion, loaded.default)
    assert hybrid.choose(None, ingress) == hybrid.choose(None, loaded)
    with pytest.raises(FileNotFoundError, match="ids.json"):  # the colocated path loads BM25
        _pipeline(copy)
    meta_file = copy / LEXICAL_DIR / META_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "fusion": {**meta["fusion"], "default": "dense"}}))
    assert not isinstance(retrieval_ranker(str(copy), None), HybridRanker)  # no BM25 read
    meta_file.write_text(json.dumps({**meta, "fusion": {**meta["fusion"], "default": "hybrid"}}))
    with pytest.raises(FileNotFoundError, match="ids.json"):  # a hybrid default loads BM25
        retrieval_ranker(str(copy), None)
    shutil.rmtree(copy / LEXICAL_DIR)
    assert load_pipeline(str(copy), None).lexical is None


def test_a_lexical_index_of_other_items_is_refused(fitted):
    from kuberank.errors import KuberankError
    from kuberank.lexical import LexicalIndex

    lexical = LexicalIndex.build(["a", "b"], ["one text", "another text"])
    with pytest.raises(KuberankError, match="kuberank index"):
        hybrid.LexicalStage(lexical, ["b", "a"])
    stage = hybrid.LexicalStage(lexical, ["a", "b"])
    assert stage.default == "dense" and stage.fusion["method"] == "rrf"
    assert np.array_equal(stage.lexical.scores(["another"])[0] > 0, [False, True])


# --------------------------------------------------------------------------- served (slow)


@pytest.mark.slow
def test_served_retrieval_its_422s_schema_and_stage_metric(serving, tmp_path):  # noqa: F811
    from ray import serve

    from kuberank.lexical import LexicalIndex
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.launcher import http_json
    from kuberank.serving.metrics import parse_metrics
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.serving.settings import Settings
    from kuberank.store import LEXICAL_DIR

    store = serving["store"]  # its lexical index: RRF (the fixture has no validation queries)
    body = {"query": QUERIES["q1"], "k": 4, "explain": True}
    status, fused = post(serving, "/search", {**body, "retrieval": "hybrid"})
    assert status == 200, fused
    for item in fused["items"]:
        assert set(item["explain"]) == {"dense", "lexical"}
        assert abs(item["explain"]["dense"] + item["explain"]["lexical"] - item["score"]) < 1e-5
    pipe = load_pipeline(str(store), QueryEncoding("", Settings()))  # the app's settings
    (ids, scores, _), _ = _served(pipe, QUERIES["q1"], "hybrid", k=4)
    assert [i["id"] for i in fused["items"]] == ids
    assert np.allclose([i["score"] for i in fused["items"]], scores, atol=1e-6)
    # the stage deployments (split path): BM25 alone, ranked by BM25
    status, lexical = post(
        serving, "/rec/search", {"query": QUERIES["q2"], "k": 3, "retrieval": "bm25"}
    )
    assert status == 200, lexical
    bm25 = LexicalIndex.load(store / LEXICAL_DIR)
    row = bm25.scores([QUERIES["q2"]])[0]
    expected = [bm25.ids[i] for i in np.lexsort((np.arange(len(row)), -row))[:3]]
    assert [i["id"] for i in lexical["items"]] == expected
    # a value outside the three: 422 at the field
    status, error = post(serving, "/search", {**body, "retrieval": "sparse"})
    assert status == 422 and "retrieval" in json.dumps(error["error"]), error
    # the schema documents the field
    schema = http_json("GET", serving["base"] + "/openapi.json")[1]
    field = schema["components"]["schemas"]["SearchRequest"]["properties"]["retrieval"]
    assert "hybrid" in json.dumps(field) and "kuberank index" in field["description"]
    # the lexical stage's time is a stage of its own in the metrics
    samples = parse_metrics(http_json("GET", serving["base"] + "/metrics")[1])
    assert any(
        k.startswith("kuberank_stage_latency_seconds_count{") and 'stage="lexical"' in k
        for k in samples
    )
    # a store without a lexical index: dense as before; bm25/hybrid name the field and command
    bare = tmp_path / "store"
    shutil.copytree(store, bare, symlinks=True)
    shutil.rmtree(bare / LEXICAL_DIR)
    prefix = deploy("bare", "/bare", {**serving["main_args"], "model_store": str(bare)})
    try:
        assert post(serving, prefix + "/search", body)[0] == 200
        for asked in ("hybrid", "bm25"):
            status, error = post(serving, prefix + "/search", {**body, "retrieval": asked})
            assert status == 422, error
            [detail] = error["error"]["details"]
            assert detail["field"] == "retrieval" and "kuberank index" in detail["problem"]
    finally:
        serve.delete("bare")


def test_kuberank_explain_retrieves_as_search_does_by_default(fitted):
    from kuberank.serving.explain import explain_offline

    store, _ = fitted
    pipe = _pipeline(store)
    default = pipe.lexical.default
    answer = explain_offline(str(store), query=QUERIES["q3"], k=3)
    terms = {"dense", "lexical"} if default == "hybrid" else {"relevance"}
    assert all(set(item["explain"]) == terms for item in answer["items"])
