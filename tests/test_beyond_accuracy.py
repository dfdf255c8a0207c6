"""Beyond-accuracy metrics on inputs small enough to compute by hand."""

import math

import numpy as np
import pytest

from kuberank import beyond_accuracy as ba
from kuberank import datasets
from tests.fixtures import interaction_rows, write_jsonl

# four items, two lists of two: item 0 shown twice, items 1 and 2 once, item 3 never
LISTS = [[0, 1], [0, 2]]
POPULARITY = np.array([3.0, 2.0, 1.0, 0.0])
USERS = 3


def test_coverage_counts_the_catalogue_share_shown_to_anyone():
    assert ba.exposure_counts(LISTS, 4, 2).tolist() == [2, 1, 1, 0]
    assert ba.coverage(LISTS, 4, 2) == 0.75
    assert ba.coverage(LISTS, 4, 1) == 0.25  # the cutoff applies: only item 0


def test_gini_of_exposure():
    # sorted counts [0, 1, 1, 2]: sum((2i - n - 1) x_i) / (n sum x) = (-1 + 1 + 6) / 16
    assert ba.gini(LISTS, 4, 2) == pytest.approx(0.375)
    assert ba.gini([[0, 1], [2, 3]], 4, 2) == 0.0  # equal exposure
    assert ba.gini([[0], [0]], 4, 1) == pytest.approx(3 / 4)  # one item takes all: (n - 1) / n
    assert ba.gini([], 4, 10) == 0.0


def test_arp_and_novelty_use_training_popularity():
    assert ba.arp(LISTS, POPULARITY, 2) == pytest.approx((2.5 + 2.0) / 2)
    # p = (pop + 1) / (users + 1) = [1, 3/4, 1/2, 1/4]; -log2 p = [0, 0.415, 1, 2]
    expected = ((0 + -math.log2(0.75)) / 2 + (0 + 1) / 2) / 2
    assert ba.novelty(LISTS, POPULARITY, USERS, 2) == pytest.approx(expected)
    assert ba.novelty([[3]], POPULARITY, USERS, 1) == pytest.approx(2.0)  # unseen: finite


def test_ild_is_the_mean_pairwise_cosine_distance():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, 0.0]])  # row 2 not normalised
    # list [0, 1]: orthogonal, distance 1; list [0, 2]: 1 - cos 45deg
    assert ba.ild(LISTS, emb, 2) == pytest.approx((1.0 + (1 - math.sqrt(0.5))) / 2)
    assert ba.ild([[0, 3]], emb, 2) == pytest.approx(0.0)  # identical items
    # three items: pairs (0,1) 1, (0,2) 0.293, (1,2) 0.293
    assert ba.ild([[0, 1, 2]], emb, 3) == pytest.approx((1 + 2 * (1 - math.sqrt(0.5))) / 3)
    assert ba.ild([[0], []], emb, 2) == 0.0  # no list with two items


def test_exposure_per_popularity_tercile():
    assert ba.tercile_exposure(LISTS, POPULARITY, 2) == {"head": 0.75, "mid": 0.25, "tail": 0.0}
    assert ba.tercile_exposure([[3]], POPULARITY, 1)["tail"] == 1.0


def test_beyond_accuracy_names_every_metric_at_k():
    emb = np.eye(4)
    out = ba.beyond_accuracy(LISTS, POPULARITY, USERS, emb, k=2)
    assert set(out) == {
        "coverage@2",
        "gini@2",
        "arp@2",
        "novelty@2",
        "ild@2",
        "exposure_head@2",
        "exposure_mid@2",
        "exposure_tail@2",
    }
    assert out["ild@2"] == 1.0 and out["coverage@2"] == 0.75
    assert sum(out[f"exposure_{t}@2"] for t in ba.TERCILES) == pytest.approx(1.0)


def test_train_popularity_counts_training_rows_only(tmp_path):
    # 4 users x 5 items: the last two of each user are validation and test
    log = write_jsonl(tmp_path / "l.jsonl", interaction_rows(users=4, per_user=5))
    data = datasets.load(f"interactions:{log}")
    counts, users = ba.train_popularity(data)
    train = data.interactions[data.interactions["split"] == "train"]
    assert users == 4 and counts.sum() == len(train) == 12
    # user u trains on items u, u+1, u+2: item 0 once (u0), item 2 three times (u0, u1, u2)
    assert counts[data.item_ids.index("0")] == 1 and counts[data.item_ids.index("2")] == 3
    assert counts[data.item_ids.index("7")] == 0  # only ever a validation/test item


def test_evaluate_run_takes_the_training_popularity_a_caller_already_counted(tmp_path):
    log = write_jsonl(tmp_path / "l.jsonl", interaction_rows(users=4, per_user=5))
    data = datasets.load(f"interactions:{log}")
    run = {"q0": ["0", "1"], "q1": ["2", "7"]}
    counted = ba.train_popularity(data)
    assert ba.evaluate_run(data, run, 2, popularity=counted) == ba.evaluate_run(data, run, 2)
    # the one given is the one used: another popularity moves the popularity metrics
    counts, users = counted
    flat = ba.evaluate_run(data, run, 2, popularity=(np.ones_like(counts), users))
    assert flat["arp@2"] != ba.evaluate_run(data, run, 2)["arp@2"]


def test_item_embeddings_are_encoded_once_per_catalogue_and_read_back(tmp_path, monkeypatch):
    """ILD's base-encoder vectors: a later process on the same catalogue reads them from the
    cache instead of encoding every item again; other texts get their own entry; a damaged
    entry is encoded again."""
    from types import SimpleNamespace

    from kuberank import encoder

    monkeypatch.setenv("KUBERANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ba, "_EMBEDDINGS", {})
    catalogue = SimpleNamespace(item_texts=["a space opera", "a cooking show", "tax law"])
    first = ba.item_embeddings(catalogue)
    (entry,) = (tmp_path / "cache" / "item-vectors").glob("*.npy")
    assert first.shape[0] == 3

    real_encode = encoder.TextEncoder.encode
    calls = []

    def counted(self, texts, *args, **kwargs):
        calls.append(len(texts))
        return real_encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(encoder.TextEncoder, "encode", counted)
    monkeypatch.setattr(ba, "_EMBEDDINGS", {})  # a new process
    np.testing.assert_array_equal(ba.item_embeddings(catalogue), first)
    assert calls == []
    other = SimpleNamespace(item_texts=["a space opera", "a cooking show", "tax law!"])
    ba.item_embeddings(other)
    assert calls == [3] and len(list(entry.parent.glob("*.npy"))) == 2
    entry.write_bytes(b"not an array")
    monkeypatch.setattr(ba, "_EMBEDDINGS", {})
    np.testing.assert_allclose(ba.item_embeddings(catalogue), first, atol=1e-6)
    assert calls == [3, 3]
