"""serving/bench_retrieval.py: retrieval's cost needs a lexical index, and serves dense and
hybrid in one run."""

from __future__ import annotations

import pytest
from test_index import serving_store

from kuberank.errors import KuberankError
from kuberank.serving import bench_retrieval


def test_retrieval_cost_needs_a_lexical_index(tmp_path_factory, tmp_path):
    import shutil

    store, _, _ = serving_store(tmp_path_factory)
    bare = tmp_path / "store"
    shutil.copytree(store, bare, symlinks=True)
    shutil.rmtree(bare / "lexical")
    with pytest.raises(KuberankError, match="no lexical index.*kuberank index"):
        bench_retrieval.retrieval_cost(str(bare))


@pytest.mark.slow
def test_retrieval_cost_serves_dense_and_hybrid_in_one_run(tmp_path_factory):
    """On the cores split as the bench section splits them (two or more): recorded, named."""
    import os

    from kuberank.serving.bench_load import split_cpus

    store, _, _ = serving_store(tmp_path_factory)
    before = os.sched_getaffinity(0)
    split = split_cpus(before)
    result = bench_retrieval.retrieval_cost(
        str(store),
        levels=(2,),
        requests=20,
        max_seconds=20,
        queries=20,
        limit_seconds=0.2,
        split=split,
    )
    assert os.sched_getaffinity(0) == before
    if split is not None:
        app, generator = sorted(split[0]), sorted(split[1])
        assert result["config"]["cores"] == {"app": app, "generator": generator}
        where = f"(app on cores {app}, load generator on {generator})"
        assert where in bench_retrieval.format_retrieval_cost(result)
    served = result["served"]
    assert [r["target"] for r in served["dense"] + served["hybrid"]] == ["dense", "hybrid"]
    assert [r["target"] for r in result["rounds"]] == ["dense", "hybrid", "hybrid", "dense"]
    for one in result["rounds"]:  # admission may shed (503) on a loaded 2-core host
        assert one["requests"] == 20 and one["ok"] > 0 and set(one["errors"]) <= {"503"}
    assert result["ratios"]["served"][0]["level"] == 2.0
    assert result["limit"]["hybrid"]["stage_ms"]["lexical"] > 0
    table = bench_retrieval.format_retrieval_cost(result)
    assert "| served, c=2 |" in table and "(d) hybrid, ms per query by stage" in table
    dense, hybrid = served["dense"][0], served["hybrid"][0]
    counts = f"{dense['shed']} of {dense['requests']} / {hybrid['shed']} of {hybrid['requests']}"
    assert f"| {counts} |" in table
