"""The data_prep step: core, Ray Data form, kfp component (local runner) and CLI."""

import json

import pandas as pd
import pytest

from kuberank import datasets
from kuberank.cli import main
from kuberank.components.data_prep import prepare
from kuberank.errors import KuberankError
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


def _tied_log(path):
    """Each user's last two rows share a timestamp; the later row has the lower item id."""
    rows = ["user_id,item_id,timestamp"]
    for u in range(5):
        rows += [f"u{u},{u + 1},100", f"u{u},{u + 30},200", f"u{u},{u + 20},300"]
        rows += [f"u{u},{u + 10},300"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_prep_puts_the_later_row_of_a_tie_in_test(tmp_path, capsys):
    log = _tied_log(tmp_path / "log.csv")
    out = tmp_path / "prepared"
    assert main(["data", "prep", "--dataset", f"interactions:{log}", "--out", str(out)]) == 0
    assert "5 of 5 users' validation and test interactions share a timestamp" in (
        capsys.readouterr().out
    )
    inter = pd.read_parquet(out / "interactions.parquet")
    for u in range(5):
        user = inter[inter["user_id"] == f"u{u}"].set_index("item_id")["split"]
        assert user[str(u + 10)] == "test" and user[str(u + 20)] == "validation"
    rule = datasets.read_manifest(out)["split"]
    assert rule["tie_break"] == "log" and rule["users_tied_last_two"] == 5
    assert rule["users_evaluated"] == 5 and not rule["all_timestamps_equal"]


def test_seeded_random_tie_break_is_deterministic_per_seed(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "user_id,item_id,timestamp\n"
        + "".join(f"u{u},{i},7\n" for u in range(20) for i in range(6))
    )
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        manifest = prepare(
            f"interactions:{log}", str(tmp_path / name), tie_break="random", seed=seed
        )
        assert manifest["split"]["tie_break"] == "random" and manifest["split"]["seed"] == seed
        runs[name] = pd.read_parquet(tmp_path / name / "interactions.parquet")
    pd.testing.assert_frame_equal(runs["a"], runs["b"])
    assert not runs["a"]["item_id"].equals(runs["c"]["item_id"])
    with pytest.raises(KuberankError, match="already prepared and keeps its split"):
        prepare(f"prepared:{tmp_path / 'a'}", str(tmp_path / "d"), tie_break="random")


def test_all_equal_timestamps_split_by_log_order_and_say_so(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u,{i},1\n" for i in (5, 3, 9, 1)))
    manifest = prepare(f"interactions:{log}", str(tmp_path / "p"))
    assert "same timestamp: the split follows the log order" in capsys.readouterr().err
    assert manifest["split"]["all_timestamps_equal"] is True
    assert "log order" in manifest["split"]["note"]
    inter = pd.read_parquet(tmp_path / "p" / "interactions.parquet")
    assert inter["item_id"].tolist() == ["5", "3", "9", "1"]
    assert inter["split"].tolist() == ["train", "train", "validation", "test"]


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

    rows = interaction_rows(users=30, per_user=7)
    for row in rows[3::7]:  # ties inside every user's log: the log's order must survive Ray
        row["timestamp"] = 1002
    log = write_jsonl(tmp_path / "log.jsonl", rows)
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
