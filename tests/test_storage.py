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


def test_s3_round_trip_prepare_from_and_to_s3(s3_endpoint, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
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
    assert [p.name for p in scratch.iterdir()] == []  # the local copy is gone once uploaded
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


def test_cache_dir_honours_the_environment_and_falls_back_to_tmp(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("KUBERANK_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert storage.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("KUBERANK_CACHE")
    assert storage.cache_dir() == tmp_path / "xdg" / "kuberank"
    # a read-only root filesystem: the cache home cannot be made (a file is in the way, which
    # stops root too), so downloads go to the temporary directory ($TMPDIR)
    (tmp_path / "ro").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert storage.cache_dir().parent == tmp_path / "tmp"


def test_materialize_downloads_into_the_given_cache(s3_endpoint, tmp_path):
    storage.s3_client().create_bucket(Bucket="cached")
    storage.publish(write_beir(tmp_path / "collection"), "s3://cached/c")
    local = storage.materialize("s3://cached/c", cache=tmp_path / "run")
    assert local.is_relative_to(tmp_path / "run") and (local / "corpus.jsonl").is_file()


def test_materialize_if_present_answers_none_only_when_absent(s3_endpoint, tmp_path, monkeypatch):
    (tmp_path / "here.json").write_text("{}")
    assert storage.materialize_if_present(tmp_path / "here.json") == tmp_path / "here.json"
    assert storage.materialize_if_present(tmp_path / "gone.json") is None

    storage.s3_client().create_bucket(Bucket="optional")
    storage.publish(tmp_path / "here.json", "s3://optional/store/here.json")
    local = storage.materialize_if_present("s3://optional/store/here.json")
    assert local is not None and local.read_text() == "{}"
    assert storage.materialize_if_present("s3://optional/store/gone.json") is None
    # only "not found" means absent: an unreachable store is an error, never "no such part"
    monkeypatch.setenv("KUBERANK_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="s3://optional/store/gone.json"):
        storage.materialize_if_present("s3://optional/store/gone.json")
