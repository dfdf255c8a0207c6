"""The evaluate step: baselines, model directories, the CLI contract and its errors."""

import json
import shutil

import numpy as np
import pytest

from kuberank import datasets
from kuberank.cli import main
from kuberank.components.evaluate import evaluate, top_k
from kuberank.config import base_model_path
from kuberank.errors import KuberankError
from tests.fixtures import interaction_rows, write_beir, write_jsonl


@pytest.fixture
def collection(tmp_path):
    return f"beir:{write_beir(tmp_path / 'c')}"


def test_top_k_excludes_and_breaks_ties_by_index():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9])
    assert top_k(scores, np.array([1]), 3).tolist() == [4, 0, 2]
    assert top_k(scores, np.array([0, 1, 2, 3]), 10).tolist() == [4]


def test_bm25_and_zero_shot_find_the_relevant_documents(collection):
    bm25 = evaluate(collection, "bm25", "all")
    assert bm25["queries"] == 6 and bm25["ndcg@10"] > 0.6
    dense = evaluate(collection, "zero-shot", "all")
    assert dense["ndcg@10"] > 0.9  # all-MiniLM-L6-v2 solves this toy collection
    assert dense["recall@100"] == 1.0


def test_model_directory_is_an_encoder(collection, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base_model_path(), model)
    assert (
        evaluate(collection, str(model), "all")["ndcg@10"]
        == evaluate(collection, "zero-shot", "all")["ndcg@10"]
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (model / name).unlink(missing_ok=True)
    with pytest.raises(KuberankError, match="has no tokenizer"):
        evaluate(collection, str(model), "all")


def test_popularity_on_interactions_and_refused_on_search(tmp_path, collection):
    log = write_jsonl(tmp_path / "l.jsonl", interaction_rows(users=6, per_user=5))
    result = evaluate(f"interactions:{log}", "popularity", "test")
    assert result["queries"] == 6 and 0 <= result["ndcg@10"] <= 1
    with pytest.raises(KuberankError, match="popularity: a recommendation baseline"):
        evaluate(collection, "popularity", "all")


def test_movielens_popularity_matches_the_reference_protocol():
    # Leave-last-out with ties in log order: test nDCG@10 0.0449 (0.0254 when ties went to the
    # higher item id: issue 15).
    result = evaluate(datasets.load("movielens-100k"), "popularity", "test")
    assert result["queries"] == 943
    assert abs(result["ndcg@10"] - 0.0449) < 0.002
    # the same ten popular items for (nearly) everyone: little coverage, all in the head
    assert result["coverage@10"] < 0.1 and result["gini@10"] > 0.95
    assert result["exposure_head@10"] > 0.99 and result["exposure_tail@10"] == 0.0


def test_beyond_accuracy_metrics_for_every_ranker_kind(collection):
    bm25 = evaluate(collection, "bm25", "all")
    dense = evaluate(collection, "zero-shot", "all")
    for result in (bm25, dense):
        assert 0 < result["coverage@10"] <= 1 and 0 <= result["gini@10"] < 1
        assert 0 < result["ild@10"] <= 2 and result["novelty@10"] >= 0
        shares = [result[f"exposure_{t}@10"] for t in ("head", "mid", "tail")]
        assert sum(shares) == pytest.approx(1.0)
    # six documents, six queries, ten slots each: every document is shown to every query
    assert dense["coverage@10"] == 1.0 and dense["gini@10"] == pytest.approx(0.0)


def test_mmr_reranking_trades_relevance_for_diversity(collection, capsys):
    plain = evaluate(collection, "zero-shot", "all")
    same = evaluate(collection, "zero-shot", "all", mmr_lambda=1.0)
    assert same["ndcg@10"] == plain["ndcg@10"] and same["ild@10"] == plain["ild@10"]
    assert same["mmr_lambda"] == 1.0 and "mmr_lambda" not in plain
    # lambda 0: after the best item, each pick is the one least like those already chosen
    from kuberank import beyond_accuracy
    from kuberank.components.evaluate import load_ranker, rank

    data = datasets.load(collection)
    vectors = beyond_accuracy.item_embeddings(data)
    task = datasets.eval_task(data, "all")
    plain_run = rank(load_ranker("bm25"), task)
    run = rank(load_ranker("bm25"), task, reranking=("mmr_lambda", 0.0))
    row = {iid: i for i, iid in enumerate(data.item_ids)}
    for qid, ranked in run.items():
        assert ranked[0] == plain_run[qid][0] and sorted(ranked) == sorted(plain_run[qid])
        first = vectors[row[ranked[0]]]
        sims = {i: float(vectors[row[i]] @ first) for i in ranked[1:]}
        assert sims[ranked[1]] == min(sims.values())
    assert main(["evaluate", "--dataset", collection, "--model", "bm25", "--mmr-lambda", "2"]) == 2
    assert "--mmr-lambda: 2.0 is not in [0, 1]" in capsys.readouterr().err


def test_mmr_compares_a_dense_models_own_item_vectors_as_serving_does(collection, monkeypatch):
    """Offline MMR of a dense model uses its item tower's vectors (what its served index
    holds); only rankers without vectors fall back to the base encoder's."""
    from kuberank import beyond_accuracy
    from kuberank.components.evaluate import load_ranker, mmr_vectors, rank

    data = datasets.load(collection)
    task = datasets.eval_task(data, "all")
    base = beyond_accuracy.item_embeddings(data)
    bm25 = load_ranker("bm25")
    bm25.prepare(task)
    assert mmr_vectors(bm25, data) is base

    def no_base_vectors(dataset):
        raise AssertionError("a dense model's MMR must not encode items with the base encoder")

    monkeypatch.setattr(beyond_accuracy, "item_embeddings", no_base_vectors)
    dense = load_ranker("zero-shot")
    run = rank(dense, task, reranking=("mmr_lambda", 0.0))
    own = mmr_vectors(dense, data)
    assert own.shape == (len(data.item_ids), dense.item_text.shape[1])
    np.testing.assert_allclose(np.linalg.norm(own, axis=1), 1.0, atol=1e-5)
    assert sorted(run) == sorted(task.query_ids)


def test_calibration_and_tail_boost_rerank_towards_their_goals(
    tmp_path, collection, capsys, monkeypatch
):
    """Steck's calibration lowers miscalibration@10, the long-tail boost raises the long tail's
    share of the lists; both re-order the same candidates, one at a time. The boost and the
    popularity metrics share one count of the training popularity."""
    from kuberank import beyond_accuracy

    real_count, counts = beyond_accuracy.train_popularity, []

    def counted(data):
        counts.append(data.name)
        return real_count(data)

    monkeypatch.setattr(beyond_accuracy, "train_popularity", counted)
    # 20 users; each watches 4 items of its own (group "a", seen by nobody else), then 2 of 12
    # shared items (group "b"): popularity ranks "b" first, the histories are 2/3 "a"
    rows = []
    for u in range(20):
        own = [f"a{4 * u + j}" for j in range(4)]
        shared = [f"b{(2 * u + j) % 12}" for j in range(2)]
        for t, item in enumerate(own + shared):
            rows.append({"user_id": f"u{u}", "item_id": item, "timestamp": t, "rating": 4})
    data = datasets.load(f"interactions:{write_jsonl(tmp_path / 'l.jsonl', rows)}")
    data.items["genres"] = [[i[0]] for i in data.items["item_id"]]
    plain = evaluate(data, "popularity", "test")
    calibrated = evaluate(data, "popularity", "test", calibration=1.0)
    assert calibrated["calibration"] == 1.0 and "calibration" not in plain
    assert calibrated["miscalibration@10"] < plain["miscalibration@10"]
    counts.clear()
    boosted = evaluate(data, "popularity", "test", tail_boost=1.0)
    assert len(counts) == 1  # once per evaluation, boost and metrics alike
    assert boosted["tail_boost"] == 1.0 and boosted["arp@10"] <= plain["arp@10"]
    assert boosted["exposure_tail@10"] == 1.0 > plain["exposure_tail@10"]  # the tail first
    assert evaluate(data, "popularity", "test", tail_boost=0.0)["arp@10"] == plain["arp@10"]
    with pytest.raises(KuberankError, match="one re-ranking at a time"):
        evaluate(data, "popularity", "test", mmr_lambda=0.5, tail_boost=0.5)
    with pytest.raises(KuberankError, match="--tail-boost: 1.5 is not in"):
        evaluate(data, "popularity", "test", tail_boost=1.5)
    args = ["evaluate", "--dataset", collection, "--model", "bm25", "--calibration", "0.5"]
    assert main(args) == 2
    assert "--calibration: calibrates to the 'genres'" in capsys.readouterr().err
    assert "miscalibration@10" not in evaluate(collection, "bm25", "all")


def test_cli_json_contract(collection, capsys):
    assert (
        main(["evaluate", "--dataset", collection, "--model", "bm25", "--split", "all", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {"ndcg@10", "mrr@10", "recall@100", "queries"} <= set(out)
    assert {"coverage@10", "gini@10", "arp@10", "ild@10", "novelty@10"} <= set(out)
    assert {"exposure_head@10", "exposure_mid@10", "exposure_tail@10"} <= set(out)
    assert out["split"] == "all" and out["model"] == "bm25"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nonsense"], "--model: 'nonsense' is neither a baseline"),
        (["--model", "bm25", "--split", "validation"], "split 'validation' does not exist"),
    ],
)
def test_cli_errors_name_the_field(collection, capsys, args, message):
    assert main(["evaluate", "--dataset", collection, *args]) == 2
    assert message in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    from kuberank.cli import build_parser

    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name, sub in actions[0].choices.items():
        assert sub.format_help().startswith("usage: kuberank " + name)


def _with_dev(tmp_path):
    from tests.fixtures import QRELS

    split = {"train": ["q1", "q2"], "dev": ["q3", "q4"], "test": ["q5", "q6"]}
    files = {name: {q: QRELS[q] for q in qids} for name, qids in split.items()}
    return f"beir:{write_beir(tmp_path / 'd', files)}"


def test_hybrid_fits_its_weight_on_the_queries_outside_test(tmp_path):
    collection = _with_dev(tmp_path)
    result = evaluate(collection, "zero-shot", "test", retrieval="hybrid")
    fused = result["fusion"]
    assert fused["method"] == "convex" and fused["fitted_on"] == "tuning"
    assert 0.0 <= fused["weight"] <= 1.0 and len(fused["tuning_ndcg10"]) == 21
    assert result["model"] == "zero-shot+bm25" and result["queries"] == 2
    # weight 1 is the dense ranking: the fitted curve's end point is dense nDCG@10 on the
    # tuning queries (train and validation: q1-q4)
    tuning = evaluate(collection, "zero-shot", "tuning")
    assert tuning["queries"] == 4 and fused["tuning_ndcg10"]["1.0"] == round(tuning["ndcg@10"], 4)
    lexical = evaluate(collection, "zero-shot", "test", retrieval="bm25")
    assert lexical["model"] == "bm25"
    assert lexical["ndcg@10"] == evaluate(collection, "bm25", "test")["ndcg@10"]


def test_hybrid_without_validation_fuses_by_rrf_and_says_so(collection):
    result = evaluate(collection, "zero-shot", "all", retrieval="hybrid")
    assert result["fusion"]["method"] == "rrf" and "no validation split" in result["fusion"]["note"]
    assert result["ndcg@10"] > 0.6


def test_cli_retrieval_errors(collection, capsys):
    args = ["evaluate", "--dataset", collection, "--split", "all"]
    assert main([*args, "--model", "bm25", "--retrieval", "hybrid"]) == 2
    assert "bm25 is not one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--model", "zero-shot", "--retrieval", "lexical"])
    assert "invalid choice: 'lexical'" in capsys.readouterr().err


def test_hybrid_is_refused_on_recommendation_logs(tmp_path):
    log = write_jsonl(tmp_path / "l.jsonl", interaction_rows(users=6, per_user=5))
    with pytest.raises(KuberankError, match="recommendation log"):
        evaluate(f"interactions:{log}", "zero-shot", "test", retrieval="hybrid")


def test_hybrid_and_bm25_on_a_store_use_its_lexical_index(tmp_path_factory, tmp_path):
    """`kuberank evaluate --model STORE --retrieval hybrid|bm25` scores BM25 with the store's
    STORE/lexical (written by `kuberank index`), not a second index; the ranking is the one a
    BM25 built here gives."""
    from test_index import serving_store

    from kuberank.components.evaluate import BM25Ranker, HybridRanker, load_ranker, rank
    from kuberank.components.evaluate import retrieval_ranker as ranker_of
    from kuberank.lexical import LexicalIndex
    from kuberank.store import LEXICAL_DIR

    store, _, dataset = serving_store(tmp_path_factory)
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    shutil.rmtree(copy / "model")  # the export fixture's F is a stand-in: evaluate the encoder
    task = datasets.eval_task(datasets.load(dataset), "all")
    hybrid = ranker_of(str(copy), "hybrid")
    run = rank(hybrid, task)
    assert hybrid.fusion["lexical"] == "store" and hybrid.lexical.index is hybrid.lexical.stored
    record = LexicalIndex.load(copy / LEXICAL_DIR).meta["fusion"]
    rebuilt = HybridRanker(load_ranker(str(copy)), stored=record)
    assert rank(rebuilt, task) == run and rebuilt.fusion["lexical"] == "built"
    lexical = ranker_of(str(copy), "bm25")
    assert isinstance(lexical, BM25Ranker) and rank(lexical, task) == rank(BM25Ranker(), task)
    assert lexical.source == "store"
    # a store indexed over other items: BM25 is built for the evaluated ones
    foreign = BM25Ranker(LexicalIndex.build(["x", "y"], ["one text", "another"]))
    foreign.prepare(task)
    assert foreign.source == "built" and foreign.index.ids == list(task.dataset.item_ids)
