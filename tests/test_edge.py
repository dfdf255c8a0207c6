"""The edge bundle written by the export: int8 encoder + tokenizer + int8 item embeddings, a
single-threaded runner, its size and latency."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_export import MAX_LENGTH, exported_store

from kuberank.components import edge
from kuberank.errors import KuberankError
from kuberank.onnx_encoder import OnnxEncoder

ITEMS = {
    "m1": "Star Wars (1977) Action|Adventure|Romance|Sci-Fi|War",
    "m2": "Toy Story (1995) Animation|Children's|Comedy",
    "m3": "Fargo (1996) Crime|Drama|Thriller",
    "m4": "Sleepless in Seattle (1993) Comedy|Romance",
    "m5": "Apollo 13 (1995) Action|Drama|Thriller",
    "m6": "The Lion King (1994) Animation|Children's|Musical",
    "m7": "Heat (1995) Action|Crime|Thriller",
    "m8": "Jurassic Park (1993) Action|Adventure|Sci-Fi",
    "m9": "Schindler's List (1993) Drama|War",
    "m10": "Babe (1995) Children's|Comedy|Drama",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    store, manifest, _ = exported_store(tmp_path_factory)
    bundle = tmp_path_factory.mktemp("edge") / "edge"
    shutil.copytree(store / "edge", bundle)
    # the index step embeds items with the store's fp32 encoder
    fp32 = OnnxEncoder(store / "onnx", max_length=MAX_LENGTH)
    embeddings = fp32.encode(list(ITEMS.values()))
    edge.write_edge_items(bundle, embeddings, list(ITEMS))
    return bundle, fp32, embeddings, manifest


def test_bundle_files_and_metadata(bundle):
    path, _, _, manifest = bundle
    meta = json.loads((path / edge.BUNDLE_FILE).read_text())
    assert meta["items"] == len(ITEMS) and meta["dim"] == 384 and meta["max_length"] == MAX_LENGTH
    assert meta["fingerprint"] == manifest["embedding"]["fingerprint"]
    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != edge.BUNDLE_FILE}
    assert meta["files"] == on_disk and meta["bytes"] == sum(on_disk.values())
    assert np.load(path / edge.ITEM_CODES).dtype == np.int8
    assert meta["files"]["model.onnx"] == manifest["onnx"]["files"]["onnx/model.int8.onnx"]


def test_quantized_item_embeddings_roundtrip():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(50, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[3] = 0.0  # an all-zero row must not divide by zero
    codes, scale = edge.quantize_embeddings(emb)
    assert codes.dtype == np.int8 and scale.shape == (50,)
    restored = codes * scale[:, None]
    assert np.abs(restored - emb).max() <= scale.max() / 2 + 1e-7
    assert np.all(restored[3] == 0.0)


def test_edge_query_ranks_items_like_the_fp32_encoder(bundle):
    path, fp32, embeddings, _ = bundle
    for item_id, text in [("m1", ITEMS["m1"]), ("m6", ITEMS["m6"])]:
        results = edge.edge_query(path, text, k=3)
        assert len(results) == 3 and results[0][0] == item_id  # its own text ranks the item first
        scores = [s for _, s in results]
        assert scores == sorted(scores, reverse=True)
    query = "animated films for children"
    exact = embeddings @ fp32.encode([query])[0]
    got = dict(edge.edge_query(path, query, k=len(ITEMS)))
    assert set(got) == set(ITEMS)
    approx = np.array([got[i] for i in ITEMS])
    assert np.abs(approx - exact).max() < 0.05  # int8 encoder and int8 items vs fp32
    assert np.corrcoef(approx, exact)[0, 1] > 0.95
    assert len(edge.edge_query(path, query, k=100)) == len(ITEMS)


def test_edge_stats_size_and_single_thread_latency(bundle):
    path, _, _, _ = bundle
    stats = edge.edge_stats(path, repeats=5)
    meta = json.loads((path / edge.BUNDLE_FILE).read_text())
    assert stats["bundle_bytes"] == meta["bytes"] and stats["threads"] == 1
    assert stats["model_bytes"] < 40_000_000  # int8 MiniLM (~31 MB; fp32 is ~90 MB)
    assert 0 < stats["latency_ms_p50"] <= stats["latency_ms_p95"] < 2000
    assert stats["items"] == len(ITEMS) and stats["queries"] == 5


def test_ort_format_bundle(bundle, tmp_path):
    path, _, _, _ = bundle
    meta = edge.write_edge_bundle(
        tmp_path / "ort",
        path / "model.onnx",
        path / "tokenizer.json",
        max_length=MAX_LENGTH,
        ort_format=True,
    )
    assert meta["model"] == edge.ORT_FILE and (tmp_path / "ort" / edge.ORT_FILE).is_file()
    codes = np.load(path / edge.ITEM_CODES) * np.load(path / edge.ITEM_SCALES)[:, None]
    edge.write_edge_items(tmp_path / "ort", codes, list(ITEMS))
    assert edge.edge_query(tmp_path / "ort", ITEMS["m3"], k=1)[0][0] == "m3"


def test_bad_bundles_and_items_are_clear_errors(bundle, tmp_path):
    path, _, embeddings, _ = bundle
    with pytest.raises(KuberankError, match="not an edge bundle"):
        edge.edge_query(tmp_path, "x")
    empty = tmp_path / "empty"
    shutil.copytree(path, empty, ignore=shutil.ignore_patterns("items.*"))
    with pytest.raises(KuberankError, match="has no items yet"):
        edge.edge_query(empty, "x")
    with pytest.raises(KuberankError, match=r"item embeddings must be \(n, 384\)"):
        edge.write_edge_items(empty, embeddings[:, :10], list(ITEMS))
    with pytest.raises(KuberankError, match="3 ids for 10 embeddings"):
        edge.write_edge_items(empty, embeddings, ["a", "b", "c"])
    with pytest.raises(KuberankError, match="k must be positive"):
        edge.EdgeRanker(path).query("x", k=0)
