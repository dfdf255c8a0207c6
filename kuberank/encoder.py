"""Text encoder: a transformer with mean pooling and L2 normalisation (sentence embeddings)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from kuberank.config import MAX_LENGTH, base_model_path
from kuberank.errors import KuberankError
from kuberank.progress import bar

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def check_model_dir(path: str | os.PathLike) -> Path:
    """A model directory must hold a config and a tokenizer; say which is missing."""
    path = Path(path)
    if not path.is_dir():
        raise KuberankError(f"--model: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise KuberankError(
            f"--model: {path} has no config.json (not a transformers model directory)"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise KuberankError(
            f"--model: {path} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    return path


def mean_pool(hidden, attention_mask):
    """Mean of the token states under the attention mask (torch tensors)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder:
    """Encodes texts into L2-normalised float32 vectors.

    Texts are encoded in batches sorted by length (much less padding on CPU) and returned in
    the caller's order.
    """

    def __init__(self, path: str | os.PathLike | None = None, max_length: int = MAX_LENGTH):
        import torch  # local: torch and transformers are heavy, loaded on first encoder
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.logging.set_verbosity_error()  # the unused pooler's weights are expected
        transformers.utils.logging.disable_progress_bar()

        self.path = str(check_model_dir(path or base_model_path()))
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path, add_pooling_layer=False)
        self.model.eval()
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 64, desc: str | None = None) -> np.ndarray:
        torch = self._torch
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        with torch.inference_mode():
            for start in bar(starts, desc=desc or "encode", total=len(starts), unit="batch"):
                idx = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                pooled = torch.nn.functional.normalize(
                    mean_pool(hidden, batch["attention_mask"]), dim=-1
                )
                out[idx] = pooled.float().numpy()
        return out


FINGERPRINT_FILES = ("model.safetensors", "tokenizer.json", "vocab.txt", "config.json")


def model_fingerprint(path: str | os.PathLike) -> str:
    """Identity of an encoder: sha256 over its weights, tokenizer and config (and those of a
    separate item tower). An index records the fingerprint of the model that embedded its
    items; serving refuses an index whose fingerprint differs from its encoder's."""
    root = Path(path)
    digest = hashlib.sha256()
    for tower in (root, root / "item_tower"):
        for name in FINGERPRINT_FILES:
            file = tower / name
            if file.is_file():
                digest.update(f"{tower.name}/{name}".encode())
                with open(file, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest()[:32]
