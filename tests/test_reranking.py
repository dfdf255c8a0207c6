"""serving/reranking.py: MMR, calibration and the long-tail boost as the served re-ranking
stage: what each index offers, the same cores as offline, the request model and schema, and
the refusals (422 at the field, a default the index cannot serve refused at load)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from fixtures import QUERIES, write_beir, write_jsonl
from pydantic import ValidationError
from test_export import exported_store

from kuberank.calibration import calibrate, group_matrix, target
from kuberank.errors import KuberankError
from kuberank.item_index import POPULARITY_FILE
from kuberank.longtail import boosted_order, long_tail
from kuberank.serving import reranking


def _index(genres=None, popularity=None, n=6):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    attributes = {"fields": {}, "values": {}}
    if genres is not None:
        attributes = {"fields": {"genres": "strings"}, "values": {"genres": genres}}
    return SimpleNamespace(embeddings=vectors, attributes=attributes, popularity=popularity)


def test_what_an_index_offers():
    plain = _index()
    assert reranking.missing(plain, "mmr_lambda") is None
    assert "no such item attribute" in reranking.missing(plain, "calibration")
    assert "popularity" in reranking.missing(plain, "tail_boost")
    assert "one of" in reranking.missing(plain, "nope")
    full = _index([["a"]] * 6, {"users": 3, "counts": [0, 1, 2, 3, 0, 0]})
    assert all(reranking.missing(full, kind) is None for kind in reranking.KINDS)


def test_the_served_orders_are_the_offline_cores():
    genres = [["a"], ["a"], ["a"], ["b"], ["b"], ["a", "b"]]
    popularity = {"users": 9, "counts": [9, 8, 7, 1, 0, 2]}
    index = _index(genres, popularity)
    reranker = reranking.Reranker(index)
    cands = np.array([5, 0, 1, 2, 3, 4])  # index rows
    scores = np.array([0.1, 0.9, 0.8, 0.7, 0.3, 0.2])
    order = np.lexsort((cands, -scores))  # F's order: positions into cands
    history = np.array([3, 4])  # all "b"
    got = reranker.order("calibration", 0.9, cands, order, scores, history, 2, 2)
    groups = group_matrix(genres)[1]
    head = order[:100]
    expected = head[calibrate(scores[head], groups[cands[head]], target(groups, history), 0.9, 2)]
    assert got.tolist() == expected.tolist()
    assert {int(cands[p]) for p in got[:2]} & {3, 4, 5}  # towards the history's "b"
    boosted = reranker.order("tail_boost", 0.5, cands, order, scores, history, 2, 2)
    tail = long_tail(np.array(popularity["counts"]))
    assert boosted.tolist() == head[boosted_order(scores[head], tail[cands[head]], 0.5)].tolist()
    assert sorted(boosted.tolist()) == sorted(order.tolist())  # nothing lost
    # without a grouped history there is nothing to calibrate to: F's order
    same = reranker.order("calibration", 1.0, cands, order, scores, np.array([], int), 2, 2)
    assert same.tolist() == order.tolist()


def test_only_the_top_100_are_reordered():
    n = 150
    unseen = [*range(75, 100), *range(125, n)]  # the long tail: 50 rows nobody saw
    counts = [0 if r in unseen else 10 for r in range(n)]
    reranker = reranking.Reranker(_index(popularity={"users": 10, "counts": counts}, n=n))
    cands = np.arange(n)
    scores = np.linspace(1.0, 0.0, n)  # F's order: row 0 first
    order = np.arange(n)
    got = reranker.order("tail_boost", 1.0, cands, order, scores, np.array([], int), 10, 10)
    assert got[:100].tolist() == [*range(75, 100), *range(75)]  # the head's tail items first
    assert got[100:].tolist() == list(range(100, n))  # the rest keep F's order, tail or not
    assert sorted(got.tolist()) == list(range(n))


def _catalogue(seed: int, n: int = 130):
    """``n`` random items: vectors, genre groups ("a"/"b"), the long tail of random counts, the
    model's order of their rows and its descending scores."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 4))
    groups = group_matrix([["a"] if i % 3 else ["b"] for i in range(n)])[1]
    tail = long_tail(rng.integers(0, 50, size=n))
    return n, vectors, groups, tail, rng.permutation(n), np.linspace(1.0, 0.0, n)


def test_one_dispatch_offline_and_served():
    """kuberank/reranking.py maps each kind to its core once: offline (the top 100 of a ranked
    list, MMR over all of it, calibration picking 10) and served (MMR picking ``depth`` of
    all candidates) are the same calls with their own head and picks."""
    from kuberank.components.evaluate import RERANKINGS
    from kuberank.diversity import mmr
    from kuberank.reranking import CALIBRATED_K, Reranker

    assert RERANKINGS == reranking.KINDS == ("mmr_lambda", "calibration", "tail_boost")
    n, vectors, groups, tail, items, scores = _catalogue(1)
    core = Reranker(vectors, groups, tail)
    history = np.array([0, 3])  # all "b"
    offline = core.order("mmr_lambda", 0.3, items, scores)
    assert offline[:100].tolist() == mmr(scores[:100], vectors[items[:100]], 0.3).tolist()
    assert offline[100:].tolist() == list(range(100, n))
    served = core.order("mmr_lambda", 0.3, items, scores, picks=5, head=None)
    picks = mmr(scores, vectors[items], 0.3, 5).tolist()
    assert served.tolist() == [*picks, *sorted(set(range(n)) - set(picks))]  # then the rest
    picked = core.order("calibration", 0.9, items, scores, history)
    p = target(groups, history)
    expected = calibrate(scores[:100], groups[items[:100]], p, 0.9, CALIBRATED_K)
    assert picked.tolist() == [*expected.tolist(), *range(100, n)]
    assert core.order("calibration", 0.9, items, scores, []).tolist() == list(range(n))
    boosted = core.order("tail_boost", 0.4, items, scores, head=None)
    assert boosted.tolist() == boosted_order(scores, tail[items], 0.4).tolist()
    with pytest.raises(KuberankError, match="one of mmr_lambda, calibration, tail_boost"):
        core.order("mmr", 0.3, items, scores)


def test_the_order_holds_every_position_once_and_a_length_reads_its_start():
    """The contract the caps walk (every position once: the picks, the rest of the head in
    the model's order, then the items past the head) holds whole, and a ``length`` (a served
    list without caps reads its first k) answers exactly the start of that same order."""
    from kuberank.reranking import Reranker

    n, vectors, groups, tail, items, scores = _catalogue(2)
    core = Reranker(vectors, groups, tail)
    history = np.array([0, 3])
    cases = [
        ("mmr_lambda", 0.3, 7, None),  # served MMR: 7 picks of all, then the rest
        ("mmr_lambda", 0.3, 7, 100),
        ("calibration", 0.9, 10, 100),
        ("calibration", 0.9, 10, 20),
        ("tail_boost", 0.4, None, 100),
    ]
    for kind, value, picks, head in cases:
        whole = core.order(kind, value, items, scores, history, picks, head)
        assert sorted(whole.tolist()) == list(range(n)), kind
        size = n if head is None else head
        chosen = whole[: picks or size]
        assert whole[len(chosen) : size].tolist() == sorted(set(range(size)) - set(chosen))
        assert whole[size:].tolist() == list(range(size, n))
        for length in (1, 5, 7, 10, 11, 40, size, n, n + 5):
            got = core.order(kind, value, items, scores, history, picks, head, length)
            assert got.dtype == np.int64 and got.tolist() == whole[:length].tolist(), (
                kind,
                length,
            )
    plain = core.order("calibration", 0.9, items, scores, [], length=4)
    assert plain.tolist() == [0, 1, 2, 3]  # no grouped history: the model's order


def test_a_request_names_exactly_one_reranking():
    from kuberank.serving.http_api import Diversity, SearchRequest

    assert Diversity.model_validate({"calibration": 0.5}).reranking() == ("calibration", 0.5)
    assert Diversity.model_validate({"tail_boost": 1}).reranking() == ("tail_boost", 1.0)
    for bad in ({}, {"mmr_lambda": 0.5, "tail_boost": 0.5}, {"calibration": None}):
        with pytest.raises(ValidationError):
            SearchRequest.model_validate({"query": "x", "diversity": bad})
    schema = Diversity.model_json_schema()
    assert schema["minProperties"] == schema["maxProperties"] == 1
    assert set(schema["properties"]) == set(reranking.KINDS)
    assert all("default" not in p for p in schema["properties"].values())
    served = reranking.served_schema(
        {"components": {"schemas": {"Diversity": json.loads(json.dumps(schema))}}}, _index()
    )
    assert set(served["components"]["schemas"]["Diversity"]["properties"]) == {"mmr_lambda"}


def test_settings_take_at_most_one_default():
    from kuberank.serving.settings import Settings

    assert Settings(calibration=0.3).reranking() == ("calibration", 0.3)
    assert Settings().reranking() is None
    with pytest.raises(KuberankError, match="calibration and tail_boost: at most one"):
        Settings(calibration=0.3, tail_boost=0.1)
    with pytest.raises(KuberankError, match="tail_boost: -0.1 is not in"):
        Settings(tail_boost=-0.1)


# --------------------------------------------------------------------------- real indexes


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The exported base model indexed twice: a BEIR corpus whose documents carry genres
    (calibration), and an interaction log (popularity: the long-tail boost)."""
    from kuberank.components.index import build_index

    exported, _, model_dir = exported_store(tmp_path_factory)
    root = tmp_path_factory.mktemp("reranking")
    out = {}
    for name in ("genres", "log"):
        store = root / name
        shutil.copytree(exported, store, symlinks=True)
        shutil.rmtree(store / "index")
        out[name] = store
    beir = write_beir(root / "beir")
    rows = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    for n, row in enumerate(rows):  # d1, d3, d5: "tech"; d2, d4, d6: "life"
        row["metadata"] = {"genres": ["tech"] if n % 2 == 0 else ["life"]}
    write_jsonl(beir / "corpus.jsonl", rows)
    build_index(model_dir, f"beir:{beir}", out["genres"])
    log = []
    for u in range(6):  # item i0 seen by everyone, i1..i5 by fewer and fewer
        for t, item in enumerate(range(0, 6 - u)):
            log.append({"user_id": f"u{u}", "item_id": f"i{item}", "timestamp": t, "rating": 4})
    meta = build_index(
        model_dir, f"interactions:{write_jsonl(root / 'log.jsonl', log)}", out["log"]
    )
    assert (out["log"] / "index" / POPULARITY_FILE).is_file()
    assert not (out["genres"] / "index" / POPULARITY_FILE).exists()
    assert meta["kind"] == "recommendation"
    return out


def _run(pipe, query, history, k, kind=None, value=None):
    from kuberank.serving.pipeline import PipelineRequest
    from kuberank.serving.settings import Settings

    request = PipelineRequest(query, list(history), None, k, query is None)
    request.reranking = None if kind is None else (kind, value)
    [result], _ = pipe.run([request], None, Settings(candidates=100, rank_all_max=5000))
    return result[0]


def test_served_calibration_follows_the_history_genres(stores):
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.serving.settings import Settings

    pipe = load_pipeline(str(stores["genres"]), QueryEncoding("", Settings()))
    genre = dict(zip(pipe.index.ids, pipe.index.attributes["values"]["genres"], strict=True))
    history = ["d2", "d4"]  # "life" only
    plain = _run(pipe, QUERIES["q1"], history, 2)
    calibrated = _run(pipe, QUERIES["q1"], history, 2, "calibration", 1.0)
    share = [sum(genre[i] == ["life"] for i in ids) for ids in (plain, calibrated)]
    assert share[1] == 2 and share[1] > share[0], (plain, calibrated)
    assert _run(pipe, QUERIES["q1"], history, 2, "calibration", 0.0) == plain


def test_served_tail_boost_puts_long_tail_items_first(stores):
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.serving.settings import Settings

    pipe = load_pipeline(str(stores["log"]), QueryEncoding("", Settings()))
    counts = np.array(pipe.index.popularity["counts"])
    tail = dict(zip(pipe.index.ids, long_tail(counts), strict=True))
    seen = dict(zip(pipe.index.ids, counts, strict=True))
    plain = _run(pipe, None, ["i0"], 5)  # every other item: i4 and i5 are the long tail
    boosted = _run(pipe, None, ["i0"], 5, "tail_boost", 1.0)
    assert sorted(boosted) == sorted(plain)  # re-ordered, nothing lost
    assert [tail[i] for i in boosted] == [True, True, False, False, False], (plain, boosted)
    # each part keeps F's order
    assert [i for i in boosted if tail[i]] == [i for i in plain if tail[i]]
    assert [i for i in boosted if not tail[i]] == [i for i in plain if not tail[i]]
    assert sum(seen[i] for i in boosted[:2]) < sum(seen[i] for i in plain[:2])
    assert _run(pipe, None, ["i0"], 5, "tail_boost", 0.0) == plain


def test_a_default_the_index_cannot_serve_refuses_the_store(stores):
    from kuberank.serving.app import build_app

    with pytest.raises(KuberankError, match="tail_boost: needs the items' popularity"):
        build_app({"model_store": str(stores["genres"]), "triton_url": "", "tail_boost": 0.2})
    with pytest.raises(KuberankError, match="calibration: calibrates to the 'genres'"):
        build_app({"model_store": str(stores["log"]), "triton_url": "", "calibration": 0.2})
