"""Request filters (kuberank.serving.filters): the attributes an index keeps, predicates on
them, include/exclude, retrieval that still fills k, and the served API's 422s (slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fixtures import ITEMS, QUERIES, write_beir, write_jsonl
from pydantic import ValidationError
from test_app import post_admitted as post
from test_app import serving  # noqa: F401
from test_export import exported_store

from kuberank.components.index import attributes_of
from kuberank.serving import filters
from kuberank.serving.filters import Filter, FilterError


class _Index:  # the two things filters read from an ItemIndex
    def __init__(self, attributes):
        self.attributes, self.ids = attributes, list(ITEMS["item_id"])

    def __len__(self):
        return len(self.ids)

    def rows_of(self, ids):
        known = [self.ids.index(i) for i in ids if i in self.ids]
        return np.array(known, dtype=np.int64), [i for i in ids if i not in self.ids]


def _passing(where: dict) -> list[str]:
    index = _Index(attributes_of(ITEMS))
    keep = filters.attribute_table(index).mask(Filter.model_validate({"where": where}))
    return [i for i, k in zip(index.ids, keep, strict=True) if k]


@pytest.mark.parametrize(
    "where, expected",
    [
        ({"genres": "Drama"}, ["a", "b"]),  # a list attribute holds the value
        ({"genres": {"in": ["Action", "Comedy"]}}, ["a", "c"]),
        ({"year": {"gte": 1995}}, ["a", "b"]),  # a missing year passes no range
        ({"year": {"gt": 1990, "lt": 2001}}, ["a"]),
        ({"year": {"lte": 1995.0}}, ["a", "d"]),
        ({"year": 2001}, ["b"]),
        ({"year": {"in": [1990, 2001]}}, ["b", "d"]),
        ({"studio": "x", "kids": True}, ["a", "d"]),  # every predicate must hold
        ({"studio": {"in": ["y", "z"]}}, ["b"]),
        ({"genres": "Western"}, []),
    ],
)
def test_where_predicates(where, expected):
    assert _passing(where) == expected


@pytest.mark.parametrize(
    "where, field, problem",
    [
        ({"rating": 5}, "filter.where.rating", "holds no attribute 'rating'"),
        ({"genres": {"gte": 1}}, "filter.where.genres", "a range on a strings attribute"),
        ({"year": "1995"}, "filter.where.year", "'1995' is not a value of a number attribute"),
        ({"year": {"in": [1995, True]}}, "filter.where.year", "True is not a value"),
        ({"kids": 1}, "filter.where.kids", "1 is not a value of a boolean attribute"),
    ],
)
def test_predicates_the_index_cannot_answer_name_the_field(where, field, problem):
    table = filters.attribute_table(_Index(attributes_of(ITEMS)))
    with pytest.raises(FilterError) as caught:
        table.check(Filter.model_validate({"where": where}))
    assert caught.value.field == field and problem in caught.value.problem


@pytest.mark.parametrize(
    "body, field",
    [
        ({"include": ["a", "b"], "exclude": ["b"]}, "include"),  # contradictory
        ({"include": ["a"], "exclude": []}, "include"),  # one or the other
        ({"colour": "red"}, "colour"),
        ({"exclude": "a"}, "exclude"),
        ({"include": []}, "include"),
        ({"where": {"year": {}}}, "where.year.range"),
        ({"where": {"year": {"gte": "1990"}}}, "where.year.range.gte"),
        ({"where": {"year": {"in": []}}}, "where.year.in.in"),
        ({"where": {"year": {"in": [1], "gte": 1}}}, "where.year.in.gte"),
    ],
)
def test_malformed_filters_are_refused_at_the_field(body, field):
    with pytest.raises(ValidationError) as caught:
        Filter.model_validate(body)
    locs = [".".join(str(p) for p in e["loc"]) for e in caught.value.errors()]
    assert any(loc.startswith(field) for loc in locs), locs


def test_blocked_rows_combine_include_exclude_and_where():
    index = _Index(attributes_of(ITEMS))
    blocked = filters.blocked_rows
    assert blocked(index, None).tolist() == []
    assert blocked(index, Filter(exclude=["b", "unknown"])).tolist() == [1]
    assert blocked(index, Filter(include=["a", "c", "zz"])).tolist() == [1, 3]
    both = Filter.model_validate({"include": ["a", "b", "c"], "where": {"genres": "Drama"}})
    assert blocked(index, Filter(exclude=["c"], where={"year": {"lt": 2000}})).tolist() == [1, 2]
    assert blocked(index, both).tolist() == [2, 3]
    assert blocked(_Index(None), Filter(exclude=["a"])).tolist() == [0]  # an index without any


def test_served_schema_lists_the_index_attributes():
    from kuberank.serving.app import api

    schema = filters.served_schema(api.openapi(), {"genres": "strings", "year": "number"})
    where = schema["components"]["schemas"]["Filter"]["properties"]["where"]
    assert set(where["properties"]) == {"genres", "year"} and where["additionalProperties"] is False
    assert len(where["properties"]["year"]["anyOf"]) == 3  # value, {"in"}, range
    assert len(where["properties"]["genres"]["anyOf"]) == 2  # no range on strings


# --------------------------------------------------------------------------- a real index


@pytest.fixture(scope="module")
def attributed_store(tmp_path_factory):
    """The exported base model with an index of the BEIR fixture whose documents carry
    metadata (topic, year)."""
    from kuberank.components.index import build_index

    exported, _, model_dir = exported_store(tmp_path_factory)
    root = tmp_path_factory.mktemp("filters")
    store = root / "store"
    shutil.copytree(exported, store, symlinks=True)
    shutil.rmtree(store / "index")
    beir = write_beir(root / "beir")
    rows = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    for n, row in enumerate(rows):  # d1..d6: years 2000..2005, topics alternate
        row["metadata"] = {"topic": "tech" if n % 2 == 0 else "life", "year": 2000 + n}
    write_jsonl(beir / "corpus.jsonl", rows)
    meta = build_index(model_dir, f"beir:{beir}", store)
    assert meta["attributes"] == {"topic": "string", "year": "number"}
    return store


def _run(pipe, query, k, flt=None, history=(), explain=False):
    from kuberank.serving.pipeline import PipelineRequest
    from kuberank.serving.settings import Settings

    request = PipelineRequest(query, list(history), None, k, query is None, explain, flt)
    [result], _ = pipe.run([request], None, Settings(candidates=2, rank_all_max=5000))
    return result


def test_filters_apply_before_top_k_and_still_fill_k(attributed_store):
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.serving.settings import Settings

    pipe = load_pipeline(str(attributed_store), QueryEncoding("", Settings()))
    ids, scores, _ = _run(pipe, QUERIES["q1"], k=5)
    assert len(ids) == 5 and ids[0] == "d1"
    # candidates=2: retrieval widens past the excluded rows, so k items still come back
    ids2, _, _ = _run(pipe, QUERIES["q1"], 5, Filter(exclude=[ids[0], ids[1]]))
    assert ids2 == [i for i in ids if i not in ids[:2]] + [
        i for i in pipe.index.ids if i not in ids
    ]
    tech = Filter.model_validate({"where": {"topic": "tech", "year": {"gte": 2001}}})
    assert sorted(_run(pipe, QUERIES["q1"], 5, tech)[0]) == ["d3", "d5"]  # fewer pass than k
    assert sorted(_run(pipe, QUERIES["q1"], 5, Filter(include=["d4", "d6"]))[0]) == ["d4", "d6"]
    # a recommendation (the history's mean, every item scored) is filtered too
    rec, _, why = _run(pipe, None, 3, Filter(exclude=["d2"]), history=["d1"], explain=True)
    assert "d2" not in rec and "d1" not in rec and len(rec) == 3 and len(why) == 3


# --------------------------------------------------------------------------- served (slow)


@pytest.mark.slow
def test_served_filters_and_their_422s(serving):  # noqa: F811
    from kuberank.serving.explain import total

    k = 5  # the served fixture index holds six documents
    query = {"query": QUERIES["q1"], "k": k, "explain": True}
    for prefix in ("", "/tri"):  # in-process encoder, and the real tritonserver
        status, body = post(serving, prefix + "/search", query)
        assert status == 200 and len(body["items"]) == k, body
        top = body["items"][0]["id"]
        status, filtered = post(
            serving, prefix + "/search", {**query, "filter": {"exclude": [top]}}
        )
        assert status == 200, filtered
        ids = [item["id"] for item in filtered["items"]]
        assert len(ids) == k and top not in ids
        assert ids[: k - 1] == [item["id"] for item in body["items"]][1:]
        for item in filtered["items"]:
            assert abs(total(item["explain"]) - item["score"]) < 1e-4
    status, body = post(serving, "/search", {**query, "filter": {"include": ["d4", "d2", "zz"]}})
    assert status == 200 and sorted(i["id"] for i in body["items"]) == ["d2", "d4"]
    # the stage deployments (split path): a recommendation, filtered
    status, body = post(
        serving,
        "/rec/recommend",
        {"user_id": "u0", "history": ["d1"], "k": 3, "filter": {"exclude": ["d2", "d3"]}},
    )
    assert status == 200 and len(body["items"]) == 3
    assert not {i["id"] for i in body["items"]} & {"d1", "d2", "d3"}
    for path, bad, field in [
        ("/search", {"include": ["d1"], "exclude": ["d1"]}, "filter.include"),
        ("/search", {"where": {"genre": "Comedy"}}, "filter.where.genre"),  # none kept
        ("/rec/recommend", {"colour": "red"}, "filter.colour"),
        ("/search", {"where": {"year": {"gte": "1990"}}}, "filter.where.year"),
    ]:
        body = {"query": "pasta"} if path == "/search" else {"history": ["d1"]}
        status, answer = post(serving, path, {**body, "filter": bad})
        assert status == 422, answer
        assert answer["error"]["details"][0]["field"].startswith(field), answer
    # the served schema lists the attributes the index holds: none here
    from kuberank.serving.launcher import http_json

    status, schema = http_json("GET", serving["base"] + "/openapi.json")
    where = schema["components"]["schemas"]["Filter"]["properties"]["where"]
    assert status == 200 and where["properties"] == {} and where["additionalProperties"] is False
