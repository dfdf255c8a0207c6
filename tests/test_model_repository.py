"""The Triton model repository writer: configs parse with Triton's own ModelConfig protobuf,
local and production differ only in the encoder backend, bad inputs are clear errors.
(tests/test_triton.py serves a generated repository with the real tritonserver.)"""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from kuberank.components import model_repository as mr
from kuberank.errors import KuberankError


@pytest.fixture()
def files(tmp_path) -> tuple[Path, Path, Path]:
    """Stand-in encoder files: the writer copies them without loading them."""
    onnx, plan, tok = tmp_path / "enc.onnx", tmp_path / "enc.plan", tmp_path / "tokenizer.json"
    onnx.write_bytes(b"onnx bytes")
    plan.write_bytes(b"plan bytes")
    tok.write_text("{}")
    return onnx, plan, tok


SPEC = mr.RepositorySpec(dim=384, max_length=128, version=3)


def _encoder_without_backend(cfg):
    cfg = type(cfg).FromString(cfg.SerializeToString())
    cfg.ClearField("backend")
    cfg.ClearField("platform")
    cfg.ClearField("default_model_filename")
    for group in cfg.instance_group:
        group.ClearField("kind")
    return cfg


@pytest.mark.parametrize("production_backend", ["onnxruntime_onnx", "tensorrt_plan"])
def test_local_and_production_differ_only_in_the_encoder_backend(
    tmp_path, files, production_backend
):
    onnx, plan, tok = files
    prod_file = plan if production_backend == "tensorrt_plan" else onnx
    prod = mr.write_repository(
        mr.production_spec(SPEC, production_backend), tmp_path / "prod", prod_file, tok
    )
    local = mr.write_repository(mr.local_spec(SPEC), tmp_path / "local", onnx, tok)
    prod_cfg, local_cfg = mr.validate_repository(prod), mr.validate_repository(local)
    assert set(prod_cfg) == set(local_cfg) == {"tokenizer", "encoder", "query_encoder"}

    # tokenizer and ensemble: byte-identical directories
    for model in ("tokenizer", "query_encoder"):
        cmp = filecmp.dircmp(prod / model, local / model)
        assert not (cmp.diff_files or cmp.left_only or cmp.right_only), model
        assert filecmp.cmp(
            prod / model / "config.pbtxt", local / model / "config.pbtxt", shallow=False
        )
    assert (prod / "tokenizer" / "3" / "model.py").read_text() == mr.TOKENIZER_MODEL_PY

    # encoder: the same config once backend, platform, model file and instance kind are removed
    assert _encoder_without_backend(prod_cfg["encoder"]) == _encoder_without_backend(
        local_cfg["encoder"]
    )
    assert prod_cfg["encoder"] != local_cfg["encoder"]
    assert local_cfg["encoder"].backend == "python"
    assert (
        local_cfg["encoder"].instance_group[0].kind
        == local_cfg["encoder"].instance_group[0].KIND_CPU
    )
    assert prod_cfg["encoder"].platform == production_backend
    assert (
        prod_cfg["encoder"].instance_group[0].kind == prod_cfg["encoder"].instance_group[0].KIND_GPU
    )
    prod_files = {p.name for p in (prod / "encoder" / "3").iterdir()}
    local_files = {p.name for p in (local / "encoder" / "3").iterdir()}
    assert local_files == {"model.onnx", "model.py"}
    assert prod_files == {"model.plan" if production_backend == "tensorrt_plan" else "model.onnx"}
    assert (local / "encoder" / "3" / "model.onnx").read_bytes() == b"onnx bytes"


def test_configs_carry_batching_instances_version_policy_and_ensemble(tmp_path, files):
    onnx, _, tok = files
    spec = mr.RepositorySpec(
        dim=256,
        max_length=64,
        max_batch_size=32,
        preferred_batch_sizes=(4, 8),
        max_queue_delay_us=500,
        encoder_instances=2,
        tokenizer_instances=3,
        intra_op_threads=2,
    )
    cfgs = mr.validate_repository(mr.write_repository(spec, tmp_path / "repo", onnx, tok))
    for name in ("tokenizer", "encoder"):
        cfg = cfgs[name]
        assert cfg.max_batch_size == 32
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        assert cfg.version_policy.latest.num_versions == 1
    assert cfgs["encoder"].instance_group[0].count == 2
    assert cfgs["encoder"].parameters["intra_op_thread_count"].string_value == "2"
    assert cfgs["tokenizer"].instance_group[0].count == 3
    assert cfgs["tokenizer"].parameters["sequence_buckets"].string_value == "16,32,64"
    from tritonclient.grpc import model_config_pb2 as pb

    assert [(t.name, t.data_type) for t in cfgs["tokenizer"].input] == [("TEXT", pb.TYPE_STRING)]
    assert {t.data_type for t in cfgs["tokenizer"].output} == {pb.TYPE_INT64}
    assert [t.name for t in cfgs["encoder"].input] == ["input_ids", "attention_mask"]
    assert list(cfgs["encoder"].output[0].dims) == [256]

    ensemble = cfgs["query_encoder"]
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 32
    assert [t.name for t in ensemble.input] == ["TEXT"] and [t.name for t in ensemble.output] == [
        "EMBEDDING"
    ]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["tokenizer", "encoder"]
    assert dict(steps[0].output_map) == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
    }
    assert dict(steps[1].input_map) == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
    }
    assert dict(steps[1].output_map) == {"embedding": "EMBEDDING"}
    assert (tmp_path / "repo" / "query_encoder" / "1").is_dir()  # the ensemble's empty version


def test_sequence_buckets_end_at_max_length():
    assert mr.RepositorySpec(dim=8, max_length=100).buckets == (16, 32, 64, 100)
    assert mr.RepositorySpec(dim=8, max_length=256).buckets == (16, 32, 64, 128, 256)
    assert mr.RepositorySpec(dim=8, max_length=8).buckets == (8,)


def test_python_backend_sources_compile():
    compile(mr.TOKENIZER_MODEL_PY, "tokenizer/1/model.py", "exec")
    compile(mr.ENCODER_MODEL_PY, "encoder/1/model.py", "exec")


def test_bad_specs_and_inputs_are_clear_errors(tmp_path, files):
    onnx, plan, tok = files
    with pytest.raises(KuberankError, match="encoder_backend: 'torchscript' is not one of"):
        mr.RepositorySpec(dim=8, max_length=8, encoder_backend="torchscript")
    with pytest.raises(
        KuberankError, match=r"preferred_batch_sizes \(8, 128\) must not exceed max_batch_size 64"
    ):
        mr.RepositorySpec(dim=8, max_length=8, preferred_batch_sizes=(8, 128))
    with pytest.raises(KuberankError, match="needs a TensorRT plan, not ONNX"):
        mr.write_repository(mr.production_spec(SPEC, "tensorrt_plan"), tmp_path / "r", onnx, tok)
    with pytest.raises(KuberankError, match="needs an .onnx model"):
        mr.write_repository(SPEC, tmp_path / "r", plan, tok)
    with pytest.raises(KuberankError, match=r"missing\.json: no such file"):
        mr.write_repository(SPEC, tmp_path / "r", onnx, tmp_path / "missing.json")
    assert not (tmp_path / "r").exists()


def test_validate_repository_names_the_broken_file(tmp_path, files):
    onnx, _, tok = files
    repo = mr.write_repository(mr.local_spec(SPEC), tmp_path / "repo", onnx, tok)
    cfg = repo / "encoder" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size", "max_batch_sise"))
    with pytest.raises(
        KuberankError,
        match=r"encoder/config\.pbtxt: not a valid Triton model config: .*max_batch_sise",
    ):
        mr.validate_repository(repo)
    cfg.write_text(mr.encoder_config(mr.local_spec(SPEC)))
    (repo / "encoder" / "3" / "model.py").unlink()
    with pytest.raises(KuberankError, match=r"encoder/3/model\.py: missing model file"):
        mr.validate_repository(repo)
    with pytest.raises(KuberankError, match="no such model repository"):
        mr.validate_repository(tmp_path / "nowhere")
