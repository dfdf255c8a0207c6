"""Compression: distillation into fewer layers, structured pruning, int8, the quality gate."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kuberank.components.compress import (
    DEFAULT_LADDER,
    CompressConfig,
    QualityGateError,
    choose_layers,
    compress,
    drop_interval,
    fit_default_ladder,
    make_student,
    one_level,
    parse_ladder,
    prune_feed_forward,
    resolution_note,
    teacher_embeddings,
)
from kuberank.components.evaluate import evaluate
from kuberank.config import base_model_path
from kuberank.errors import KuberankError
from tests.fixtures import write_beir, write_jsonl


def test_chosen_layers_are_a_backward_elimination_by_closeness_to_the_teacher():
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(base_model_path(), add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    texts = [f"a short text about topic number {i} and its details" for i in range(12)]
    config = CompressConfig(model="m", dataset="d", out="o", batch_size=4)
    chosen = choose_layers(teacher, tokenizer, texts, [3, 6, 4], config)
    assert chosen[6] == ([0, 1, 2, 3, 4, 5], None)
    assert len(teacher.encoder.layer) == teacher.config.num_hidden_layers == 6  # restored
    (four, f4), (three, f3) = chosen[4], chosen[3]
    assert len(four) == 4 and len(three) == 3 and set(three) < set(four)  # nested: one path
    assert 0 < f3 <= f4 < 1
    # the score is the mean cosine of the untrained student's embeddings to the teacher's, and
    # no other layer dropped from the 4 chosen keeps the student closer
    batch = tokenizer(texts, padding=True, return_tensors="pt")

    def cosine(layers):
        with torch.no_grad():
            a = _pooled(make_student(teacher, layers), batch)
            return float((a * _pooled(teacher, batch)).sum(-1).mean())

    scores = {
        tuple(x for x in four if x != drop): cosine([x for x in four if x != drop]) for drop in four
    }
    assert f3 == pytest.approx(scores[tuple(three)], abs=1e-4)
    assert scores[tuple(three)] == max(scores.values())
    with pytest.raises(KuberankError, match="--layers: 7 layers"):
        choose_layers(teacher, tokenizer, texts, [7], config)


def test_teacher_embeddings_do_not_depend_on_the_batch_they_were_padded_in():
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(base_model_path(), add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    texts = ["short", "a much longer text that needs padding in a batch of three", "middle one"]
    config = CompressConfig(model="m", dataset="d", out="o", batch_size=3)
    together = teacher_embeddings(teacher, tokenizer, texts, config)
    alone = teacher_embeddings(teacher, tokenizer, texts, dataclasses.replace(config, batch_size=1))
    assert together.shape == (3, 384)
    assert torch.allclose(together, alone, atol=1e-5)


def _pooled(model, batch):
    from kuberank.encoder import mean_pool

    hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def test_ladder_parsing_and_levels():
    assert parse_ladder("2x0.5, 3X0.25") == ((2, 0.5), (3, 0.25))
    assert parse_ladder("") is None and parse_ladder(None) is None  # the default ladder
    with pytest.raises(KuberankError, match="--ladder: '3-0.5'"):
        parse_ladder("2x0.5,3-0.5")
    base = {"model": "m", "dataset": "d", "out": "o"}
    assert CompressConfig(**base).rungs(6) == list(DEFAULT_LADDER)
    assert CompressConfig(**base).rungs(4) == list(fit_default_ladder(4))
    spelled_out = CompressConfig(**base, ladder=parse_ladder("2x0.5,3x0.5,3x0.25,4x0.25,6x0"))
    assert spelled_out.rungs(4) == list(fit_default_ladder(4))  # the default, as --help prints
    assert one_level(4, None) == ((4, 0.25),) and one_level(None, 0.0) == ((3, 0.0),)
    assert one_level(None, None) is None
    assert CompressConfig(**base, ladder=one_level(4, None)).rungs(6) == [(4, 0.25)]
    with pytest.raises(KuberankError, match="--prune-ratio: prune ratio 1.0"):
        CompressConfig(**base, ladder=((2, 1.0),)).rungs(6)
    with pytest.raises(KuberankError, match="--layers: 0 layers"):
        CompressConfig(**base, ladder=one_level(0, None)).rungs(6)
    with pytest.raises(KuberankError, match="--layers: 7 layers; must be between 1 and the"):
        CompressConfig(**base, ladder=((2, 0.5), (7, 0.0))).rungs(6)
    with pytest.raises(KuberankError, match="no compression level"):
        CompressConfig(**base, ladder=()).rungs(6)


def test_cli_takes_a_ladder_or_one_level_not_both(capsys):
    from kuberank.cli import main

    argv = ["compress", "--model", "m", "--dataset", "d", "--out", "o", "--ladder", "2x0.5"]
    assert main([*argv, "--layers", "3"]) == 2  # refused before anything is loaded
    assert "--ladder and --layers/--prune-ratio both given" in capsys.readouterr().err
    assert main([*argv, "--epochs", "0"]) == 2
    assert "--epochs: 0 (need at least 1 distillation epoch)" in capsys.readouterr().err


def test_default_ladder_fits_the_teacher_depth():
    assert fit_default_ladder(6) == DEFAULT_LADDER  # MiniLM-L6, the ladder as measured
    assert fit_default_ladder(12)[-1] == (12, 0.0)  # int8 only keeps the teacher's depth
    # no level deeper than the teacher
    assert fit_default_ladder(3) == ((2, 0.5), (3, 0.5), (3, 0.25), (3, 0.0))
    for depth in (1, 2, 4, 12):
        assert all(layers <= depth for layers, _ in fit_default_ladder(depth))


def test_student_copies_teacher_layers_and_pruning_shrinks_ffn():
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(base_model_path(), add_pooling_layer=False)
    student = make_student(teacher, [1, 3, 5])
    assert student.config.num_hidden_layers == 3
    assert torch.equal(
        student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight
    )
    ids = torch.tensor([[101, 2023, 2003, 102]])
    before = student(input_ids=ids).last_hidden_state
    assert prune_feed_forward(student, 0.25) == 1152
    assert student.encoder.layer[0].intermediate.dense.weight.shape == (1152, 384)
    after = student(input_ids=ids).last_hidden_state
    assert after.shape == before.shape  # still a working model


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return f"beir:{write_beir(tmp_path_factory.mktemp('c') / 'toy')}"


def test_compress_passes_the_gate_and_writes_an_int8_model(collection, tmp_path):
    out = tmp_path / "small"
    report = compress(
        CompressConfig(
            model=base_model_path(),
            dataset=collection,
            out=str(out),
            epochs=1,
            ladder=one_level(None, 0.25),
            recovery_epochs=1,
            max_ndcg_drop=0.5,
            split="all",
        )
    )
    assert len(report["layers"]) == 3 and report["intermediate_size"] == 1152
    assert 0 < report["initial_fidelity"] < 1
    assert (out / "onnx" / "model.int8.onnx").is_file()
    assert report["int8_bytes"] < report["teacher_bytes"] / 3
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    # evaluated through ONNX Runtime int8
    scored = evaluate(collection, str(out), "all", per_query=True)
    assert scored["ndcg@10"] == pytest.approx(report["compressed_ndcg10"])
    (level,) = report["ladder"]
    assert level["queries"] == len(scored["per_query_ndcg@10"]) > 1
    low, high = level["drop_ci95"]
    assert low <= report["teacher_ndcg10"] - report["compressed_ndcg10"] <= high


def test_drop_interval_and_when_the_split_cannot_resolve_the_gate():
    teacher = {"per_query_ndcg@10": {"a": 1.0, "b": 0.5, "c": 0.0, "d": 1.0}}
    same = drop_interval(teacher, teacher)
    assert same == {"queries": 4, "drop_ci95": [0.0, 0.0]}
    assert resolution_note(same, 0.01, "validation") == ""
    worse = {"per_query_ndcg@10": {"a": 0.0, "b": 0.5, "c": 0.0, "d": 1.0, "e": 1.0}}
    interval = drop_interval(teacher, worse)  # only the 4 common queries; the drop is 0.25
    low, high = interval["drop_ci95"]
    assert interval["queries"] == 4 and low <= 0.25 <= high and high - low > 0.02
    message = resolution_note(interval, 0.01, "validation")
    assert f"[{low:+.4f}, {high:+.4f}] over 4 validation queries: too few to resolve" in message
    assert resolution_note(interval, (high - low) / 2, "validation") == ""
    assert drop_interval({"per_query_ndcg@10": {"a": 1.0}}, worse)["drop_ci95"] is None


def test_cli_epochs_are_the_distillation_epochs(collection, tmp_path, capsys):
    from kuberank.cli import main

    out = tmp_path / "two-epochs"
    argv = ["compress", "--model", base_model_path(), "--dataset", collection, "--out", str(out)]
    level = ["--layers", "2", "--prune-ratio", "0", "--no-int8", "--max-ndcg-drop", "1"]
    assert main([*argv, *level, "--split", "all", "--epochs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["distil_losses"]) == 2 and len(report["layers"]) == 2, report


def test_gate_failure_reports_both_numbers_and_writes_nothing(collection, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(QualityGateError) as err:
        compress(
            CompressConfig(
                model=base_model_path(),
                dataset=collection,
                out=str(out),
                ladder=((1, 0.9),),
                epochs=0,
                recovery_epochs=0,
                int8=False,
                max_ndcg_drop=-1.0,
                split="all",
            )
        )
    assert "compressed nDCG@10" in str(err.value) and "teacher" in str(err.value)
    assert "levels tried (layers x prune ratio, nDCG@10): 1x0.9 " in str(err.value)
    assert err.value.teacher >= 0 and err.value.student >= 0
    assert not out.exists()


def test_keep_teacher_writes_the_teacher_when_no_level_passes(collection, tmp_path, capsys):
    from kuberank.cli import main

    out = tmp_path / "kept"
    argv = ["compress", "--model", base_model_path(), "--dataset", collection, "--out", str(out)]
    refused = ["--ladder", "1x0.9", "--no-int8", "--max-ndcg-drop", "-1", "--split", "all"]
    assert main([*argv, *refused, "--keep-teacher", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compressed"] is False and report["layers"] == list(range(6))
    assert report["compressed_ndcg10"] == report["teacher_ndcg10"]
    assert [t["layers"] for t in report["ladder"]] == [1]
    assert report["refused"].endswith("; the teacher is written unchanged (fp32, 6 layers)")
    teacher = Path(base_model_path())
    assert (out / "model.safetensors").read_bytes() == (teacher / "model.safetensors").read_bytes()
    assert json.loads((out / "compression.json").read_text())["compressed"] is False
    assert not (out / "onnx" / "model.int8.onnx").exists()
    # without --keep-teacher the same refusal fails the command and writes nothing
    assert main([*argv[:-1], str(tmp_path / "refused"), *refused]) == 2
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "; nothing written" in err
    assert not (tmp_path / "refused").exists()


def _word_overlap_collection(root):
    """40 documents of 8 words from one vocabulary, each query 3 of its document's words."""
    import random

    words = (
        "river stone garden engine violin harbor winter pepper ledger comet tunnel falcon "
        "marble cotton signal ladder orchard canyon velvet lantern piano glacier"
    ).split()
    rng = random.Random(7)
    docs = {f"d{i}": rng.sample(words, 8) for i in range(40)}
    write_jsonl(
        root / "corpus.jsonl",
        [{"_id": d, "title": "", "text": " ".join(w)} for d, w in docs.items()],
    )
    write_jsonl(
        root / "queries.jsonl",
        [{"_id": f"q{i}", "text": " ".join(rng.sample(docs[f"d{i}"], 3))} for i in range(40)],
    )
    (root / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(40)]
    (root / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return f"beir:{root}"


def test_ladder_writes_the_first_level_that_passes_the_gate(tmp_path):
    # On word-overlap queries a 1-layer student (closer to a bag of token embeddings) scores
    # above its 6-layer teacher, while the full depth without pruning or int8 is the teacher
    # itself (drop exactly 0). A gate that demands a gain of 0.05 (max drop -0.05) therefore
    # refuses the first level and accepts the second: the ladder moves on, writes the level
    # that passed and reports both.
    out = tmp_path / "laddered"
    report = compress(
        CompressConfig(
            model=base_model_path(),
            dataset=_word_overlap_collection(tmp_path),
            out=str(out),
            ladder=((6, 0.0), (1, 0.9)),
            epochs=0,
            recovery_epochs=0,
            int8=False,
            max_ndcg_drop=-0.05,
            split="all",
        )
    )
    first, second = report["ladder"]
    assert (first["layers"], first["prune_ratio"]) == (6, 0.0)
    assert first["ndcg10"] == report["teacher_ndcg10"]  # refused: no gain
    assert (second["layers"], second["prune_ratio"]) == (1, 0.9)
    assert report["compressed_ndcg10"] == second["ndcg10"] >= report["teacher_ndcg10"] + 0.05
    assert report["layers"] == [5] and report["intermediate_size"] == 154
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((out / "compression.json").read_text())["ladder"] == report["ladder"]
