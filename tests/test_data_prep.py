"""The data_prep step: core, Ray Data form, kfp component (local runner) and CLI."""

import json

import pandas as pd
import pytest

from kuberank import datasets
from kuberank.cli import main
from kuberank.components.data_prep import prepare
from tests.fixtures import interaction_rows, write_beir, write_jsonl


def test_prepare_writes_parquet_and_manifest_that_load_back(tmp_path):
    manifest = prepare("movielens-100k", str(tmp_path / "ml"))
    assert manifest["rows"] == {"items": 1682, "interactions": 100000}
    assert manifest["splits"] == {"train": 98114, "validation": 943, "test": 943}
    assert sorted(p.name for p in (tmp_path / "ml").iterdir()) == [
        "interactions.parquet",
        "items.parquet",
        "manifest.json",
    ]
    again = prepare("movielens-100k", str(tmp_path / "ml2"))
    assert again["content_hash"] == manifest["content_hash"]  # deterministic
    back = datasets.load(str(tmp_path / "ml"))
    pd.testing.assert_frame_equal(back.interactions, datasets.load("movielens-100k").interactions)


def test_failed_prepare_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    prepare(f"beir:{write_beir(tmp_path / 'c')}", str(out))
    before = (out / "manifest.json").read_text()
    (tmp_path / "c" / "corpus.jsonl").write_text('{"_id": "d1"\n')
    with pytest.raises(Exception, match="malformed JSON"):
        prepare(f"beir:{tmp_path / 'c'}", str(out))
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]


@pytest.mark.slow
def test_ray_data_split_matches_in_process(tmp_path):
    import ray

    log = write_jsonl(tmp_path / "log.jsonl", interaction_rows(users=30, per_user=7))
    try:
        on_ray = prepare(f"interactions:{log}", str(tmp_path / "ray"), engine="ray")
    finally:
        ray.shutdown()
    local = prepare(f"interactions:{log}", str(tmp_path / "local"), engine="local")
    assert on_ray["engine"] == "ray" and local["engine"] == "local"
    assert on_ray["content_hash"] == local["content_hash"]


def test_kfp_component_runs_on_the_local_runner(tmp_path):
    from kuberank.components.data_prep import data_prep_op
    from kuberank.pipelines.local import init_local_runner

    init_local_runner(tmp_path / "root")
    task = data_prep_op(dataset_spec=f"beir:{write_beir(tmp_path / 'c')}")
    artifact = task.outputs["prepared"]
    assert artifact.metadata["rows"] == {"items": 6, "queries": 6, "qrels": 6}
    assert datasets.read_manifest(artifact.path)["kind"] == "search"


def test_cli_prep_and_errors(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "prep",
                "--dataset",
                f"beir:{write_beir(tmp_path / 'c')}",
                "--out",
                str(tmp_path / "o"),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["kind"] == "search"
    assert (
        main(
            [
                "data",
                "prep",
                "--dataset",
                f"beir:{tmp_path / 'missing'}",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "missing: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
