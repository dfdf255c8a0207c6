"""serving/bench_targets.py: the in-process limit reports each stage, the lexical one of
hybrid requests included."""

from __future__ import annotations

from test_index import serving_store

from kuberank.serving import bench_load, bench_targets


def test_in_process_limit_reports_the_lexical_stage_of_hybrid_requests(tmp_path_factory):
    store, _, _ = serving_store(tmp_path_factory)
    texts = bench_load.bench_queries(8)
    runs = {
        mode: bench_targets.in_process_limit(
            str(store), texts, batch_size=4, seconds=0.1, retrieval=mode
        )
        for mode in ("dense", "hybrid")
    }
    for mode, run in runs.items():
        assert run["retrieval"] == mode and run["ok"] >= len(texts)
        assert set(run["stage_ms"]) == {"encode", "retrieve", "rank", "lexical"}
    assert runs["dense"]["stage_ms"]["lexical"] == 0.0 < runs["hybrid"]["stage_ms"]["lexical"]
