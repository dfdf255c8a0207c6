"""Compression: distillation into fewer layers, structured pruning, int8, the quality gate."""

import json

import pytest
import torch

from kuberank.components.compress import (
    CompressConfig,
    QualityGateError,
    compress,
    make_student,
    prune_feed_forward,
    student_layers,
)
from kuberank.components.evaluate import evaluate
from kuberank.config import base_model_path
from kuberank.errors import KuberankError
from tests.fixtures import write_beir


def test_student_layers_are_uniform_and_keep_the_last():
    assert student_layers(6, 3) == [1, 3, 5]
    assert student_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    assert student_layers(6, 1) == [5]
    with pytest.raises(KuberankError, match="--layers"):
        student_layers(6, 7)


def test_student_copies_teacher_layers_and_pruning_shrinks_ffn():
    from transformers import AutoModel

    teacher = AutoModel.from_pretrained(base_model_path(), add_pooling_layer=False)
    student, chosen = make_student(teacher, 3)
    assert student.config.num_hidden_layers == 3 and chosen == [1, 3, 5]
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
            prune_ratio=0.25,
            recovery_epochs=1,
            max_ndcg_drop=0.5,
            split="all",
        )
    )
    assert report["layers"] == [1, 3, 5] and report["intermediate_size"] == 1152
    assert (out / "onnx" / "model.int8.onnx").is_file()
    assert report["int8_bytes"] < report["teacher_bytes"] / 3
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    scored = evaluate(collection, str(out), "all")  # evaluated through ONNX Runtime int8
    assert scored["ndcg@10"] == pytest.approx(report["compressed_ndcg10"])


def test_gate_failure_reports_both_numbers_and_writes_nothing(collection, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(QualityGateError) as err:
        compress(
            CompressConfig(
                model=base_model_path(),
                dataset=collection,
                out=str(out),
                layers=1,
                epochs=0,
                prune_ratio=0.9,
                recovery_epochs=0,
                int8=False,
                max_ndcg_drop=-1.0,
                split="all",
            )
        )
    assert "compressed nDCG@10" in str(err.value) and "teacher" in str(err.value)
    assert err.value.teacher >= 0 and err.value.student >= 0
    assert not out.exists()
