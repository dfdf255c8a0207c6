"""kuberank/item_index.py: the index serving reads: exact search with exclusions over an
index built by the index step (tests/test_index.py builds it once per session), and the
checks on what the index holds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_index import serving_store

from kuberank import item_index as ix
from kuberank.errors import KuberankError


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    return serving_store(tmp_path_factory)


def test_exact_search_is_brute_force_with_exclusions(indexed):
    store, _, _ = indexed
    index = ix.load_index(store)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(3, index.dim)).astype(np.float32)
    rows, scores = index.search(
        queries, 4, exclude=[np.array([0]), np.zeros(0, np.int64), np.array([1, 2])]
    )
    for q, r, s, ex in zip(queries, rows, scores, ([0], [], [1, 2]), strict=True):
        full = index.embeddings @ q
        expected = [i for i in np.argsort(-full, kind="stable") if i not in ex][:4]
        assert list(r) == expected
        assert np.allclose(s, full[expected], atol=1e-5)
    known, unknown = index.rows_of(["d2", "zzz", "d1"])
    assert list(known) == [1, 0] and unknown == ["zzz"]


def test_read_popularity_checks_its_length(tmp_path):
    path = tmp_path / ix.POPULARITY_FILE
    assert ix.read_popularity(path, 3) is None and ix.read_popularity(None, 3) is None
    path.write_text(json.dumps({"users": 2, "counts": [1, 2]}))
    with pytest.raises(KuberankError, match="2 counts for 3 items"):
        ix.read_popularity(path, 3)


def test_the_summary_holds_what_the_index_holds_without_its_vectors(indexed, tmp_path):
    import shutil

    from kuberank.store import INDEX_DIR

    store = tmp_path / "store"
    shutil.copytree(indexed[0], store, symlinks=True)
    index, summary = ix.load_index(store), ix.read_summary(store)
    assert summary.meta == index.meta and summary.popularity == index.popularity
    assert summary.attributes["fields"] == index.attributes["fields"]
    counts = [1] * len(index)
    (store / INDEX_DIR / ix.POPULARITY_FILE).write_text(json.dumps({"users": 2, "counts": counts}))
    assert ix.read_summary(store).popularity == ix.load_index(store).popularity
    # neither the vectors nor the ids are read
    (store / INDEX_DIR / ix.EMBEDDINGS_FILE).unlink()
    (store / INDEX_DIR / ix.IDS_FILE).unlink()
    assert ix.read_summary(store).meta == index.meta
    with pytest.raises(FileNotFoundError):
        ix.load_index(store)
    (store / INDEX_DIR / ix.POPULARITY_FILE).write_text(json.dumps({"users": 2, "counts": [1]}))
    with pytest.raises(KuberankError, match=f"1 counts for {len(index)} items"):
        ix.read_summary(store)
    (store / INDEX_DIR / ix.META_FILE).unlink()
    with pytest.raises(KuberankError, match="no index.json; build it with `kuberank index`"):
        ix.read_summary(store)


def test_the_catalogue_holds_the_items_without_their_vectors(indexed, tmp_path):
    """read_catalogue answers the ids, rows, attributes and popularity of load_index without
    reading the vectors or an ANN graph; the split path's Ingress (load_pipeline without an
    encoding) serves its checks from it, the store's policy arranged on its rows."""
    import shutil

    from kuberank.serving.loading import load_checked_index
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.serving.policies import write_policy
    from kuberank.store import INDEX_DIR

    store = tmp_path / "store"
    shutil.copytree(indexed[0], store, symlinks=True)
    index = ix.load_index(store)
    (tmp_path / "policy.json").write_text(json.dumps({"blocked_items": ["d2", "d1"]}))
    write_policy(str(store), str(tmp_path / "policy.json"))
    _, loaded = load_checked_index(str(store))  # the index the Retriever and Ranker load
    for name in (ix.EMBEDDINGS_FILE, ix.ANN_FILE):  # neither is read from here on
        (store / INDEX_DIR / name).unlink(missing_ok=True)
    catalogue = ix.read_catalogue(store)
    assert not isinstance(catalogue, ix.ItemIndex) and not hasattr(catalogue, "embeddings")
    assert (catalogue.meta, catalogue.ids, catalogue.row) == (index.meta, index.ids, index.row)
    assert catalogue.attributes == index.attributes and catalogue.popularity == index.popularity
    assert catalogue.rows_of(["d2", "zzz"])[0].tolist() == index.rows_of(["d2", "zzz"])[0].tolist()
    ingress = load_pipeline(str(store), None)
    assert type(ingress.index) is ix.ItemCatalogue and ingress.items == index.row
    assert ingress.index.policy.rows.tolist() == loaded.policy.rows.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError):
        ix.load_index(store)
    ids = store / INDEX_DIR / ix.IDS_FILE
    ids.write_text(json.dumps(index.ids[:-1]))
    with pytest.raises(KuberankError, match=f"{len(index) - 1} ids, index.json says"):
        ix.read_catalogue(store)
    ids.unlink()
    with pytest.raises(KuberankError, match="no ids.json; rebuild the index with `kuberank index`"):
        ix.read_catalogue(store)
