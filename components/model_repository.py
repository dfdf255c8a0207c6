"""Triton model repository writer: a tokenizer, an encoder and a ``query_encoder`` ensemble,
written into the store by the export step (components/export.py).

Everything is written from one :class:`RepositorySpec`::

    REPO/
      tokenizer/config.pbtxt       python backend: TEXT (BYTES) -> input_ids, attention_mask (INT64)
      tokenizer/1/model.py         self-contained (``tokenizers`` + numpy), no kuberank import
      tokenizer/1/tokenizer.json
      encoder/config.pbtxt         input_ids, attention_mask -> embedding (FP32 [dim], pooled, L2)
      encoder/1/model.onnx         backend onnxruntime (production GPU)
        or    model.plan           backend tensorrt (built on a GPU node)
        or    model.onnx+model.py  python backend running ONNX Runtime (local: the tritonserver
                                   bundled in nvidia-pytriton only has the python backend)
      query_encoder/config.pbtxt   ensemble: TEXT -> EMBEDDING
      query_encoder/1/

Local and production repositories differ only in the encoder's backend (its ``backend`` /
``platform`` / model file and the instance kind that backend runs on); the tokenizer and the
ensemble are byte-identical.

Dynamic batching only merges requests whose inputs have the same shape, so the tokenizer pads
each request to a *sequence bucket* (16, 32, 64, ... tokens): requests of similar length batch
together in the encoder; mean pooling under the attention mask makes the padding exact.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from kuberank.config import DEFAULT_BUDGET_MS
from kuberank.errors import KuberankError
from kuberank.storage import atomic_dir

TOKENIZER = "tokenizer"
ENCODER = "encoder"
ENSEMBLE = "query_encoder"
TEXT_INPUT = "TEXT"
EMBEDDING_OUTPUT = "EMBEDDING"
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "embedding"

# backend name -> (config lines naming the backend and its model file, the encoder file it
# serves, the instance kind it runs on)
ENCODER_BACKENDS = {
    # python backend (model.py) running model.onnx in ONNX Runtime in the stub process
    "python_onnxruntime": (
        'backend: "python"\ndefault_model_filename: "model.py"',
        "model.onnx",
        "KIND_CPU",
    ),
    # Triton's ONNX Runtime backend (production, GPU nodes)
    "onnxruntime_onnx": (
        'backend: "onnxruntime"\nplatform: "onnxruntime_onnx"\ndefault_model_filename: "model.onnx"',
        "model.onnx",
        "KIND_GPU",
    ),
    # Triton's TensorRT backend with a plan built on the serving GPU type
    "tensorrt_plan": (
        'backend: "tensorrt"\nplatform: "tensorrt_plan"\ndefault_model_filename: "model.plan"',
        "model.plan",
        "KIND_GPU",
    ),
}
LOCAL_BACKEND = "python_onnxruntime"
PRODUCTION_BACKEND = "onnxruntime_onnx"


@dataclass(frozen=True)
class RepositorySpec:
    """Everything that shapes the repository. ``encoder_backend`` is the one field that differs
    between the local and the production flavour (see :func:`local_spec`)."""

    dim: int
    max_length: int
    encoder_backend: str = PRODUCTION_BACKEND
    version: int = 1
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000
    # Triton's queue policy, matched to the Ingress's admission: a request still queued after
    # the default latency budget is rejected (UNAVAILABLE), never run late (serving/admission.py)
    queue_timeout_us: int = int(DEFAULT_BUDGET_MS * 1000)
    encoder_instances: int = 1
    tokenizer_instances: int = 1
    intra_op_threads: int = 1
    sequence_buckets: tuple[int, ...] = field(default=(16, 32, 64, 128, 256, 512))

    def __post_init__(self):
        if self.encoder_backend not in ENCODER_BACKENDS:
            raise KuberankError(
                f"encoder_backend: {self.encoder_backend!r} is not one of {', '.join(ENCODER_BACKENDS)}"
            )
        if self.dim <= 0 or self.max_length <= 0 or self.version <= 0:
            raise KuberankError("dim, max_length and version must be positive")
        if self.max_batch_size < 1 or any(
            b > self.max_batch_size for b in self.preferred_batch_sizes
        ):
            raise KuberankError(
                f"preferred_batch_sizes {self.preferred_batch_sizes} must not exceed "
                f"max_batch_size {self.max_batch_size}"
            )

    @property
    def encoder_file(self) -> str:
        return ENCODER_BACKENDS[self.encoder_backend][1]

    @property
    def buckets(self) -> tuple[int, ...]:
        """Sequence buckets up to and including ``max_length``."""
        return tuple(b for b in self.sequence_buckets if b < self.max_length) + (self.max_length,)


def local_spec(spec: RepositorySpec) -> RepositorySpec:
    """The same repository with the encoder run by the python backend on CPU."""
    return replace(spec, encoder_backend=LOCAL_BACKEND)


def production_spec(spec: RepositorySpec, backend: str = PRODUCTION_BACKEND) -> RepositorySpec:
    """The same repository with the encoder on Triton's ONNX Runtime or TensorRT backend."""
    return replace(spec, encoder_backend=backend)


# --- config.pbtxt ---------------------------------------------------------------------------


def _dynamic_batching(spec: RepositorySpec) -> str:
    sizes = ", ".join(str(b) for b in spec.preferred_batch_sizes)
    return (
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {sizes} ]\n"
        f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {spec.queue_timeout_us}\n"
        "    allow_timeout_override: true\n"
        "  }\n"
        "}\n"
    )


def _version_policy() -> str:
    return "version_policy: { latest: { num_versions: 1 } }\n"


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {count}, kind: {kind} }} ]\n"


def _tensor(name: str, dtype: str, dims: str) -> str:
    return f'  {{ name: "{name}", data_type: {dtype}, dims: [ {dims} ] }}'


def tokenizer_config(spec: RepositorySpec) -> str:
    buckets = ",".join(str(b) for b in spec.buckets)
    return (
        f'name: "{TOKENIZER}"\n'
        'backend: "python"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        f"input [\n{_tensor(TEXT_INPUT, 'TYPE_STRING', '1')}\n]\n"
        "output [\n"
        + ",\n".join(_tensor(name, "TYPE_INT64", "-1") for name in ENCODER_INPUTS)
        + "\n]\n"
        + _version_policy()
        + _dynamic_batching(spec)
        + _instances(spec.tokenizer_instances, "KIND_CPU")
        + f'parameters: {{ key: "max_length", value: {{ string_value: "{spec.max_length}" }} }}\n'
        + f'parameters: {{ key: "sequence_buckets", value: {{ string_value: "{buckets}" }} }}\n'
    )


def encoder_config(spec: RepositorySpec) -> str:
    backend_lines, _, kind = ENCODER_BACKENDS[spec.encoder_backend]
    return (
        f'name: "{ENCODER}"\n'
        f"{backend_lines}\n"
        f"max_batch_size: {spec.max_batch_size}\n"
        "input [\n"
        + ",\n".join(_tensor(name, "TYPE_INT64", "-1") for name in ENCODER_INPUTS)
        + "\n]\n"
        f"output [\n{_tensor(ENCODER_OUTPUT, 'TYPE_FP32', str(spec.dim))}\n]\n"
        + _version_policy()
        + _dynamic_batching(spec)
        + _instances(spec.encoder_instances, kind)
        + f'parameters: {{ key: "intra_op_thread_count", value: {{ string_value: "{spec.intra_op_threads}" }} }}\n'
    )


def ensemble_config(spec: RepositorySpec) -> str:
    tokens = "".join(f'output_map {{ key: "{n}", value: "{n}" }} ' for n in ENCODER_INPUTS)
    feeds = "".join(f'input_map {{ key: "{n}", value: "{n}" }} ' for n in ENCODER_INPUTS)
    return (
        f'name: "{ENSEMBLE}"\n'
        'platform: "ensemble"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        f"input [\n{_tensor(TEXT_INPUT, 'TYPE_STRING', '1')}\n]\n"
        f"output [\n{_tensor(EMBEDDING_OUTPUT, 'TYPE_FP32', str(spec.dim))}\n]\n"
        + _version_policy()
        + "ensemble_scheduling {\n  step [\n"
        f'    {{ model_name: "{TOKENIZER}", model_version: -1, '
        f'input_map {{ key: "{TEXT_INPUT}", value: "{TEXT_INPUT}" }} {tokens}}},\n'
        f'    {{ model_name: "{ENCODER}", model_version: -1, {feeds}'
        f'output_map {{ key: "{ENCODER_OUTPUT}", value: "{EMBEDDING_OUTPUT}" }} }}\n'
        "  ]\n}\n"
    )


def render_configs(spec: RepositorySpec) -> dict[str, str]:
    """Model name -> config.pbtxt text."""
    return {
        TOKENIZER: tokenizer_config(spec),
        ENCODER: encoder_config(spec),
        ENSEMBLE: ensemble_config(spec),
    }


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse config.pbtxt text with Triton's own ModelConfig protobuf (shipped in tritonclient);
    a syntax error or an unknown field is a KuberankError naming ``where``."""
    from google.protobuf import text_format  # tritonclient, protobuf: heavy; loaded to parse
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise KuberankError(f"{where}: not a valid Triton model config: {exc}") from exc


def validate_repository(repo: str | os.PathLike) -> dict[str, object]:
    """Parse every ``*/config.pbtxt`` and check what the server would check first: the name
    matches the directory, a version directory exists, the model file is there, and the
    ensemble's steps name models of this repository. Returns name -> parsed config."""
    repo = Path(repo)
    if not repo.is_dir():
        raise KuberankError(f"{repo}: no such model repository")
    configs = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        cfg = parse_config(cfg_path.read_text(), str(cfg_path))
        model_dir = cfg_path.parent
        if cfg.name and cfg.name != model_dir.name:
            raise KuberankError(
                f"{cfg_path}: name {cfg.name!r} differs from its directory {model_dir.name!r}"
            )
        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            raise KuberankError(f"{model_dir}: no version directory (e.g. {model_dir}/1)")
        if cfg.platform != "ensemble":
            model_file = cfg.default_model_filename or (
                "model.py" if cfg.backend == "python" else ""
            )
            for version in versions:
                if model_file and not (version / model_file).is_file():
                    raise KuberankError(f"{version / model_file}: missing model file")
        configs[model_dir.name] = cfg
    if not configs:
        raise KuberankError(f"{repo}: no */config.pbtxt (not a Triton model repository)")
    for name, cfg in configs.items():
        for step in cfg.ensemble_scheduling.step:
            if step.model_name not in configs:
                raise KuberankError(
                    f"{repo / name / 'config.pbtxt'}: step model {step.model_name!r} is not in {repo}"
                )
    return configs


# --- python backend models ------------------------------------------------------------------

TOKENIZER_MODEL_PY = '''\
"""Triton python backend: TEXT (BYTES [1]) -> input_ids, attention_mask (INT64 [-1]).

Written by kuberank (components/model_repository.py). Each request is padded to the smallest
sequence bucket that holds its longest text, so that the encoder's dynamic batcher can merge
requests of similar length.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_length = int(params["max_length"])
        self.buckets = sorted(int(b) for b in params["sequence_buckets"].split(","))
        here = os.path.join(args["model_repository"], args["model_version"])
        self.tokenizer = Tokenizer.from_file(os.path.join(here, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)

    def _bucket(self, length):
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        return self.buckets[-1]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
                texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in raw]
                encodings = self.tokenizer.encode_batch(texts)
                width = self._bucket(max(len(e.ids) for e in encodings))
                ids = np.zeros((len(texts), width), dtype=np.int64)
                mask = np.zeros((len(texts), width), dtype=np.int64)
                for row, enc in enumerate(encodings):
                    ids[row, : len(enc.ids)] = enc.ids
                    mask[row, : len(enc.ids)] = 1
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("input_ids", ids),
                    pb_utils.Tensor("attention_mask", mask),
                ]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"tokenizer: {exc}")))
        return responses
'''

ENCODER_MODEL_PY = '''\
"""Triton python backend: input_ids, attention_mask (INT64) -> embedding (FP32 [dim]).

Written by kuberank (components/model_repository.py) for the local repository: it runs the same
model.onnx that production serves with Triton's onnxruntime backend, in ONNX Runtime on CPU.
Requests of a dynamic batch are padded to one width and run as one ONNX Runtime call.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "1"))
        options.inter_op_num_threads = 1
        here = os.path.join(args["model_repository"], args["model_version"])
        self.session = ort.InferenceSession(
            os.path.join(here, "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}

    def execute(self, requests):
        try:
            ids = [pb_utils.get_input_tensor_by_name(r, "input_ids").as_numpy() for r in requests]
            masks = [pb_utils.get_input_tensor_by_name(r, "attention_mask").as_numpy() for r in requests]
            width = max(a.shape[1] for a in ids)
            pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731
            feed = {"input_ids": np.concatenate([pad(a) for a in ids]).astype(np.int64),
                    "attention_mask": np.concatenate([pad(a) for a in masks]).astype(np.int64)}
            if "token_type_ids" in self.input_names:
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            embedding = self.session.run(["embedding"], feed)[0].astype(np.float32)
        except Exception as exc:
            error = pb_utils.TritonError(f"encoder: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for a in ids:
            rows = embedding[start : start + a.shape[0]]
            start += a.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("embedding", rows)]))
        return responses
'''


def write_repository(
    spec: RepositorySpec,
    out_dir: str | os.PathLike,
    encoder_file: str | os.PathLike,
    tokenizer_json: str | os.PathLike,
) -> Path:
    """Write the repository for ``spec`` into ``out_dir`` (created or replaced).

    ``encoder_file`` is the ONNX model (or the TensorRT plan for ``tensorrt_plan``) whose output
    ``embedding`` is the pooled, normalised vector; ``tokenizer_json`` the fast-tokenizer file.
    """
    encoder_file, tokenizer_json = Path(encoder_file), Path(tokenizer_json)
    for path in (encoder_file, tokenizer_json):
        if not path.is_file():
            raise KuberankError(f"{path}: no such file (needed for the Triton model repository)")
    if spec.encoder_file == "model.plan" and encoder_file.suffix == ".onnx":
        raise KuberankError(
            f"{encoder_file}: the tensorrt_plan backend needs a TensorRT plan, not ONNX"
        )
    if spec.encoder_file == "model.onnx" and encoder_file.suffix != ".onnx":
        raise KuberankError(
            f"{encoder_file}: the {spec.encoder_backend} backend needs an .onnx model"
        )

    configs = render_configs(spec)
    for name, text in configs.items():
        parse_config(text, f"{name}/config.pbtxt")  # a writer bug fails here, not in the server
    with atomic_dir(out_dir) as tmp:
        for name, text in configs.items():
            version = tmp / name / str(spec.version)
            version.mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text)
        tok_version = tmp / TOKENIZER / str(spec.version)
        (tok_version / "model.py").write_text(TOKENIZER_MODEL_PY)
        shutil.copyfile(tokenizer_json, tok_version / "tokenizer.json")
        enc_version = tmp / ENCODER / str(spec.version)
        shutil.copyfile(encoder_file, enc_version / spec.encoder_file)
        if spec.encoder_backend == LOCAL_BACKEND:
            (enc_version / "model.py").write_text(ENCODER_MODEL_PY)
        validate_repository(tmp)
    return Path(out_dir)
