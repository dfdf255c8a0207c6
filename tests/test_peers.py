"""The peers: RecBole's models trained on kuberank's split and scored by kuberank's metrics."""

import json
import sys

import numpy as np
import pandas as pd
import pytest

from kuberank import datasets
from kuberank.cli import main
from kuberank.components import peers
from kuberank.components.evaluate import evaluate, rank
from kuberank.components.peers import RecBoleRanker, atomic_files
from kuberank.errors import KuberankError


@pytest.fixture(scope="module")
def walks(tmp_path_factory):
    """60 users walk 10 steps along a ring of 40 items from a random start: the next item is
    always the last one + 1, which a sequential model learns and popularity cannot."""
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(60):
        start = int(rng.integers(40))
        rows += [f"u{u},{(start + t) % 40},{1000 + t}" for t in range(10)]
    path = tmp_path_factory.mktemp("walks") / "walks.csv"
    path.write_text("\n".join(rows) + "\n")
    return datasets.load(f"interactions:{path}")


def _read(path):
    return pd.read_csv(path, sep="\t", dtype=str)


def test_atomic_files_hold_the_train_and_validation_rows_and_never_test(walks, tmp_path):
    inter = walks.interactions
    general = atomic_files(walks, tmp_path / "g", "d", sequential=False)
    train = _read(general / "d.train.inter")
    assert list(train.columns) == ["user_id:token", "item_id:token"]
    expected = inter[inter["split"] == "train"][["user_id", "item_id"]].to_numpy().tolist()
    assert train.to_numpy().tolist() == expected
    valid = _read(general / "d.valid.inter")
    assert len(valid) == 60
    assert _read(general / "d.test.inter").equals(valid)  # RecBole never reads a test row

    seq = atomic_files(walks, tmp_path / "s", "d", sequential=True, max_history=3)
    train = _read(seq / "d.train.inter")
    assert list(train.columns) == ["user_id:token", "item_id_list:token_seq", "item_id:token"]
    assert len(train) == 60 * 7  # 8 train items per user: 7 next-item rows
    user = inter[inter["user_id"] == "u0"]
    items = user["item_id"].tolist()
    rows = train[train["user_id:token"] == "u0"].to_numpy().tolist()
    assert rows[0] == ["u0", items[0], items[1]]
    assert rows[-1] == ["u0", " ".join(items[4:7]), items[7]]  # the last 3 train items
    valid = _read(seq / "d.valid.inter")
    assert valid[valid["user_id:token"] == "u0"].to_numpy().tolist() == [
        ["u0", " ".join(items[5:8]), items[8]]
    ]


@pytest.mark.parametrize("name", ["sasrec", "itemknn"])
def test_recbole_peer_learns_the_walk_and_is_ranked_by_kuberank(walks, name):
    peer = RecBoleRanker(name, max_epochs=40, stopping_step=40)
    result = evaluate(walks, peer, "test")
    assert result["queries"] == 60 and result["model"] == name
    popularity = evaluate(walks, "popularity", "test")
    assert result["ndcg@10"] > popularity["ndcg@10"] + 0.15
    assert 1 <= peer.training["epochs_run"] <= peer.training["max_epochs"]
    assert peer.training["best_epoch"] <= peer.training["epochs_run"]


def test_general_peer_stops_at_its_epoch_cap_and_excludes_seen_items(walks):
    peer = RecBoleRanker("bpr", max_epochs=2)
    task = datasets.eval_task(walks, "test")
    run = rank(peer, task)
    assert peer.training["epochs_run"] == 2 and not peer.training["stopped_early"]
    for qid, history in zip(task.query_ids, task.histories):
        ranked = run[qid]
        assert len(ranked) == 40 - len(set(history.tolist()))  # every unseen item, once
        assert not set(ranked) & {walks.item_ids[i] for i in history}


def test_same_seed_same_scores(walks):
    task = datasets.eval_task(walks, "test")
    runs = []
    for _ in range(2):
        peer = RecBoleRanker("gru4rec", max_epochs=2, seed=5)
        peer.prepare(task)
        runs.append(peer.scores(task, np.arange(len(task))))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


def _trained(walks, **kw):
    task = datasets.eval_task(walks, "test")
    peer = RecBoleRanker("sasrec", max_epochs=4, stopping_step=10, **kw)
    peer.prepare(task)
    return peer, peer.scores(task, np.arange(len(task)))


def test_an_interrupted_training_resumes_where_it_stopped(walks, tmp_path, monkeypatch, caplog):
    whole, expected = _trained(walks, seed=3)
    assert whole.training["resumed_after_epochs"] == []
    save = peers._Progress.save

    def killed_after_epoch_two(progress):
        save(progress)
        if progress.epochs and progress.epochs[-1][0] == 1:
            raise KeyboardInterrupt  # as if the process were stopped right after the save

    monkeypatch.setattr(peers._Progress, "save", killed_after_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _trained(walks, seed=3, checkpoint_dir=tmp_path)
    assert (tmp_path / "resume.pt").exists()
    monkeypatch.setattr(peers._Progress, "save", save)

    resumed, scores = _trained(walks, seed=3, checkpoint_dir=tmp_path)
    assert "resuming after epoch 2 of 4" in caplog.text
    assert resumed.training["resumed_after_epochs"] == [2]
    # the same batches and dropout as the uninterrupted run: the same epochs, best and scores
    for key in ("epochs_run", "best_epoch", "valid_ndcg@10", "stopped_early"):
        assert resumed.training[key] == whole.training[key], key
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

    # a finished run is not trained again: its best epoch is used as it was
    caplog.clear()
    again, scores = _trained(walks, seed=3, checkpoint_dir=tmp_path)
    assert "training finished earlier" in caplog.text
    assert again.training == resumed.training
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

    # an unreadable state (a truncated file) is not read either: trained from the start
    caplog.clear()
    (tmp_path / "resume.pt").write_bytes(b"\x80\x02truncated")
    again, scores = _trained(walks, seed=3, checkpoint_dir=tmp_path)
    assert "not a saved training state" in caplog.text
    assert again.training["resumed_after_epochs"] == [] and again.training["epochs_run"] == 4
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

    # another seed does not read this run's state: it trains from the start and replaces it
    caplog.clear()
    other, _ = _trained(walks, seed=4, checkpoint_dir=tmp_path)
    assert "holds another run's state" in caplog.text
    assert other.training["resumed_after_epochs"] == [] and other.training["epochs_run"] == 4


def test_cli_evaluates_a_peer_with_an_epoch_cap(walks, tmp_path, capsys, monkeypatch):
    from kuberank.components.data_prep import prepare

    prepared = tmp_path / "p"
    prepare(f"interactions:{walks.source}", str(prepared))
    args = ["evaluate", "--dataset", f"prepared:{prepared}", "--model", "lightgcn"]
    assert main([*args, "--split", "test", "--json", "--max-epochs", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queries"] == 60 and 0 <= out["ndcg@10"] <= 1
    assert out["training"]["epochs_run"] == 1 and out["training"]["recbole_model"] == "LightGCN"
    monkeypatch.chdir(tmp_path)  # a relative directory is the caller's, not RecBole's
    assert main([*args, "--json", "--max-epochs", "1", "--checkpoint-dir", "saved"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (tmp_path / "saved" / "resume.pt").exists()
    assert main([*args, "--json", "--max-epochs", "1", "--checkpoint-dir", "saved"]) == 0
    again = json.loads(capsys.readouterr().out)  # finished: the saved best epoch, not retrained
    assert again["training"] == first["training"] and again["ndcg@10"] == first["ndcg@10"]
    assert (
        main(
            [
                "evaluate",
                "--dataset",
                f"prepared:{prepared}",
                "--model",
                "popularity",
                "--seed",
                "1",
            ]
        )
        == 2
    )
    assert "--max-epochs/--seed/--checkpoint-dir: only for the peers" in capsys.readouterr().err


def test_a_peer_needs_one_epoch_at_least_and_validates_after_each():
    with pytest.raises(KuberankError, match="--max-epochs: need at least 1 epoch"):
        RecBoleRanker("bpr", max_epochs=0)
    with pytest.raises(KuberankError, match="eval_step: .* every epoch; got 2"):
        RecBoleRanker("bpr", eval_step=2)


def test_a_missing_recbole_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "colorlog", None)
    with pytest.raises(KuberankError, match=r"pip install 'kuberank\[peers\]'"):
        RecBoleRanker("sasrec")


@pytest.mark.slow
def test_cli_acceptance_sasrec_on_movielens(capsys):
    argv = ["evaluate", "--dataset", "movielens-100k", "--model", "sasrec", "--split", "test"]
    assert main([*argv, "--json", "--max-epochs", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queries"] == 943 and 0 < out["ndcg@10"] < 1
    assert out["training"]["epochs_run"] == 1
