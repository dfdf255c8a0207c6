"""Fine-tuning on a real local Ray cluster (127.0.0.1): DDP, checkpoints, fault tolerance,
LoRA, warm start, recommendation with the F(Q,B,I) scorer, and bad input."""

import json
import shutil
from pathlib import Path

import pytest

from kuberank.components.evaluate import evaluate
from kuberank.components.finetune import TrainConfig, checkpoint_storage, train
from kuberank.errors import KuberankError, StorageError
from kuberank.model import read_info
from tests.fixtures import interaction_rows, write_beir, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from kuberank.raycluster import ensure_ray

    ensure_ray(num_cpus=2)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir") / "toy"
    # With train.tsv present the split is explicit: train on every query, test on a few.
    qrels = {"q1": "d1", "q2": "d2", "q3": "d3", "q4": "d5", "q5": "d4", "q6": "d6"}
    return f"beir:{write_beir(root, {'train': qrels, 'test': {'q1': 'd1', 'q4': 'd5'}})}"


def small(dataset, out, **kwargs):
    defaults = dict(
        dataset=dataset,
        out=str(out),
        workers=2,
        epochs=2,
        batch_size=3,
        max_length=32,
        query_max_length=16,
    )
    return TrainConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def search_model(ray_cluster, collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "search"
    return train(small(collection, out))


def test_search_model_directory_and_manifest(search_model, collection):
    names = {p.name for p in search_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "kuberank.json"} <= names
    info = read_info(search_model)
    assert info.kind == "search" and len(info.fingerprint) == 32
    assert info.dataset["spec"] == collection and len(info.dataset["content_hash"]) == 64
    assert info.training["workers"] == 2 and info.training["epochs_run"] == 2
    assert info.training["trainable_parameters"] == info.training["total_parameters"] > 20_000_000
    events = list((search_model / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "TensorBoard event files are written"
    assert evaluate(collection, str(search_model), "test")["ndcg@10"] > 0.9


def test_search_keeps_the_best_epoch_on_validation_queries(ray_cluster, tmp_path):
    """With validation queries (here dev.tsv) every epoch is scored on them and the kept
    checkpoint is the best one; nothing is chosen on test."""
    import glob
    import os
    import tempfile

    qrels = {"q1": "d1", "q2": "d2", "q3": "d3", "q4": "d5"}
    root = write_beir(
        tmp_path / "dev", {"train": qrels, "dev": {"q5": "d4", "q6": "d6"}, "test": {"q1": "d1"}}
    )
    events = os.path.join(tempfile.gettempdir(), "kuberank-tensorboard-*")
    before = set(glob.glob(events))
    model = train(small(f"beir:{root}", tmp_path / "m", epochs=3, lr=2e-4))
    assert set(glob.glob(events)) == before  # the writer's directory went with the run
    info = read_info(model)
    scores = [row["val_ndcg@10"] for row in info.training["history"]]
    assert len(scores) == 3 and all(0.0 <= v <= 1.0 for v in scores)
    assert scores[info.training["chosen_epoch"]] == max(scores)
    assert info.metrics["val_ndcg@10"] == max(scores)


def test_corpus_pairs_are_mixed_in_and_recorded(ray_cluster, collection, tmp_path):
    """--corpus-pairs: the fixture's documents have titles, so each with a body gives a
    title -> body pair; with hard negatives each of those pairs gets one too."""
    model = train(
        small(collection, tmp_path / "m", epochs=1, corpus_pairs=1.0, hard_negatives=True)
    )
    info = read_info(model)
    from kuberank import datasets
    from kuberank.corpus_pairs import MIN_BODY_WORDS

    titles, bodies = datasets.load(collection).item_titles_and_bodies()
    usable = sum(bool(t) and len(b.split()) >= MIN_BODY_WORDS for t, b in zip(titles, bodies))
    assert usable >= 3 and info.training["corpus_pairs_used"] == {"title": usable, "crop": 0}
    assert info.training["corpus_pairs"] == 1.0
    assert evaluate(collection, str(model), "test")["ndcg@10"] > 0.9


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, collection, tmp_path):
    import glob
    import os
    import tempfile

    scratch = [
        os.path.join(tempfile.gettempdir(), f"kuberank-{kind}-*")
        for kind in ("tensorboard", "train")
    ]
    before = [set(glob.glob(pattern)) for pattern in scratch]
    marker = tmp_path / "killed"
    out = train(
        small(
            collection,
            tmp_path / "m",
            epochs=3,
            fault_injection={"kill_after_epoch": 0, "marker": str(marker)},
        )
    )
    assert marker.exists(), "a worker was killed after its first checkpoint"
    info = read_info(out)
    assert (
        info.training["resumed_from_epoch"] == 1
    )  # the new worker group started from the checkpoint
    assert [row["epoch"] for row in info.training["history"]][-1] == 2
    assert any(Path(f"{out}.checkpoints").rglob("state.pt")), "the last good checkpoint is kept"
    # the killed worker's TensorBoard directory went with the driver's scratch
    assert [set(glob.glob(pattern)) for pattern in scratch] == before


def test_lora_trains_few_parameters_and_exports_a_plain_model(ray_cluster, collection, tmp_path):
    out = train(small(collection, tmp_path / "lora", epochs=1, lora=True, workers=1))
    info = read_info(out)
    assert info.training["trainable_parameters"] < 0.1 * info.training["total_parameters"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert"  # adapters merged: a plain transformer for export
    assert not (out / "adapter_config.json").exists()


def test_warm_start_with_replay(ray_cluster, search_model, collection, tmp_path):
    out = train(
        small(
            collection,
            tmp_path / "warm",
            epochs=1,
            workers=1,
            warm_start=str(search_model),
            replay_fraction=0.5,
        )
    )
    info = read_info(out)
    assert info.base_model == str(search_model)
    assert info.training["replay_fraction"] == 0.5
    assert info.training["replayed_rows"] == 3  # half of the previous model's 6 training pairs


def test_checkpoints_to_s3(ray_cluster, s3_endpoint, collection, tmp_path):
    from kuberank import storage

    storage.s3_client().create_bucket(Bucket="kuberank-ckpt")
    train(
        small(collection, tmp_path / "s3m", epochs=1, workers=1, storage="s3://kuberank-ckpt/runs")
    )
    keys = [
        o["Key"]
        for o in storage.s3_client().list_objects_v2(Bucket="kuberank-ckpt", Prefix="runs/")[
            "Contents"
        ]
    ]
    assert any(k.endswith("state.pt") for k in keys)


def test_recommendation_with_behaviour_term(ray_cluster, tmp_path):
    log = write_jsonl(tmp_path / "log.jsonl", interaction_rows(users=12, per_user=8))
    spec = f"interactions:{log}"
    out = train(
        TrainConfig(dataset=spec, out=str(tmp_path / "rec"), workers=2, epochs=3, batch_size=16)
    )
    info = read_info(out)
    assert (
        info.kind == "recommendation"
        and info.scorer.use_behaviour
        and info.scorer.use_collaborative
    )
    assert "val_ndcg@10" in info.metrics and len(info.item_ids) == 8
    assert (out / "scorer.safetensors").is_file()
    result = evaluate(spec, str(out), "test")
    assert result["queries"] == 12
    # Continuous learning: new logs, warm start from the model, replay of its old users.
    newer = write_jsonl(tmp_path / "newer.jsonl", interaction_rows(users=6, per_user=8))
    again = train(
        TrainConfig(
            dataset=f"interactions:{newer}",
            out=str(tmp_path / "rec2"),
            workers=1,
            epochs=1,
            batch_size=16,
            warm_start=str(out),
            replay_fraction=0.5,
        )
    )
    replayed = read_info(again)
    assert (
        replayed.training["replayed_rows"] == 6 * 6
    )  # 6 of the 12 old users, 6 training items each
    assert sum(u.startswith("replay:") for u in replayed.user_ids) == 6


def test_bad_input_is_refused_before_training(ray_cluster, tmp_path, collection):
    only_test = write_beir(tmp_path / "t", {"test": {"q2": "d2"}})
    # Without train.tsv the queries of test.tsv are split by hash; q2 lands in "test", so
    # the train split is empty.
    from kuberank.datasets import hash_split

    assert hash_split("q2") == "test"
    with pytest.raises(KuberankError, match="nothing to train on"):
        train(small(f"beir:{only_test}", tmp_path / "x"))
    unjudged = write_beir(tmp_path / "u", {"train": {"q1": "d1"}})
    (tmp_path / "u" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t0\n")
    with pytest.raises(KuberankError, match="nothing to train on"):
        train(small(f"beir:{unjudged}", tmp_path / "y"))


def test_unreachable_storage_is_refused(ray_cluster, collection, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("KUBERANK_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageError, match="s3://kuberank-missing/ckpt"):
        train(small(collection, tmp_path / "z", storage="s3://kuberank-missing/ckpt"))


def test_mismatched_item_tower_tokenizer_is_refused(
    ray_cluster, search_model, collection, tmp_path
):
    broken = tmp_path / "broken"
    shutil.copytree(search_model, broken)
    shutil.copytree(
        search_model, broken / "item_tower", ignore=shutil.ignore_patterns("item_tower")
    )
    tokenizer = broken / "item_tower" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"[unused0]"', '"[unused-x]"', 1))
    with pytest.raises(KuberankError, match="item tower's tokenizer does not match"):
        train(small(collection, tmp_path / "w", towers="separate", warm_start=str(broken)))


def test_checkpoints_go_beside_the_output_on_s3_too(tmp_path, monkeypatch):
    """A run writing to S3 keeps its checkpoints on S3, where every node of a cluster reaches
    them (a RayJob's `train --out s3://...` had put them on each node's own /tmp)."""
    monkeypatch.chdir(tmp_path)
    assert checkpoint_storage("s3://bucket/runs/a/") == "s3://bucket/runs/a.checkpoints"
    assert checkpoint_storage("s3://bucket/runs/a") == "s3://bucket/runs/a.checkpoints"
    assert checkpoint_storage("models/a") == f"{tmp_path / 'models' / 'a'}.checkpoints"


def test_bm25_hard_negatives_score_the_pairs_queries_once_on_a_given_index(tmp_path):
    from kuberank import datasets
    from kuberank.components.finetune_search import bm25_hard_negatives, search_examples
    from kuberank.lexical import LexicalIndex

    data = datasets.load(f"beir:{write_beir(tmp_path / 'beir')}")
    examples = search_examples(data)
    built = bm25_hard_negatives(data, examples)
    index = LexicalIndex.build(data.item_ids, data.item_texts)
    scored, score = [], index.scores
    index.scores = lambda queries: scored.append(list(queries)) or score(queries)
    assert bm25_hard_negatives(data, examples, index=index) == built
    firsts = list(dict.fromkeys(q for q, _ in examples["pairs"]))
    assert scored == [[examples["queries"][q] for q in firsts]]  # one call, the pairs' queries
    assert all(neg != doc for neg, (_, doc) in zip(built, examples["pairs"], strict=True))


def test_one_training_task_per_dataset_kind():
    from kuberank import datasets
    from kuberank.components.finetune import TASKS, task_for

    assert set(TASKS) == {datasets.SEARCH, datasets.RECOMMENDATION}
    assert all(task.kind == kind for kind, task in TASKS.items())
    assert (
        TrainConfig("d", "o").resolved(datasets.SEARCH).lr == TASKS[datasets.SEARCH].defaults["lr"]
    )
    with pytest.raises(KuberankError, match="no training task for 'graph' data"):
        task_for("graph")
