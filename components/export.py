"""Export step: a model directory -> the model store (ONNX, Triton repositories, edge bundle).

Pure core functions:

- :func:`export_onnx` — the transformer plus mean pooling and L2 normalisation as one ONNX
  graph (opset 17, dynamic batch and sequence axes; inputs ``input_ids``, ``attention_mask``;
  output ``embedding``).
- :func:`optimize_onnx` — ONNX Runtime transformer fusions (``model_type="bert"``).
- :func:`quantize_int8` — dynamic int8 (per-channel by default), :func:`convert_fp16`.
- :func:`compare_embeddings` / :func:`check_parity` — parity against the PyTorch model.
- :func:`build_tensorrt_plan` — a TensorRT plan with an optimisation profile (GPU nodes only).
- :func:`export_model` — the whole step, writing the store (read back with
  :func:`kuberank.store.read_manifest`).

Thin wrappers: the kfp component :func:`export_op` and ``kuberank export`` in the CLI.

The model store (a local directory or an ``s3://`` prefix; serving reads only this; its
layout names live in kuberank/store.py)::

    STORE/<manifest>         versions, embedding fingerprint, parity numbers, sizes
    STORE/onnx/              model.onnx (fp32, ORT-fused: the in-process encoder),
                             model.portable.onnx (fp32, standard ops only: input to TensorRT),
                             model.int8.onnx, tokenizer.json
    STORE/triton/            production Triton repository (onnxruntime backend, fp16, KIND_GPU)
    STORE/triton-local/      the same repository with the encoder on the python backend (CPU,
                             fp32): what the tritonserver bundled in nvidia-pytriton can serve
    STORE/edge/              edge bundle (int8 ONNX, tokenizer; items added by the index step)
    STORE/model/             the model directory's own extra files (kuberank.json, scorer
                             weights, ...), everything but the transformer weights
    STORE/index/             written later by ``kuberank index``
"""

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from kfp import dsl

from kuberank import __version__
from kuberank.components.edge import write_edge_bundle
from kuberank.components.model_repository import RepositorySpec, local_spec, write_repository
from kuberank.config import MAX_LENGTH
from kuberank.encoder import TextEncoder, check_model_dir, mean_pool, model_fingerprint
from kuberank.errors import KuberankError, StorageError
from kuberank.kfp_component import step_component
from kuberank.onnx_encoder import OnnxEncoder, encoder_fingerprint
from kuberank.progress import bar
from kuberank.storage import is_s3, materialize, publish, sha256_files, write_json
from kuberank.store import (
    EDGE_DIR,
    ENCODER,
    ENCODER_FILE,
    EXPORT_PARTS,
    INT8_FILE,
    MANIFEST,
    MODEL_DIR,
    ONNX_DIR,
    PORTABLE_FILE,
    STORE_FORMAT,
    TRITON_DIR,
    TRITON_LOCAL_DIR,
    read_manifest,
    store_path,
)

OPSET = 17
FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_COSINE = 0.99
FP16_MIN_COSINE = 0.999
# int8 quantises the fused model's MatMuls and embedding tables; the fused Attention stays fp32
# (quantising its QKV projection costs ~0.002 cosine for 8 MB). On an unfused graph the
# word-embedding table is a Gather.
INT8_OP_TYPES = ("MatMul", "EmbedLayerNormalization", "Gather")
# Files of a model directory that the ONNX export replaces; everything else is copied through.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")

PARITY_TEXTS = (
    "toy story",
    "space opera with a rebellion against an empire",
    "what causes the northern lights",
    "GoldenEye (1995) Action|Adventure|Thriller",
    "Four Weddings and a Funeral (1994) Comedy|Romance",
    "how to keep basil alive indoors",
    "a quiet drama about a family farm in the 1930s",
    "side effects of ibuprofen",
    "Pulp Fiction (1994) Crime|Drama",
    "documentaries about climate change and glaciers",
    "best running shoes for flat feet",
    "Fargo (1996) Crime|Drama|Thriller",
    "animated movie for kids about toys that come alive when nobody is watching",
    "the history of the printing press in europe",
    "horror",
    "Schindler's List (1993) Drama|War",
)


class ParityError(KuberankError):
    """An exported model's embeddings differ from the PyTorch reference beyond the limit."""


# --- ONNX -----------------------------------------------------------------------------------


def _pooled_module(model, with_token_types: bool):
    """The encoder as ``(input_ids, attention_mask) -> normalised mean-pooled embedding``."""
    import torch  # torch, transformers, onnx, onnxruntime, tensorrt: heavy; loaded when used

    class PooledEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            extra = {"token_type_ids": torch.zeros_like(input_ids)} if with_token_types else {}
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, **extra
            ).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    return PooledEncoder().eval()


def export_onnx(
    model_dir: str | os.PathLike, out_path: str | os.PathLike, opset: int = OPSET
) -> Path:
    """Export the model directory's encoder with pooling and normalisation inside the graph.

    Token type ids are not an input: single-segment text always has zeros there, which the
    graph supplies itself when the model takes them.
    """
    import onnx
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    if opset < 17:
        raise KuberankError(f"opset {opset}: the export needs opset 17 or newer")
    model_dir, out_path = check_model_dir(model_dir), Path(out_path)
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # eager attention traces to plain MatMul/Softmax, which ORT's fusions recognise
    model = AutoModel.from_pretrained(
        str(model_dir), add_pooling_layer=False, attn_implementation="eager"
    )
    module = _pooled_module(model.eval(), "token_type_ids" in tokenizer.model_input_names)
    sample = tokenizer(
        ["an example query", "a second, somewhat longer example text"],
        padding=True,
        return_tensors="pt",
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    with torch.inference_mode(), warnings.catch_warnings():
        # tracing warns about Python branches on shapes; the parity check covers them
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample["input_ids"], sample["attention_mask"]),
            str(out_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,  # the dynamo exporter needs onnxscript
        )
    graph = onnx.load(str(out_path))
    dim = graph.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = int(model.config.hidden_size)  # a static embedding width for Triton/TensorRT
    onnx.save(graph, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path


def optimize_onnx(
    src: str | os.PathLike, dst: str | os.PathLike, num_heads: int, hidden_size: int
) -> dict[str, int]:
    """ONNX Runtime transformer fusions (attention, layer norm, GELU, embeddings) for a
    BERT-style graph. Returns the counts of fused operators."""
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, use_gpu=False
    )
    optimized.save_model_to_file(str(dst))
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    per_channel: bool = True,
    op_types: tuple[str, ...] = INT8_OP_TYPES,
) -> Path:
    """Dynamic int8 quantisation of the weights (activations quantised at run time).
    Per-channel keeps the mean cosine to fp32 at ~0.994 on MiniLM; per-tensor fell to 0.91."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # quantize_dynamic warns "consider pre-processing"
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            # fused contrib ops have no inferred output types
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    return Path(dst)


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """fp16 weights and compute for GPU targets; inputs and the ``embedding`` output keep
    their types. Uses onnxruntime.transformers' converter (onnxconverter-common is not
    required)."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    return Path(dst)


def onnx_io(path: str | os.PathLike) -> dict:
    """Inputs and outputs of an ONNX graph with their (symbolic) shapes, and the opset."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "inputs": {v.name: shape(v) for v in model.graph.input},
        "outputs": {v.name: shape(v) for v in model.graph.output},
        "opset": max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
        ),
    }


# --- parity ---------------------------------------------------------------------------------


def compare_embeddings(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max absolute difference and row-wise cosine (min, mean) between two embedding sets."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != cand.shape:
        raise ParityError(f"embedding shapes differ: reference {ref.shape}, candidate {cand.shape}")
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = (ref * cand).sum(1) / np.maximum(norms, 1e-12)
    return {
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        "texts": int(ref.shape[0]),
    }


def check_parity(
    name: str,
    stats: dict[str, float],
    max_abs_diff: float | None = None,
    min_cosine: float | None = None,
) -> dict[str, float]:
    """Raise ParityError, with the measured number and the limit, when ``stats`` break a limit.
    The cosine limit applies to the mean over the parity texts (the minimum is recorded)."""
    if max_abs_diff is not None and not stats["max_abs_diff"] <= max_abs_diff:
        raise ParityError(
            f"{name}: max abs diff to PyTorch {stats['max_abs_diff']:.3g} exceeds the limit {max_abs_diff:g} "
            f"(over {stats['texts']} texts)"
        )
    if min_cosine is not None and not stats["cosine_mean"] >= min_cosine:
        raise ParityError(
            f"{name}: mean cosine to PyTorch {stats['cosine_mean']:.4f} is below the limit {min_cosine:g} "
            f"(min {stats['cosine_min']:.4f} over {stats['texts']} texts)"
        )
    return {
        **stats,
        **({"limit_max_abs_diff": max_abs_diff} if max_abs_diff is not None else {}),
        **({"limit_cosine_mean": min_cosine} if min_cosine is not None else {}),
    }


# --- TensorRT -------------------------------------------------------------------------------


def tensorrt_unavailable() -> str | None:
    """Why a TensorRT plan cannot be built here, or None when it can."""
    reasons = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        reasons.append("the tensorrt Python package is not installed")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        reasons.append("no CUDA GPU is visible")
    return "; ".join(reasons) or None


def build_tensorrt_plan(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    min_shape: tuple[int, int] = (1, 1),
    opt_shape: tuple[int, int] = (16, 64),
    max_shape: tuple[int, int] = (64, MAX_LENGTH),
    fp16: bool = True,
    int8: bool = False,
    workspace_bytes: int = 2 << 30,
) -> Path:
    """Build a TensorRT plan from a portable (standard-ops) ONNX encoder on a GPU node.

    Shapes are (batch, sequence) for every input: one optimisation profile min/opt/max. A plan
    is specific to the GPU type and TensorRT version, so build it where it will be served.
    ``int8`` needs an explicitly quantised (Q/DQ) ONNX model.
    """
    reason = tensorrt_unavailable()
    if reason:
        raise KuberankError(
            f"TensorRT plan for {onnx_path}: cannot build here ({reason}); build it on a GPU node "
            "with TensorRT installed (e.g. the kfp export step with a GPU), or serve the ONNX model "
            "with Triton's onnxruntime backend"
        )
    if not (
        min_shape[0] <= opt_shape[0] <= max_shape[0]
        and min_shape[1] <= opt_shape[1] <= max_shape[1]
    ):
        raise KuberankError(
            f"TensorRT profile: need min <= opt <= max, got {min_shape}, {opt_shape}, {max_shape}"
        )
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if int8:
        import onnx

        ops = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
        if "QuantizeLinear" not in ops:
            raise KuberankError(
                f"{onnx_path}: an int8 TensorRT plan needs an explicitly quantised (Q/DQ) model; "
                "this one has no QuantizeLinear nodes"
            )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KuberankError(f"{onnx_path}: TensorRT cannot parse this ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        profile.set_shape(network.get_input(i).name, min=min_shape, opt=opt_shape, max=max_shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise KuberankError(
            f"{onnx_path}: TensorRT failed to build a plan (see the TensorRT log above)"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


# --- the store ------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _copy_model_extras(model_dir: Path, dest: Path) -> list[str]:
    """Copy the model directory's files except the transformer weights (and checkpoints)."""
    copied = []
    for item in sorted(model_dir.iterdir()):
        if (
            item.name in WEIGHT_FILES
            or item.name.startswith(("checkpoint", "."))
            or item.suffix in (".onnx", ".plan")
        ):
            continue
        target = dest / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
        copied.append(item.name)
    return copied


def _model_info(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    weights = [model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    own = model_dir / "kuberank.json"
    own_manifest = json.loads(own.read_text()) if own.is_file() else None

    return {
        "source": str(model_dir),
        # file-level identity of the model directory (weights, tokenizer, config)
        "fingerprint": model_fingerprint(model_dir),
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "heads": config.get("num_attention_heads"),
        "weights_sha256": sha256_files(weights) if weights else None,
        "base_model": (own_manifest or {}).get("base_model") or config.get("_name_or_path") or None,
        "kuberank": own_manifest,
    }


def export_model(
    model_dir: str | os.PathLike,
    store: str | os.PathLike,
    *,
    max_length: int = MAX_LENGTH,
    parity_texts: list[str] | tuple[str, ...] = PARITY_TEXTS,
    version: int | None = None,
    per_channel: bool = True,
    fp16: bool = True,
    fp32_max_abs_diff: float = FP32_MAX_ABS_DIFF,
    int8_min_cosine: float = INT8_MIN_COSINE,
    max_batch_size: int = 64,
) -> dict:
    """Export ``model_dir`` into the model store ``store`` and return the manifest.

    Parity is checked on ``parity_texts`` against the in-process PyTorch model (fp32: max abs
    diff, int8 and fp16: mean cosine); a violation raises ParityError before the store is
    touched. The store's ``index/`` (if any) is left in place; its fingerprint tells serving
    whether it still matches this encoder.
    """
    started = time.perf_counter()
    model_dir, store = check_model_dir(model_dir), str(store)
    texts = [str(t) for t in parity_texts]
    if not texts:
        raise KuberankError("export: parity_texts is empty")
    try:
        previous = read_manifest(store)
    except (StorageError, KuberankError):
        previous = {}
    version = version or int(previous.get("version", 0)) + 1

    steps = bar(total=8, desc="export", unit="step")
    with tempfile.TemporaryDirectory(prefix="kuberank-export-") as tmp:
        work = Path(tmp)
        onnx_dir, edge_dir = work / ONNX_DIR, work / EDGE_DIR
        onnx_dir.mkdir()
        steps.set_postfix_str("reference (PyTorch)")
        reference = TextEncoder(str(model_dir), max_length=max_length)
        reference.tokenizer.backend_tokenizer.save(str(onnx_dir / "tokenizer.json"))
        ref = reference.encode(texts, desc="reference")
        info = _model_info(model_dir)
        dim = reference.dim
        del reference
        steps.update()

        steps.set_postfix_str("onnx")
        portable = export_onnx(model_dir, onnx_dir / PORTABLE_FILE)
        steps.update()

        def encode(path: Path) -> np.ndarray:
            return OnnxEncoder(
                path, tokenizer=onnx_dir / "tokenizer.json", max_length=max_length
            ).encode(texts, desc=path.name)

        parity = {
            "fp32_portable": check_parity(
                "fp32 ONNX",
                compare_embeddings(ref, encode(portable)),
                max_abs_diff=fp32_max_abs_diff,
            )
        }
        steps.update()

        steps.set_postfix_str("fusions")
        fp32 = onnx_dir / ENCODER_FILE
        fusions: dict | str
        try:
            fusions = optimize_onnx(
                portable, fp32, int(info["heads"] or 0), int(info["hidden_size"] or 0)
            )
            fused = compare_embeddings(ref, encode(fp32))
            if fused["max_abs_diff"] > fp32_max_abs_diff:
                raise ParityError(f"max abs diff {fused['max_abs_diff']:.3g} after fusions")
            parity["fp32"] = check_parity(
                "fp32 ONNX (fused)", fused, max_abs_diff=fp32_max_abs_diff
            )
        except Exception as exc:  # fusions are an optimisation: keep the plain graph instead
            fusions = f"skipped: {exc}"
            shutil.copyfile(portable, fp32)
            parity["fp32"] = parity["fp32_portable"]
        steps.update()

        steps.set_postfix_str("int8")
        int8 = quantize_int8(fp32, onnx_dir / INT8_FILE, per_channel=per_channel)
        parity["int8"] = check_parity(
            "int8 ONNX", compare_embeddings(ref, encode(int8)), min_cosine=int8_min_cosine
        )
        steps.update()

        serving_model = fp32
        if fp16:
            steps.set_postfix_str("fp16")
            serving_model = convert_fp16(fp32, work / "model.fp16.onnx")
            parity["fp16"] = check_parity(
                "fp16 ONNX",
                compare_embeddings(ref, encode(serving_model)),
                min_cosine=FP16_MIN_COSINE,
            )
        steps.update()

        steps.set_postfix_str("fingerprint")
        fingerprint = encoder_fingerprint(
            OnnxEncoder(fp32, tokenizer=onnx_dir / "tokenizer.json", max_length=max_length)
        )
        steps.update()

        steps.set_postfix_str("repositories")
        spec = RepositorySpec(
            dim=dim, max_length=max_length, version=version, max_batch_size=max_batch_size
        )
        write_repository(spec, work / TRITON_DIR, serving_model, onnx_dir / "tokenizer.json")
        write_repository(
            local_spec(spec), work / TRITON_LOCAL_DIR, fp32, onnx_dir / "tokenizer.json"
        )

        edge = write_edge_bundle(
            edge_dir,
            int8,
            onnx_dir / "tokenizer.json",
            max_length=max_length,
            fingerprint=fingerprint,
        )
        extras = _copy_model_extras(model_dir, work / MODEL_DIR)
        steps.update()
        steps.close()

        parts = [p for p in EXPORT_PARTS if (work / p).exists()]
        manifest = {
            **{k: v for k, v in previous.items() if k not in ("exported_at",)},
            "format": STORE_FORMAT,
            "version": version,
            "kuberank_version": __version__,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {**info, "extra_files": extras},
            "embedding": {
                "dim": dim,
                "max_length": max_length,
                "pooling": "mean",
                "normalized": True,
                "fingerprint": fingerprint,
                "fingerprint_encoder": f"{ENCODER} (ONNX Runtime, fp32)",
            },
            "onnx": {
                **onnx_io(fp32),
                "files": {
                    f"{ONNX_DIR}/{p.name}": p.stat().st_size for p in sorted(onnx_dir.iterdir())
                },
                "fusions": fusions,
                "int8": {"per_channel": per_channel, "op_types": list(INT8_OP_TYPES)},
            },
            "parity": parity,
            "triton": {
                "repository": TRITON_DIR,
                "local_repository": TRITON_LOCAL_DIR,
                "ensemble": "query_encoder",
                "input": "TEXT",
                "output": "EMBEDDING",
                "encoder_backend": spec.encoder_backend,
                "precision": "fp16" if fp16 else "fp32",
                "local_encoder_backend": local_spec(spec).encoder_backend,
                "local_precision": "fp32",
                "model_version": version,
            },
            "tensorrt": previous.get("tensorrt") if previous.get("version") == version else None,
            "edge": {"path": EDGE_DIR, **edge},
            "sizes": {p: _dir_bytes(work / p) for p in parts},
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        for part in bar(parts, desc="publish", unit="dir"):
            publish(work / part, store_path(store, part))
        if is_s3(store):
            write_json(work / MANIFEST, manifest)
            publish(work / MANIFEST, store_path(store, MANIFEST))
        else:
            write_json(Path(store_path(store, MANIFEST)), manifest)
    return manifest


def export_tensorrt(store: str | os.PathLike, **plan_options) -> dict:
    """On a GPU node: build a TensorRT plan from the store's portable ONNX and switch the
    production repository's encoder to the tensorrt_plan backend. Returns the manifest."""
    store = str(store)
    reason = tensorrt_unavailable()
    if reason:
        raise KuberankError(
            f"TensorRT for {store}: cannot build here ({reason}); run this on a GPU node"
        )
    manifest = read_manifest(store)
    local = Path(materialize(store_path(store, ONNX_DIR)))
    with tempfile.TemporaryDirectory(prefix="kuberank-trt-") as tmp:
        plan = build_tensorrt_plan(local / PORTABLE_FILE, Path(tmp) / "model.plan", **plan_options)
        emb = manifest["embedding"]
        spec = RepositorySpec(
            dim=emb["dim"],
            max_length=emb["max_length"],
            encoder_backend="tensorrt_plan",
            version=manifest["version"],
        )
        write_repository(spec, Path(tmp) / TRITON_DIR, plan, local / "tokenizer.json")
        publish(Path(tmp) / TRITON_DIR, store_path(store, TRITON_DIR))
        manifest["triton"].update(
            encoder_backend="tensorrt_plan",
            precision="fp16" if plan_options.get("fp16", True) else "fp32",
        )
        manifest["tensorrt"] = {
            "plan_bytes": plan.stat().st_size,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in plan_options.items()},
        }
        write_json(Path(tmp) / MANIFEST, manifest)
        publish(Path(tmp) / MANIFEST, store_path(store, MANIFEST))
    return manifest


@step_component()
def export_op(model: dsl.Input[dsl.Model], store: str, parity: dsl.Output[dsl.Metrics]) -> str:
    """kfp wrapper: export a trained model directory into the model store ``store`` (a path or
    s3:// prefix); parity numbers and sizes are logged to the UI. Returns the fingerprint."""
    from kuberank.components.export import export_model

    manifest = export_model(model.path, store)
    for precision, stats in manifest["parity"].items():
        for name, value in stats.items():
            if isinstance(value, (int, float)):
                parity.log_metric(f"{precision}.{name}", value)
    for part, size in manifest["sizes"].items():
        parity.log_metric(f"bytes.{part}", size)
    return manifest["embedding"]["fingerprint"]


@step_component()
def tensorrt_op(store: str, fingerprint: str) -> str:
    """On a GPU node: build the TensorRT plan from the store's ONNX and switch the production
    Triton repository to it. ``fingerprint`` (export's output) orders it after the export and
    is checked against the store. Returns the fingerprint."""
    from kuberank.components.export import export_tensorrt
    from kuberank.errors import KuberankError
    from kuberank.store import ModelStore

    found = ModelStore(store).embedding_fingerprint
    if found != fingerprint:
        raise KuberankError(
            f"store {store}: holds embedding {found}, export produced {fingerprint}"
        )
    export_tensorrt(store)
    return fingerprint
