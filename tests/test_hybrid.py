"""Lexical and hybrid retrieval in serving (kuberank.serving.hybrid): on the colocated pipeline's
core (encode + retrieve + rank in this process, as the Ingress runs it), the served top-k of
``retrieval: hybrid`` and ``bm25`` equals ``kuberank evaluate``'s ranking of the same store;
filters, MMR and explain work on fused candidates; a store without a lexical index names the
command that builds it. Served over HTTP: tests/test_app.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fixtures import QRELS, QUERIES, write_beir
from test_index import serving_store

from kuberank.serving import hybrid

K = 6  # every document of the fixture: the whole ranking must match


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A copy of the served store indexed over the fixture with train/dev/test queries, so
    ``kuberank index`` fitted the convex fusion; without F (the export fixture's is a stand-in),
    as the offline tests of tests/test_index.py evaluate it."""
    from kuberank.serving.index import build_index

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
    from kuberank.serving.app import QueryEncoding, Settings, load_pipeline

    # fp32: the query encoder `kuberank evaluate` runs on a store (the served default is int8)
    return load_pipeline(str(store), QueryEncoding("", Settings(onnx_precision="fp32")))


def _served(pipe, query, retrieval, k=K, **kw):
    from kuberank.serving.app import PipelineRequest

    request = PipelineRequest(query, [], None, k, False, True, retrieval=retrieval, **kw)
    [result], timings = pipe.run([request], None, candidates=100, rank_all_max=5000)
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
    (same, _, _), _ = _served(pipe, query, "hybrid", mmr_lambda=1.0)
    assert same == ids
    (diverse, _, why), _ = _served(pipe, query, "hybrid", k=3, mmr_lambda=0.0)
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


def test_a_lexical_index_of_other_items_is_refused(fitted):
    from kuberank.errors import KuberankError
    from kuberank.lexical import LexicalIndex

    lexical = LexicalIndex.build(["a", "b"], ["one text", "another text"])
    with pytest.raises(KuberankError, match="kuberank index"):
        hybrid.LexicalStage(lexical, ["b", "a"])
    stage = hybrid.LexicalStage(lexical, ["a", "b"])
    assert stage.default == "dense" and stage.fusion["method"] == "rrf"
    assert np.array_equal(stage.lexical.scores(["another"])[0] > 0, [False, True])
