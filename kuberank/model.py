"""The ranking model: two text towers and the scorer F(Q, B, I).

F(Q, B, I) = w_rel * Q·I                                   relevance (query text vs item text)
           + w_beh * sum_k softmax_k(s * B_k·I + r_k) B_k·I behaviour: the user's history items
                                                           B_k attend to the candidate I, with a
                                                           learned recency bias r_k
           + w_cf  * (U_u·V_i + b_i)                        low-rank collaborative term for users
                                                           and items seen in training

Q and the items' text vectors come from the towers (mean pooling, L2-normalised; shared or
separate weights). The behaviour space embeds an item as normalise(P · text_i + E_i): a
projection of its text vector plus an id embedding learned for items seen in training, so a
new item still has a behaviour vector from its text. For search data without users F reduces
to Q·I; for recommendation there is no query text and B is the user's history.

A model directory holds the query tower as a plain transformers model (so ONNX export and
``kuberank evaluate`` read it directly), ``item_tower/`` when the towers are separate,
``scorer.safetensors`` for F's parameters, and ``kuberank.json`` (the manifest).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kuberank.encoder import TextEncoder, check_model_dir, model_fingerprint
from kuberank.onnx_encoder import OnnxEncoder
from kuberank.store import INT8_ENCODER, MODEL_DIR, ONNX_DIR, is_store

MODEL_FORMAT = "kuberank-model"
MANIFEST = "kuberank.json"
SCORER_FILE = "scorer.safetensors"
ITEM_TOWER_DIR = "item_tower"
TERMS = ("relevance", "behaviour", "collaborative")  # F's terms, in the order they are summed


@dataclass
class ScorerConfig:
    n_items: int = 0
    n_users: int = 0
    text_dim: int = 384
    dim: int = 64  # behaviour space
    cf_rank: int = 32
    max_history: int = 20
    use_relevance: bool = True
    use_behaviour: bool = False
    use_collaborative: bool = False


@dataclass
class ModelInfo:
    """What ``kuberank.json`` records next to the weights."""

    kind: str  # "search" | "recommendation"
    base_model: str
    towers: str = "shared"
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    item_ids: list[str] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    dataset: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    fingerprint: str = ""
    version: str = ""
    compression: dict = field(default_factory=dict)


class Scorer(nn.Module):
    """F's parameters and arithmetic over precomputed text vectors."""

    def __init__(self, cfg: ScorerConfig):
        super().__init__()
        self.cfg = cfg
        n_items, n_users = cfg.n_items + 1, cfg.n_users + 1  # last row: unknown item / user
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim, bias=False)
        self.item_id = nn.Embedding(n_items, cfg.dim)
        self.recency = nn.Parameter(torch.zeros(cfg.max_history))
        self.attention_scale = nn.Parameter(torch.tensor(5.0))
        self.user_cf = nn.Embedding(n_users, cfg.cf_rank)
        self.item_cf = nn.Embedding(n_items, cfg.cf_rank)
        self.item_bias = nn.Embedding(n_items, 1)
        self.term_weights = nn.Parameter(torch.tensor([20.0, 10.0, 1.0]))  # rel, beh, cf
        for table in (self.item_id, self.user_cf, self.item_cf):
            nn.init.normal_(table.weight, std=0.01)
            with torch.no_grad():
                table.weight[-1].zero_()
        nn.init.zeros_(self.item_bias.weight)

    def behaviour_vectors(self, text_vecs: torch.Tensor, item_index: torch.Tensor) -> torch.Tensor:
        """normalise(P text_i + E_i) for items (unknown items use the last, zero, id row)."""
        return nn.functional.normalize(self.text_proj(text_vecs) + self.item_id(item_index), dim=-1)

    def forward(
        self,
        item_text: torch.Tensor,  # [N, T] text vectors of the candidate items
        item_index: torch.Tensor,  # [N] their ids (n_items = unknown)
        query: torch.Tensor | None = None,  # [B, T] query vectors (None: no query text)
        history: torch.Tensor | None = None,  # [B, L] item indices, most recent last; -1 = pad
        history_text: torch.Tensor | None = None,  # [B, L, T] their text vectors
        users: torch.Tensor | None = None,  # [B] user indices (n_users = unknown)
        item_behaviour: torch.Tensor | None = None,  # [N, D] behaviour_vectors of the candidates
    ) -> torch.Tensor:
        """Scores [B, N] of every candidate for every row: the sum of :meth:`terms`.
        ``item_behaviour``: the candidates' behaviour vectors when the caller keeps them (they
        depend on the model only)."""
        parts = self.terms(
            item_text, item_index, query, history, history_text, users, item_behaviour
        )
        batch = next(t.shape[0] for t in (query, history, users) if t is not None)
        score = item_text.new_zeros(batch, item_text.shape[0])
        for name in TERMS:
            if name in parts:
                score = score + parts[name]
        return score

    def terms(
        self,
        item_text: torch.Tensor,
        item_index: torch.Tensor,
        query: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_text: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
        item_behaviour: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """F's terms as they enter the score (arguments as :meth:`forward`), each [B, N] and
        weighted: ``relevance`` (w_rel Q·I), ``behaviour`` (w_beh sum_k a_k B_k·I) and
        ``collaborative`` (w_cf (U·V + b)), only those the model uses and the input feeds. With
        the behaviour term come ``attention`` [B, L, N] (a_k) and ``contribution`` [B, L, N]
        (w_beh a_k B_k·I, which sums over L to the behaviour term)."""
        w = self.term_weights
        parts: dict[str, torch.Tensor] = {}
        if self.cfg.use_relevance and query is not None:
            parts["relevance"] = w[0] * query @ item_text.T
        if self.cfg.use_behaviour and history is not None and history.shape[1] > 0:
            if item_behaviour is None:
                item_behaviour = self.behaviour_vectors(item_text, item_index)
            attention, sims = self._attention(item_behaviour, history, history_text)
            parts["behaviour"] = w[1] * (attention * sims).sum(1)
            parts["attention"] = attention
            parts["contribution"] = w[1] * attention * sims
        if self.cfg.use_collaborative and users is not None:
            cf = self.user_cf(users) @ self.item_cf(item_index).T + self.item_bias(item_index).T
            parts["collaborative"] = w[2] * cf
        return parts

    def _attention(self, cand_vecs, history, history_text):
        """Attention of the history over each candidate ([B, L, N]) and the similarities it
        weighs; ``cand_vecs`` [N, D]."""
        mask = history >= 0  # [B, L]
        hist_index = torch.where(mask, history, torch.full_like(history, self.cfg.n_items))
        hist_vecs = self.behaviour_vectors(history_text, hist_index)  # [B, L, D]
        sims = torch.einsum("bld,nd->bln", hist_vecs, cand_vecs)  # [B, L, N]
        length = history.shape[1]
        recency = self.recency[-length:] if length <= self.cfg.max_history else self.recency
        logits = self.attention_scale * sims + recency[None, -length:, None]
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        attention = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows without history -> 0
        return attention, sims


# --------------------------------------------------------------------------- persistence


def save_model(
    out: str | os.PathLike,
    encoder,
    tokenizer,
    scorer: Scorer | None,
    info: ModelInfo,
    item_encoder=None,
) -> Path:
    """Write a model directory (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if item_encoder is not None:
        item_encoder.save_pretrained(out / ITEM_TOWER_DIR, safe_serialization=True)
        tokenizer.save_pretrained(out / ITEM_TOWER_DIR)
    if scorer is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in scorer.state_dict().items()},
            str(out / SCORER_FILE),
        )
    info.fingerprint = model_fingerprint(out)
    doc = {"format": MODEL_FORMAT, **asdict(info)}
    (out / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    return out


def is_kuberank_model(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_info(path: str | os.PathLike) -> ModelInfo:
    doc = json.loads((Path(path) / MANIFEST).read_text())
    known = {f.name for f in dataclasses.fields(ModelInfo)}
    doc = {k: v for k, v in doc.items() if k in known}  # newer writers may add keys
    doc["scorer"] = ScorerConfig(**doc.get("scorer", {}))
    return ModelInfo(**doc)


def load_scorer(path: str | os.PathLike, info: ModelInfo) -> Scorer:
    scorer = Scorer(info.scorer)
    weights = Path(path) / SCORER_FILE
    if weights.is_file():
        scorer.load_state_dict(load_file(str(weights)))
    scorer.eval()
    return scorer


def item_tower_path(path: str | os.PathLike) -> Path:
    separate = Path(path) / ITEM_TOWER_DIR
    return separate if separate.is_dir() else Path(path)


@dataclass
class ResolvedModel:
    """Where a model's parts live, whatever form it takes."""

    info: ModelInfo | None  # None: a plain transformers encoder (search, F = Q·I)
    scorer_dir: Path | None  # holds kuberank.json and scorer.safetensors
    query_encoder: object
    item_encoder: object


def resolve_model(path: str | os.PathLike, threads: int | None = None) -> ResolvedModel:
    """Open any model form ``kuberank evaluate --model`` accepts:

    - a model directory from ``kuberank train`` (PyTorch towers),
    - a compressed one from ``kuberank compress`` (its ``onnx/model.int8.onnx`` is used),
    - a model store from ``kuberank export`` (``onnx/model.onnx``, F's weights under ``model/``),
    - a plain transformers encoder directory.
    """
    root = Path(path)
    if is_store(root):
        extras = root / MODEL_DIR
        info = read_info(extras) if is_kuberank_model(extras) else None
        encoder = OnnxEncoder(root / ONNX_DIR, intra_op_threads=threads)
        item = (
            TextEncoder(str(extras / ITEM_TOWER_DIR))
            if (extras / ITEM_TOWER_DIR).is_dir()
            else encoder
        )
        return ResolvedModel(info, extras if info else None, encoder, item)
    check_model_dir(root)
    info = read_info(root) if is_kuberank_model(root) else None
    if (root / INT8_ENCODER).is_file():
        encoder = OnnxEncoder(root / INT8_ENCODER, tokenizer=root, intra_op_threads=threads)
    else:
        encoder = TextEncoder(str(root))
    separate = item_tower_path(root)
    item = TextEncoder(str(separate)) if separate != root else encoder
    return ResolvedModel(info, root if info else None, encoder, item)


def pad_histories(histories: list[np.ndarray], max_history: int) -> np.ndarray:
    """Right-aligned [B, L] index matrix of the last ``max_history`` items, -1 = padding."""
    length = max(1, min(max_history, max((len(h) for h in histories), default=1)))
    out = np.full((len(histories), length), -1, dtype=np.int64)
    for row, hist in enumerate(histories):
        tail = np.asarray(hist[-length:], dtype=np.int64)
        if len(tail):
            out[row, -len(tail) :] = tail
    return out
