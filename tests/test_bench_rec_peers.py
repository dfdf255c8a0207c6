"""The rec-peers benchmark section keeps each RecBole run and reuses it only under the same key
(real RecBole BPR, one epoch, on a small log; no F: its training is the quality section's)."""

import json

import pytest

from benchmarks import rec_peers
from kuberank import datasets
from kuberank.components.data_prep import prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rows = ["user_id,item_id,timestamp"]
    rows += [f"u{u},{(u * 7 + t) % 30},{1000 + t}" for u in range(40) for t in range(8)]
    log = tmp_path_factory.mktemp("log") / "log.csv"
    log.write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare(f"interactions:{log}", str(out))
    return datasets.load(f"prepared:{out}"), manifest


def _cfg(**kw):
    return {"seeds": 1, "max_epochs": 1, "models": ["bpr", "ease"], **kw}


def test_a_kept_run_is_reused_under_the_same_key_only(prepared, tmp_path, capsys):
    data, manifest = prepared
    first = rec_peers.peer_runs(data, manifest, _cfg(), tmp_path)
    assert [r["reused"] for r in first["bpr"]] == [False]
    assert [r["reused"] for r in first["ease"]] == [False]
    kept = json.loads((tmp_path / "bpr-seed0.json").read_text())
    assert kept["key"] == rec_peers.run_key("bpr", 0, _cfg(), manifest)
    assert kept["run"]["per_user"] == first["bpr"][0]["per_user"]
    assert not (tmp_path / "ease-seed0.json").exists()  # kuberank's own: measured afresh

    again = rec_peers.peer_runs(data, manifest, _cfg(), tmp_path)
    assert again["bpr"][0]["reused"] is True
    assert again["bpr"][0]["metrics"] == first["bpr"][0]["metrics"]
    assert again["bpr"][0]["per_user"] == first["bpr"][0]["per_user"]
    assert again["ease"][0]["reused"] is False
    assert "bpr seed 0: kept run of" in capsys.readouterr().out

    other = rec_peers.peer_runs(data, manifest, _cfg(max_epochs=2), tmp_path)
    assert other["bpr"][0]["reused"] is False  # another epoch cap: trained again, and kept
    assert json.loads((tmp_path / "bpr-seed0.json").read_text())["key"]["max_epochs"] == 2


def test_another_split_or_a_damaged_file_is_not_reused(prepared, tmp_path):
    data, manifest = prepared
    key = rec_peers.run_key("bpr", 0, _cfg(), manifest)
    rec_peers.keep_run(tmp_path, key, {"seed": 0})
    assert rec_peers.kept_run(tmp_path, key) == {"seed": 0}
    moved = {**manifest, "split": {**manifest["split"], "tie_break": "random"}}
    assert rec_peers.kept_run(tmp_path, rec_peers.run_key("bpr", 0, _cfg(), moved)) is None
    assert rec_peers.kept_run(tmp_path, rec_peers.run_key("bpr", 1, _cfg(), manifest)) is None
    (tmp_path / "bpr-seed0.json").write_text('{"key": ')
    assert rec_peers.kept_run(tmp_path, key) is None
    assert not list(tmp_path.glob("*.partial"))


def test_a_stopped_run_resumes_from_its_partial_state(prepared, tmp_path, monkeypatch):
    from kuberank.components import peers

    data, manifest = prepared
    cfg = _cfg(max_epochs=3, models=["bpr"])
    save = peers._Progress.save

    def stopped_after_epoch_one(progress):
        save(progress)
        if not progress.done and progress.epochs[-1][0] == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(peers._Progress, "save", stopped_after_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        rec_peers.peer_runs(data, manifest, cfg, tmp_path)
    partial = tmp_path / "partial" / "bpr-seed0"
    assert (partial / "resume.pt").exists() and not (tmp_path / "bpr-seed0.json").exists()
    monkeypatch.setattr(peers._Progress, "save", save)

    run = rec_peers.peer_runs(data, manifest, cfg, tmp_path)["bpr"][0]
    assert run["training"]["resumed_after_epochs"] == [1] and run["epochs"] == 3
    assert (tmp_path / "bpr-seed0.json").exists() and not partial.exists()
