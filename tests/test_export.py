"""Export of the real base MiniLM: ONNX parity (fp32, int8, fp16), the store and its manifest,
clear errors for unusable inputs. The export runs once per session (``exported_store``) and is
shared with tests/test_triton.py and tests/test_edge.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kuberank.components import export
from kuberank.config import base_model_path
from kuberank.errors import KuberankError
from kuberank.onnx_encoder import (
    FINGERPRINT_TEXTS,
    OnnxEncoder,
    embedding_fingerprint,
    encoder_fingerprint,
)
from kuberank.store import read_manifest

MAX_LENGTH = 32  # short sequences keep the session's export and parity checks fast
CHECK_TEXTS = [  # not the export's parity texts: an independent check
    "films about friendship between a boy and an alien",
    "Casablanca (1942) Drama|Romance|War",
    "is coffee bad for your heart",
    "a heist that goes wrong in a small town, told out of order",
    "jazz",
]
_SHARED: dict = {}


def exported_store(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(store, manifest, model_dir): the base model with kuberank extras, exported once per
    test session into a store that already held an index and an older manifest."""
    if "store" not in _SHARED:
        root = tmp_path_factory.mktemp("export")
        model_dir = root / "model"
        model_dir.mkdir()
        base = Path(base_model_path())
        for item in base.iterdir():  # the base model, linked, plus the lead's extra files
            (model_dir / item.name).symlink_to(item)
        (model_dir / "kuberank.json").write_text(
            json.dumps({"base_model": "all-MiniLM-L6-v2", "data_sha256": "abc"})
        )
        (model_dir / "scorer.npz").write_bytes(b"scorer weights")
        store = root / "store"
        (store / "index").mkdir(parents=True)
        (store / "index" / "marker.json").write_text("{}")
        (store / "manifest.json").write_text(
            json.dumps({"version": 4, "index": {"fingerprint": "sha256:old"}})
        )
        manifest = export.export_model(model_dir, store, max_length=MAX_LENGTH)
        _SHARED.update(store=store, manifest=manifest, model_dir=model_dir)
    return _SHARED["store"], _SHARED["manifest"], _SHARED["model_dir"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_store(tmp_path_factory)


@pytest.fixture(scope="module")
def reference():
    from kuberank.encoder import TextEncoder

    return TextEncoder(base_model_path(), max_length=MAX_LENGTH)


def test_store_layout_and_manifest(exported):
    store, manifest, _ = exported
    for part in ("onnx", "triton", "triton-local", "edge", "model", "index"):
        assert (store / part).is_dir(), part
    on_disk = json.loads((store / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["format"] == export.STORE_FORMAT
    assert manifest["version"] == 5  # the previous manifest said 4
    assert manifest["index"] == {"fingerprint": "sha256:old"}  # the index step's key is kept
    assert (store / "index" / "marker.json").is_file()
    assert manifest["embedding"]["dim"] == 384 and manifest["embedding"]["max_length"] == MAX_LENGTH
    assert manifest["model"]["kuberank"]["data_sha256"] == "abc"
    assert manifest["model"]["weights_sha256"]
    assert (store / "model" / "scorer.npz").read_bytes() == b"scorer weights"
    assert not (store / "model" / "model.safetensors").exists()  # weights are not copied
    for part, size in manifest["sizes"].items():
        assert size == sum(p.stat().st_size for p in (store / part).rglob("*") if p.is_file())
    assert manifest["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    assert manifest["parity"]["int8"]["cosine_mean"] >= 0.99
    assert manifest["parity"]["fp16"]["cosine_mean"] >= 0.999
    assert manifest["onnx"]["fusions"]["Attention"] == 6  # six layers fused


def test_onnx_graph_io_opset_and_dynamic_axes(exported):
    store, _, _ = exported
    io = export.onnx_io(store / "onnx" / "model.portable.onnx")
    assert io["opset"] >= 17
    assert list(io["inputs"]) == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for d in io["inputs"]["input_ids"])  # batch and sequence symbolic
    assert io["outputs"] == {"embedding": ["batch", 384]}
    encoder = OnnxEncoder(store / "onnx", max_length=MAX_LENGTH)
    for batch, seq in ((1, 3), (5, 17)):  # shapes other than the traced sample
        ids = np.full((batch, seq), 1000, dtype=np.int64)
        out = encoder.session.run(
            ["embedding"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        )[0]
        assert out.shape == (batch, 384)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_fp32_parity_with_pytorch_on_new_texts(exported, reference):
    store, _, _ = exported
    ref = reference.encode(CHECK_TEXTS)
    for name in ("model.onnx", "model.portable.onnx"):
        got = OnnxEncoder(store / "onnx" / name, max_length=MAX_LENGTH).encode(CHECK_TEXTS)
        assert np.abs(got - ref).max() <= 1e-4, name


def test_int8_cosine_to_pytorch_on_new_texts(exported, reference):
    store, _, _ = exported
    ref = reference.encode(CHECK_TEXTS)
    got = OnnxEncoder(store / "onnx" / "model.int8.onnx", max_length=MAX_LENGTH).encode(CHECK_TEXTS)
    stats = export.compare_embeddings(ref, got)
    assert stats["cosine_mean"] >= 0.99 and stats["cosine_min"] >= 0.97, stats
    assert stats["max_abs_diff"] > 1e-4  # it really is the quantised model
    assert os.path.getsize(store / "onnx" / "model.int8.onnx") < 0.4 * os.path.getsize(
        store / "onnx" / "model.onnx"
    )


def test_check_parity_reports_measured_number_and_limit():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 8)).astype(np.float32)
    stats = export.compare_embeddings(ref, ref + 0.01)
    with pytest.raises(
        export.ParityError, match=r"max abs diff to PyTorch 0\.01 exceeds the limit 0\.0001"
    ):
        export.check_parity("fp32 ONNX", stats, max_abs_diff=1e-4)
    noisy = export.compare_embeddings(ref, ref + rng.normal(scale=0.5, size=ref.shape))
    with pytest.raises(
        export.ParityError, match=r"mean cosine to PyTorch 0\.\d+ is below the limit 0\.99"
    ):
        export.check_parity("int8 ONNX", noisy, min_cosine=0.99)
    assert export.check_parity(
        "ok", export.compare_embeddings(ref, ref), max_abs_diff=0.0, min_cosine=0.999999
    )
    with pytest.raises(export.ParityError, match="shapes differ"):
        export.compare_embeddings(ref, ref[:2])


def test_fingerprint_identifies_the_encoder(exported):
    store, manifest, _ = exported
    fp32 = OnnxEncoder(store / "onnx", max_length=MAX_LENGTH)
    fingerprint = manifest["embedding"]["fingerprint"]
    assert fingerprint.startswith("sha256:") and encoder_fingerprint(fp32) == fingerprint
    assert json.loads((store / "edge" / "bundle.json").read_text())["fingerprint"] == fingerprint
    int8 = OnnxEncoder(store / "onnx" / "model.int8.onnx", max_length=MAX_LENGTH)
    assert encoder_fingerprint(int8) != fingerprint
    with pytest.raises(KuberankError, match="probe texts"):
        embedding_fingerprint(np.zeros((3, 384)))
    probe = fp32.encode(list(FINGERPRINT_TEXTS))
    assert embedding_fingerprint(probe) == fingerprint
    assert embedding_fingerprint(probe + 1e-3) != fingerprint


def test_production_and_local_repositories_in_the_store(exported):
    from kuberank.components.model_repository import validate_repository

    store, manifest, _ = exported
    prod, local = validate_repository(store / "triton"), validate_repository(store / "triton-local")
    assert prod["encoder"].platform == "onnxruntime_onnx" and local["encoder"].backend == "python"
    for model in ("tokenizer", "query_encoder"):
        assert (store / "triton" / model / "config.pbtxt").read_bytes() == (
            store / "triton-local" / model / "config.pbtxt"
        ).read_bytes()
    version = str(manifest["version"])
    assert (store / "triton" / "encoder" / version / "model.onnx").stat().st_size < 0.6 * (
        store / "triton-local" / "encoder" / version / "model.onnx"
    ).stat().st_size  # fp16 in production, fp32 locally


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_onnx_is_a_clear_error(exported, tmp_path, damage):
    store, _, _ = exported
    bad = tmp_path / "model.onnx"
    data = (store / "onnx" / "model.int8.onnx").read_bytes()
    bad.write_bytes(
        data[: len(data) // 3] if damage == "truncated" else b"\x00not an onnx model" * 100
    )
    shutil.copy(store / "onnx" / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(KuberankError) as err:
        OnnxEncoder(tmp_path)
    message = str(err.value)
    assert str(bad) in message and "ONNX Runtime cannot load this model" in message
    assert len(message) > len(str(bad)) + 40  # ORT's own explanation follows
    with pytest.raises(KuberankError, match="no such ONNX model file"):
        OnnxEncoder(tmp_path / "missing.onnx", tokenizer=tmp_path / "tokenizer.json")


def test_model_dir_without_tokenizer_is_a_clear_error(tmp_path):
    model_dir = tmp_path / "no-tokenizer"
    model_dir.mkdir()
    shutil.copy(Path(base_model_path()) / "config.json", model_dir / "config.json")
    (model_dir / "model.safetensors").symlink_to(Path(base_model_path()) / "model.safetensors")
    with pytest.raises(
        KuberankError, match=r"no-tokenizer has no tokenizer \(expected one of tokenizer.json"
    ):
        export.export_model(model_dir, tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with pytest.raises(KuberankError, match="not a directory"):
        export.export_onnx(tmp_path / "absent", tmp_path / "x.onnx")


def test_tensorrt_without_gpu_is_a_clear_error(tmp_path):
    if export.tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are available here: a plan would really be built")
    with pytest.raises(
        KuberankError, match=r"cannot build here \(.*(GPU|tensorrt).*\); build it on a GPU node"
    ):
        export.build_tensorrt_plan(tmp_path / "model.onnx", tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists()
    with pytest.raises(KuberankError, match="run this on a GPU node"):
        export.export_tensorrt(tmp_path)


def test_export_op_compiles_to_a_kfp_component(tmp_path):
    import yaml
    from kfp import compiler

    path = tmp_path / "export_op.yaml"
    compiler.Compiler().compile(export.export_op, str(path))
    spec = yaml.safe_load(path.read_text())
    component = next(iter(spec["components"].values()))
    assert set(component["inputDefinitions"]["artifacts"]) == {"model"}
    assert set(component["inputDefinitions"]["parameters"]) == {"store"}
    assert set(component["outputDefinitions"]["artifacts"]) == {"parity"}


def test_store_on_s3_is_readable_by_serving(exported, s3_endpoint):
    """An exported store published to S3 (moto on 127.0.0.1): the manifest and the edge
    encoder are read back through the storage URI."""
    from kuberank.storage import materialize, publish, s3_client

    store, manifest, _ = exported
    s3_client().create_bucket(Bucket="models")
    uri = "s3://models/stores/v5"
    with pytest.raises(KuberankError, match="manifest.json"):
        read_manifest(uri)
    publish(store / "manifest.json", f"{uri}/manifest.json")
    publish(store / "edge", f"{uri}/edge")
    assert read_manifest(uri) == json.loads(json.dumps(manifest))
    encoder = OnnxEncoder(materialize(f"{uri}/edge"), max_length=MAX_LENGTH)
    assert encoder.encode(["toy story"]).shape == (1, 384)
