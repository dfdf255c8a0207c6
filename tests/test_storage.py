"""Storage URIs: local atomic writes and an S3 round trip through a loopback S3 server."""

import pytest

from kuberank import datasets, storage
from kuberank.components.data_prep import prepare
from kuberank.errors import StorageError
from tests.fixtures import write_beir


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out"
    with storage.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_s3_round_trip_prepare_from_and_to_s3(s3_endpoint, tmp_path):
    client = storage.s3_client()
    client.create_bucket(Bucket="kuberank-test")
    storage.publish(write_beir(tmp_path / "collection"), "s3://kuberank-test/raw/collection")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="kuberank-test")["Contents"])
    assert keys == [
        "raw/collection/corpus.jsonl",
        "raw/collection/qrels/test.tsv",
        "raw/collection/queries.jsonl",
    ]

    manifest = prepare("beir:s3://kuberank-test/raw/collection", "s3://kuberank-test/prepared/c1")
    assert manifest["rows"] == {"items": 6, "queries": 6, "qrels": 6}
    back = datasets.load("prepared:s3://kuberank-test/prepared/c1")
    local = datasets.load(f"beir:{tmp_path / 'collection'}")
    assert back.item_ids == local.item_ids
    assert back.qrels["split"].tolist() == local.qrels["split"].tolist()


def test_missing_s3_prefix_and_unreachable_endpoint_are_clear(s3_endpoint, monkeypatch):
    storage.s3_client().create_bucket(Bucket="empty")
    with pytest.raises(StorageError, match="s3://empty/nothing: no object or prefix"):
        storage.materialize("s3://empty/nothing")
    monkeypatch.setenv("KUBERANK_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="s3://empty/nothing"):
        storage.materialize("s3://empty/nothing")
