"""The item index: written next to the export of the same model, exact search equals brute force,
the faiss HNSW path beyond the threshold, and a clear refusal of an index made by another model.

``serving_store`` (a copy of the session's exported base MiniLM store, indexed over the small
BEIR fixture) is shared with tests/test_app.py, test_reliability.py and test_bench*.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures import DOCS, ITEMS, write_beir
from test_export import exported_store

from kuberank import item_index as ix
from kuberank.components import index as step
from kuberank.errors import KuberankError

_SHARED: dict = {}


def serving_store(tmp_path_factory) -> tuple[Path, Path, str]:
    """(store, model_dir, dataset spec): the exported base model with an index of the BEIR
    fixture, built once per session in a copy of the export (the export's own store stays
    as tests/test_export.py expects it)."""
    if "store" not in _SHARED:
        exported, _, model_dir = exported_store(tmp_path_factory)
        root = tmp_path_factory.mktemp("serving")
        store = root / "store"
        shutil.copytree(exported, store, symlinks=True)
        shutil.rmtree(store / "index")
        dataset = f"beir:{write_beir(root / 'beir')}"
        step.build_index(model_dir, dataset, store)
        _SHARED.update(store=store, model_dir=model_dir, dataset=dataset)
    return _SHARED["store"], _SHARED["model_dir"], _SHARED["dataset"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return serving_store(tmp_path_factory)


def test_index_layout_and_fingerprints(indexed):
    from kuberank.encoder import model_fingerprint
    from kuberank.store import read_manifest

    store, model_dir, _ = indexed
    meta = json.loads((store / "index" / ix.META_FILE).read_text())
    manifest = read_manifest(store)
    assert meta["format"] == ix.INDEX_FORMAT
    assert meta["count"] == len(DOCS) and meta["dim"] == 384 and meta["kind"] == "search"
    assert (
        meta["model_fingerprint"]
        == model_fingerprint(model_dir)
        == manifest["model"]["fingerprint"]
    )
    assert meta["embedding_fingerprint"] == manifest["embedding"]["fingerprint"]
    assert meta["ann"] is None and not (store / "index" / ix.ANN_FILE).exists()
    loaded = ix.load_index(store)
    assert loaded.ids == list(DOCS)
    assert np.allclose(np.linalg.norm(loaded.embeddings, axis=1), 1.0, atol=1e-4)
    ix.check_index(loaded.meta, manifest)  # no error


def test_ann_index_beyond_the_threshold(indexed, tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is the ANN library (pin faiss-cpu==1.15.1)")
    store, model_dir, dataset = indexed
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    meta = step.build_index(model_dir, dataset, copy, ann_threshold=2)
    assert meta["ann"]["type"] == "faiss-hnsw-ip" and (copy / "index" / ix.ANN_FILE).is_file()
    ann, exact = ix.load_index(copy), ix.load_index(store)
    assert ann.ann is not None and exact.ann is None
    queries = exact.embeddings[[0, 3, 5]]  # each item's own vector finds itself first
    ann_rows, _ = ann.search(queries, 3)
    exact_rows, _ = exact.search(queries, 3)
    assert [r[0] for r in ann_rows] == [0, 3, 5]
    # six items, ef_search 128: the graph search is exhaustive, so it equals exact search
    assert [list(r) for r in ann_rows] == [list(r) for r in exact_rows]


def test_index_of_another_model_is_refused(indexed, tmp_path):
    from kuberank.store import read_manifest

    store, model_dir, dataset = indexed
    other = tmp_path / "other-model"
    other.mkdir()
    for item in Path(model_dir).iterdir():
        if item.name != "config.json":
            (other / item.name).symlink_to(item.resolve())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "kuberank_variant": 2}))
    with pytest.raises(ix.IndexMismatchError, match="holds an export of another model"):
        step.build_index(other, dataset, store)
    meta = ix.load_index(store).meta
    manifest = read_manifest(store)
    bad = {**meta, "embedding_fingerprint": "sha256:someone-else"}
    with pytest.raises(ix.IndexMismatchError, match="embedding_fingerprint"):
        ix.check_index(bad, manifest)


def test_index_cli(indexed, tmp_path, capsys):
    from kuberank.cli import main

    store, model_dir, dataset = indexed
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    assert (
        main(
            ["index", "--model", str(model_dir), "--dataset", dataset, "--out", str(copy), "--json"]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["count"] == len(DOCS)
    with pytest.raises(KuberankError, match="no such file|manifest"):
        step.build_index(model_dir, dataset, tmp_path / "empty-store")


def test_index_gives_the_edge_bundle_its_items(indexed):
    """A store is complete after export + index: the edge bundle ranks the indexed items, with
    the ids and order of the index, and ``kuberank edge query`` answers from it."""
    import subprocess
    import sys

    from kuberank.components import edge

    store, _, _ = indexed
    meta = json.loads((store / "index" / ix.META_FILE).read_text())
    bundle = json.loads((store / "edge" / edge.BUNDLE_FILE).read_text())
    assert meta["edge_items"] == bundle["items"] == len(DOCS)
    assert bundle["fingerprint"] == meta["embedding_fingerprint"]
    assert json.loads((store / "edge" / edge.ITEM_IDS).read_text()) == list(DOCS)
    assert edge.edge_query(store / "edge", "how to cook pasta", k=1)[0][0] == "d2"
    out = subprocess.run(
        [sys.executable, "-m", "kuberank.cli", "edge", "query", "--bundle", str(store / "edge")]
        + ["--text", "space opera", "--k", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["results"]) == 5


def test_edge_bundle_of_another_export_is_refused_and_a_store_without_one_is_indexed(
    indexed, tmp_path
):
    from kuberank.components import edge

    store, model_dir, dataset = indexed
    other = tmp_path / "other"
    shutil.copytree(store, other, symlinks=True)
    bundle_file = other / "edge" / edge.BUNDLE_FILE
    bundle_file.write_text(
        json.dumps({**json.loads(bundle_file.read_text()), "fingerprint": "sha256:another"})
    )
    with pytest.raises(KuberankError, match="exported with embedding sha256:another"):
        step.build_index(model_dir, dataset, other)
    shutil.rmtree(other / "edge")
    meta = step.build_index(model_dir, dataset, other)
    assert meta["edge_items"] is None and meta["count"] == len(DOCS)
    assert not (other / "edge").exists()


def test_index_writes_the_lexical_index_beside_the_dense_one(indexed):
    """STORE/lexical: BM25 over the same items in the same order; the fixture has no
    validation queries, so nothing is fitted, RRF is recorded and dense stays the default."""
    from kuberank.lexical import LexicalIndex
    from kuberank.store import LEXICAL_DIR

    store, _, _ = indexed
    lexical = LexicalIndex.load(store / LEXICAL_DIR)
    assert lexical.ids == ix.load_index(store).ids == list(DOCS)
    assert (
        lexical.meta["fusion"]["default"] == "dense" and lexical.meta["fusion"]["method"] == "rrf"
    )
    scores = lexical.scores(["neural ranking transformers", "zzz unknown"])
    assert scores[0].argmax() == lexical.ids.index("d1") and not scores[1].any()
    assert json.loads((store / "index" / ix.META_FILE).read_text())["lexical"]["items"] == 6


def test_fusion_fitted_outside_test_is_recorded_and_used_by_evaluate(indexed, tmp_path):
    from fixtures import QRELS

    from kuberank.components.evaluate import evaluate
    from kuberank.lexical import LexicalIndex
    from kuberank.store import LEXICAL_DIR

    store, model_dir, _ = indexed
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    split = {"train": ["q1", "q2"], "dev": ["q3", "q4"], "test": ["q5", "q6"]}
    files = {name: {q: QRELS[q] for q in qids} for name, qids in split.items()}
    dataset = f"beir:{write_beir(tmp_path / 'dev', files)}"
    meta = step.build_index(model_dir, dataset, copy)
    shutil.rmtree(copy / "model")  # the export fixture's F is a stand-in: evaluate the encoder
    record = LexicalIndex.load(copy / LEXICAL_DIR).meta["fusion"]
    assert record["fitted_on"] == "tuning" and record["queries"] == 4
    assert meta["lexical"]["weight"] == record["weight"]
    assert record["default"] in ("dense", "hybrid")
    result = evaluate(dataset, str(copy), "test", retrieval="hybrid")
    assert result["fusion"]["from"] == "store" and result["fusion"]["weight"] == record["weight"]
    default = evaluate(dataset, str(copy), "test")
    assert ("fusion" in default) == (record["default"] == "hybrid")


def test_hybrid_on_a_store_without_a_lexical_index_names_the_command(indexed, tmp_path):
    from kuberank.components.evaluate import evaluate

    store, _, dataset = indexed
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    shutil.rmtree(copy / "lexical")
    shutil.rmtree(copy / "model")  # the export fixture's F is a stand-in: evaluate the encoder
    with pytest.raises(KuberankError, match="kuberank index"):
        evaluate(dataset, str(copy), "all", retrieval="hybrid")
    assert "fusion" not in evaluate(dataset, str(copy), "all")  # dense, as before


def test_index_and_fusion_fit_open_the_store_encoder_once(indexed, tmp_path, monkeypatch):
    """embed_items' ONNX encoder also encodes the tuning queries the fusion is fitted on."""
    from fixtures import QRELS

    from kuberank.onnx_encoder import OnnxEncoder

    store, model_dir, _ = indexed
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    split = {"train": ["q1", "q2"], "dev": ["q3", "q4"], "test": ["q5", "q6"]}
    files = {name: {q: QRELS[q] for q in qids} for name, qids in split.items()}
    opened, init = [], OnnxEncoder.__init__

    def counted(self, *args, **kwargs):
        opened.append(args[0] if args else kwargs["path"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(OnnxEncoder, "__init__", counted)
    meta = step.build_index(model_dir, f"beir:{write_beir(tmp_path / 'dev', files)}", copy)
    assert meta["lexical"]["weight"] is not None  # the fusion was fitted (queries encoded)
    assert [Path(p).name for p in opened] == ["model.onnx"]


def test_attributes_of_a_table():
    attributes = step.attributes_of(ITEMS)
    assert attributes["fields"] == {
        "genres": "strings",
        "year": "number",
        "studio": "string",
        "kids": "boolean",
    }
    assert (
        attributes["values"]["genres"][2] == ["Action"] and attributes["values"]["year"][2] is None
    )
    json.dumps(attributes)  # what the index writes
