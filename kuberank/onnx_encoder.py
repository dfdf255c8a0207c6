"""In-process ONNX Runtime text encoder, and the embedding fingerprint.

:class:`OnnxEncoder` has the same API as :class:`kuberank.encoder.TextEncoder` (``encode``,
``dim``) but runs an exported ONNX graph (see :mod:`kuberank.components.export`) whose output
``embedding`` is already mean-pooled and L2-normalised. Tokenization uses the ``tokenizers``
library on ``tokenizer.json``, so neither torch nor transformers is imported.

The embedding fingerprint (:func:`encoder_fingerprint`) identifies the encoder that produced a
set of embeddings: the export step records it in the store's manifest, the index records the
fingerprint of the encoder it was built with, and serving refuses an index whose fingerprint
differs from its encoder's. Compare recorded fingerprints as strings; recomputing one with a
different runtime (PyTorch vs ONNX Runtime, fp32 vs int8) can give a different string.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from kuberank.config import MAX_LENGTH
from kuberank.errors import KuberankError
from kuberank.progress import bar

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "embedding"

# Fixed probe texts of the fingerprint: queries and item-like texts of several lengths.
# Changing them changes every fingerprint; keep them stable.
FINGERPRINT_TEXTS = (
    "toy story",
    "a romantic comedy set in new york",
    "what is the boiling point of water at high altitude",
    "Star Wars (1977) Action|Adventure|Romance|Sci-Fi|War",
    "documentary about the deep ocean and its creatures",
    "how do vaccines train the immune system",
    "cheap flights to lisbon in march",
    "The Godfather (1972) Action|Crime|Drama",
    "children's animated film with talking animals",
    "symptoms of vitamin d deficiency",
    "a",
    "thriller with an unreliable narrator and a twist ending",
)
FINGERPRINT_DECIMALS = 3


def embedding_fingerprint(embeddings: np.ndarray) -> str:
    """``sha256:<hex>`` over the shape and the rounded values of probe embeddings."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(FINGERPRINT_TEXTS):
        raise KuberankError(
            f"fingerprint: expected embeddings of the {len(FINGERPRINT_TEXTS)} probe texts, "
            f"got shape {emb.shape}"
        )
    rounded = np.round(emb, FINGERPRINT_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    digest = hashlib.sha256(f"{emb.shape[0]}x{emb.shape[1]}:".encode())
    digest.update(rounded.astype("<f4").tobytes())
    return "sha256:" + digest.hexdigest()


def encoder_fingerprint(encoder) -> str:
    """The fingerprint of anything with ``encode(texts) -> np.ndarray`` (TextEncoder,
    OnnxEncoder, a Triton client wrapper)."""
    return embedding_fingerprint(encoder.encode(list(FINGERPRINT_TEXTS), desc="fingerprint"))


def load_tokenizer(path: str | os.PathLike, max_length: int = MAX_LENGTH):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` (a file or a directory holding one),
    truncating to ``max_length`` and not padding (callers pad per batch)."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise KuberankError(f"{file}: no tokenizer.json (a fast-tokenizer file is required)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise KuberankError(f"{file}: not a readable tokenizer.json: {exc}") from exc
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def tokenize(
    tokenizer, texts: list[str], pad_to: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int64 arrays, padded to the longest text (or ``pad_to``)."""
    encodings = tokenizer.encode_batch(list(texts))
    longest = max((len(e.ids) for e in encodings), default=1)
    width = max(longest, pad_to or 0, 1)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    return ids, mask


def session_options(intra_op_threads: int | None = 1):
    """ORT session options for serving: no spinning threads (they starve other work under
    concurrency) and a bounded intra-op pool."""
    import onnxruntime as ort  # local: heavy, only a session needs it

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if intra_op_threads:
        options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    return options


def load_session(model_path: str | os.PathLike, intra_op_threads: int | None = 1):
    """An ONNX Runtime CPU session; a missing, corrupt or truncated file is a KuberankError
    naming the file and carrying ONNX Runtime's message."""
    import onnxruntime as ort

    model_path = Path(model_path)
    if not model_path.is_file():
        raise KuberankError(f"{model_path}: no such ONNX model file")
    try:
        return ort.InferenceSession(
            str(model_path), session_options(intra_op_threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise KuberankError(f"{model_path}: ONNX Runtime cannot load this model: {exc}") from exc


class OnnxEncoder:
    """Encodes texts into L2-normalised float32 vectors with an exported ONNX model.

    ``path`` is a directory holding ``model.onnx`` and ``tokenizer.json`` (the store's
    ``onnx/`` or ``edge/``) or an ``.onnx`` / ``.ort`` file, with ``tokenizer`` (the file or its
    directory) given separately when it is not beside the model. ``intra_op_threads`` bounds
    ONNX Runtime's thread pool (None: ORT's default, one per core).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: str | os.PathLike | None = None,
        max_length: int = MAX_LENGTH,
        intra_op_threads: int | None = 1,
    ):
        path = Path(path)
        model_file = path / MODEL_FILE if path.is_dir() else path
        self.path = str(model_file)
        self.max_length = max_length
        self.tokenizer = load_tokenizer(tokenizer or model_file.parent, max_length)
        self.session = load_session(model_file, intra_op_threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o for o in self.session.get_outputs()}
        if OUTPUT_NAME not in outputs:
            raise KuberankError(
                f"{model_file}: no '{OUTPUT_NAME}' output (has {', '.join(outputs)}); "
                "export it with kuberank export"
            )
        dim = outputs[OUTPUT_NAME].shape[-1]
        if not isinstance(dim, int):
            dim = int(self._run(*tokenize(self.tokenizer, ["dim"])).shape[-1])
        self._dim = int(dim)

    @property
    def dim(self) -> int:
        return self._dim

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        return self.session.run(
            [OUTPUT_NAME], {k: v for k, v in feed.items() if k in self.input_names}
        )[0]

    def encode(self, texts: list[str], batch_size: int = 64, desc: str | None = None) -> np.ndarray:
        """Embeddings of ``texts`` in the caller's order (batches sorted by length)."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in bar(starts, desc=desc or "encode (onnx)", total=len(starts), unit="batch"):
            idx = order[start : start + batch_size]
            ids, mask = tokenize(self.tokenizer, [texts[i] for i in idx])
            out[idx] = self._run(ids, mask).astype(np.float32)
        return out
