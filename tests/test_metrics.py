"""Metrics agree with trec_eval (pytrec_eval) on tie-free runs."""

import math

import pytrec_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from kuberank import metrics

DOCS = [f"d{i}" for i in range(30)]


@st.composite
def runs_and_qrels(draw):
    n_queries = draw(st.integers(1, 5))
    run, qrels = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        ranked = draw(st.lists(st.sampled_from(DOCS), min_size=0, max_size=25, unique=True))
        judged = draw(
            st.dictionaries(st.sampled_from(DOCS), st.integers(0, 3), min_size=1, max_size=10)
        )
        run[qid] = ranked
        qrels[qid] = judged
    return run, qrels


def trec(run, qrels, measures):
    # Distinct scores in rank order: a tie-free run, so trec_eval keeps our order.
    scored = {q: {d: float(len(docs) - i) for i, d in enumerate(docs)} for q, docs in run.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures)
    return evaluator.evaluate(scored)


@settings(max_examples=150, deadline=None)
@given(runs_and_qrels())
def test_per_query_metrics_match_pytrec_eval(data):
    run, qrels = data
    reference = trec(
        run, qrels, {"ndcg_cut.5,10", "recall.5,10", "map", "recip_rank", "success.1,5,10"}
    )
    for qid, ranked in run.items():
        rels = qrels[qid]
        if not any(r > 0 for r in rels.values()) or qid not in reference:
            continue
        ref = reference[qid]
        for k in (5, 10):
            assert math.isclose(
                metrics.ndcg_at_k(ranked, rels, k), ref[f"ndcg_cut_{k}"], abs_tol=1e-6
            )
            assert math.isclose(
                metrics.recall_at_k(ranked, rels, k), ref[f"recall_{k}"], abs_tol=1e-6
            )
        for k in (1, 5, 10):
            assert math.isclose(
                metrics.hit_rate_at_k(ranked, rels, k), ref[f"success_{k}"], abs_tol=1e-6
            )
        assert math.isclose(metrics.average_precision(ranked, rels), ref["map"], abs_tol=1e-6)
        # MRR@k is trec_eval's reciprocal rank of the run cut at k.
        cut = trec({qid: ranked[:10]}, {qid: rels}, {"recip_rank"})
        assert math.isclose(
            metrics.mrr_at_k(ranked, rels, 10), cut[qid]["recip_rank"] if cut else 0.0, abs_tol=1e-6
        )


def test_evaluate_run_skips_unjudged_and_scores_missing_queries_zero():
    qrels = {"a": {"d1": 1}, "b": {"d2": 0}, "c": {"d3": 2}}
    result = metrics.evaluate_run({"a": ["d1", "d9"]}, qrels, cutoffs=(10,))
    assert result["queries"] == 2  # "b" has no relevant item; "c" is judged but not in the run
    assert result["ndcg@10"] == 0.5
    assert result["mrr@10"] == 0.5


def test_graded_ndcg_uses_linear_gain():
    rels = {"a": 2, "b": 1}
    ideal = 2 + 1 / math.log2(3)
    assert math.isclose(metrics.ndcg_at_k(["b", "a"], rels, 10), (1 + 2 / math.log2(3)) / ideal)
