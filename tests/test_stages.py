"""serving/stages.py: the request path is one list of stages, STAGES (encode, retrieve, rank);
both request paths and the stage deployments follow it. Adding a stage is one Stage subclass
and one list entry: a tiny extra stage between retrieve and rank runs on the colocated path
(the Ingress's own batch step), reading what retrieve filled in and filling what rank reads.
The split path over Ray Serve: tests/test_app.py."""

import numpy as np
import pytest
from fixtures import QUERIES
from test_index import serving_store

from kuberank.serving.encoders import QueryEncoding
from kuberank.serving.pipeline import PipelineRequest, load_pipeline
from kuberank.serving.settings import (
    BATCHES,
    DEPLOYMENTS,
    INGRESS,
    Settings,
    default_deployments,
)
from kuberank.serving.stages import STAGES, Encode, Rank, Retrieve, Stage


class Shortlist(Stage):
    """The tiny extra stage: drops the item ``d1`` from each request's candidates."""

    name = "shortlist"
    deployment = "Shortlister"  # its deployment, were the stages split

    def __init__(self, index):
        self.index = index

    @classmethod
    def load(cls, store, settings, encoding):
        return cls(store.index())

    def run_batch(self, requests, settings):
        for r in requests:
            if r.error is None:
                keep = np.array([self.index.ids[row] != "d1" for row in r.candidates], dtype=bool)
                r.candidates, r.found = r.candidates[keep], np.asarray(r.found)[keep]
        return {}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(serving_store(tmp_path_factory)[0])


def _run(pipe, query, k, history=()):
    request = PipelineRequest(query, list(history), None, k, query is None)
    [result], timings = pipe.run([request], None, Settings())
    return result, timings


def test_the_request_path_is_one_list_of_stages():
    assert [stage.name for stage in STAGES] == ["encode", "retrieve", "rank"]
    # each stage's deployment: the chart's and the metrics' names, derived from the list
    assert DEPLOYMENTS == (INGRESS, "QueryEncoder", "Retriever", "Ranker")
    assert list(default_deployments()) == list(DEPLOYMENTS)
    assert all(hasattr(Settings(), stage.batch) for stage in STAGES)
    # the batch settings build_app hands to the deployments and Settings checks: the colocated
    # path's and each stage's
    assert BATCHES == ("pipeline_batch", "encoder_batch", "retriever_batch", "ranker_batch")


def test_a_new_stage_is_one_class_and_one_list_entry(store):
    encoding = QueryEncoding("", Settings())
    plain = load_pipeline(store, encoding)
    assert [type(s) for s in plain.stages] == STAGES
    extended = load_pipeline(store, encoding, [Encode, Retrieve, Shortlist, Rank])
    for query, history in [(QUERIES["q1"], ()), (None, ["d2"])]:
        (ids, scores, _), timings = _run(plain, query, 6, history)
        assert "d1" in ids  # the fixture's six documents, less the history
        (short_ids, short_scores, _), short_timings = _run(extended, query, 6, history)
        # rank ranked what the new stage left of retrieve's candidates, with the same scores
        assert short_ids == [i for i in ids if i != "d1"]
        kept = [s for i, s in zip(ids, scores, strict=True) if i != "d1"]
        assert short_scores == pytest.approx(kept, abs=1e-6)  # F over 5 rows instead of 6
        # each stage's seconds, under its name (the Ingress reports them per stage)
        assert set(timings) == {"encode", "retrieve", "rank", "lexical"}
        assert set(short_timings) == set(timings) | {"shortlist"}
