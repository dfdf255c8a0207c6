"""Edge bundle: a self-contained directory to embed queries and rank items on a device.

Layout::

    EDGE/bundle.json          dims, max_length, fingerprint, files, item count
    EDGE/model.onnx           int8 encoder (ONNX; ``model.ort`` too with ``ort_format=True``)
    EDGE/tokenizer.json
    EDGE/items.int8.npy       item embeddings, int8 with one scale per item (symmetric)
    EDGE/items.scale.npy
    EDGE/items.ids.json

Pure core: :func:`write_edge_bundle`, :func:`quantize_embeddings`, :func:`write_edge_items`,
:func:`edge_query`, :func:`edge_stats`; :func:`index_store_bundle` gives a model store's bundle
(``STORE/edge``, a path or s3://) the items the index step embedded, so a store is complete
after ``kuberank export`` + ``kuberank index`` (or the pipeline's index step). The runner needs
only numpy, onnxruntime and tokenizers, and runs single-threaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kuberank.config import MAX_LENGTH
from kuberank.errors import KuberankError
from kuberank.onnx_encoder import OnnxEncoder, load_session
from kuberank.storage import materialize_if_present, publish, write_json
from kuberank.store import EDGE_DIR, store_path

BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.onnx"
ORT_FILE = "model.ort"
TOKENIZER_FILE = "tokenizer.json"
ITEM_CODES = "items.int8.npy"
ITEM_SCALES = "items.scale.npy"
ITEM_IDS = "items.ids.json"
LATENCY_TEXTS = (
    "space adventure",
    "a romantic comedy in paris",
    "what is the best movie about artificial intelligence and robots",
    "crime drama",
)


def _read_bundle(bundle_dir: Path) -> dict:
    path = bundle_dir / BUNDLE_FILE
    if not path.is_file():
        raise KuberankError(f"{bundle_dir}: not an edge bundle (no {BUNDLE_FILE})")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise KuberankError(f"{path}: not valid JSON: {exc}") from exc


def _write_bundle(bundle_dir: Path, meta: dict) -> None:
    meta["files"] = {
        p.name: p.stat().st_size for p in sorted(bundle_dir.iterdir()) if p.name != BUNDLE_FILE
    }
    meta["bytes"] = sum(meta["files"].values())
    write_json(bundle_dir / BUNDLE_FILE, meta)


def write_edge_bundle(
    out_dir: str | os.PathLike,
    model_onnx: str | os.PathLike,
    tokenizer_json: str | os.PathLike,
    *,
    max_length: int = MAX_LENGTH,
    fingerprint: str | None = None,
    ort_format: bool = False,
) -> dict:
    """Write the bundle's model and tokenizer (items come later, from the index step, via
    :func:`write_edge_items`). With ``ort_format`` the model is also saved in ONNX Runtime's
    ORT format (loads faster, for minimal ORT builds). Returns the bundle metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_onnx, out_dir / MODEL_FILE)
    shutil.copyfile(tokenizer_json, out_dir / TOKENIZER_FILE)
    encoder = OnnxEncoder(out_dir, max_length=max_length)  # fails here on an unusable model
    meta = {
        "dim": encoder.dim,
        "max_length": max_length,
        "fingerprint": fingerprint,
        "items": 0,
        "model": MODEL_FILE,
    }
    if ort_format:
        import onnxruntime as ort  # onnxruntime: heavy; loaded only for the ORT format

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(out_dir / ORT_FILE)
        options.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(str(out_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        load_session(out_dir / ORT_FILE)  # the saved file must load
        meta["model"] = ORT_FILE
    _write_bundle(out_dir, meta)
    return meta


def quantize_embeddings(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``embeddings ~= codes * scale[:, None]``."""
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise KuberankError(f"item embeddings: expected a 2-d array, got shape {emb.shape}")
    scale = np.abs(emb).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(emb / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def write_edge_items(bundle_dir: str | os.PathLike, embeddings: np.ndarray, ids: list) -> dict:
    """Add (or replace) the bundle's items: int8-quantised embeddings and their ids."""
    bundle_dir = Path(bundle_dir)
    meta = _read_bundle(bundle_dir)
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != meta["dim"]:
        raise KuberankError(
            f"{bundle_dir}: item embeddings must be (n, {meta['dim']}), got {emb.shape}"
        )
    if len(ids) != emb.shape[0]:
        raise KuberankError(f"{bundle_dir}: {len(ids)} ids for {emb.shape[0]} embeddings")
    codes, scale = quantize_embeddings(emb)
    np.save(bundle_dir / ITEM_CODES, codes)
    np.save(bundle_dir / ITEM_SCALES, scale)
    (bundle_dir / ITEM_IDS).write_text(json.dumps([str(i) for i in ids]))
    meta["items"] = int(emb.shape[0])
    _write_bundle(bundle_dir, meta)
    return meta


def index_store_bundle(
    store: str | os.PathLike, embeddings: np.ndarray, ids: list, fingerprint: str
) -> dict | None:
    """Give the model store's edge bundle (``STORE/edge``) the items of its index: ``embeddings``
    (the index's vectors, row order of ``ids``) int8-quantised, written into a copy of the
    bundle that then replaces ``STORE/edge`` (a local path or an s3:// prefix). ``fingerprint``
    is the store's embedding fingerprint; a bundle from another export is refused. Returns the
    bundle metadata, or None for a store without an edge bundle."""
    store = str(store)
    uri = store_path(store, EDGE_DIR)
    local = materialize_if_present(uri)  # denied or unreachable storage still raises
    if local is None or not (local / BUNDLE_FILE).is_file():
        return None
    found = _read_bundle(local).get("fingerprint")
    if found and found != fingerprint:
        raise KuberankError(
            f"{uri}: the edge bundle was exported with embedding {found}, the index is "
            f"{fingerprint}; export the model again, then index"
        )
    with tempfile.TemporaryDirectory(prefix="kuberank-edge-") as tmp:
        work = Path(tmp) / EDGE_DIR
        shutil.copytree(local, work)
        meta = write_edge_items(work, embeddings, ids)
        publish(work, uri)
    return meta


class EdgeRanker:
    """A loaded bundle: single-threaded ONNX Runtime encoder plus int8 item embeddings."""

    def __init__(self, bundle_dir: str | os.PathLike, threads: int = 1):
        self.bundle_dir = Path(bundle_dir)
        self.meta = _read_bundle(self.bundle_dir)
        self.encoder = OnnxEncoder(
            self.bundle_dir / self.meta.get("model", MODEL_FILE),
            tokenizer=self.bundle_dir / TOKENIZER_FILE,
            max_length=int(self.meta["max_length"]),
            intra_op_threads=threads,
        )
        if not (self.bundle_dir / ITEM_CODES).is_file():
            raise KuberankError(
                f"{self.bundle_dir}: the edge bundle has no items yet (run kuberank index)"
            )
        self.codes = np.load(self.bundle_dir / ITEM_CODES)
        self.scale = np.load(self.bundle_dir / ITEM_SCALES)
        self.ids = json.loads((self.bundle_dir / ITEM_IDS).read_text())

    def embed(self, text: str) -> np.ndarray:
        return self.encoder.encode([text], desc="edge")[0]

    def query(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best items for ``text`` with their (approximate cosine) scores."""
        if k <= 0:
            raise KuberankError(f"k must be positive, got {k}")
        scores = (self.codes @ self.embed(text).astype(np.float32)) * self.scale
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        return [(self.ids[i], float(scores[i])) for i in top]


def edge_query(bundle_dir: str | os.PathLike, text: str, k: int = 10) -> list[tuple[str, float]]:
    """Load the bundle and return the ``k`` best ``(item_id, score)`` for ``text``."""
    return EdgeRanker(bundle_dir).query(text, k)


def edge_stats(
    bundle_dir: str | os.PathLike, texts: list[str] | None = None, repeats: int = 20
) -> dict:
    """Bundle size and single-thread query latency (encode + score + top-10), in ms."""
    ranker = EdgeRanker(bundle_dir, threads=1)
    texts = list(texts or LATENCY_TEXTS)
    ranker.query(texts[0])  # warm-up
    times = []
    for i in range(max(repeats, 1)):
        start = time.perf_counter()
        ranker.query(texts[i % len(texts)])
        times.append((time.perf_counter() - start) * 1000)
    return {
        "bundle_bytes": int(ranker.meta["bytes"]),
        "model_bytes": int(ranker.meta["files"].get(ranker.meta.get("model", MODEL_FILE), 0)),
        "items": int(ranker.meta["items"]),
        "threads": 1,
        "latency_ms_p50": round(float(np.percentile(times, 50)), 2),
        "latency_ms_p95": round(float(np.percentile(times, 95)), 2),
        "queries": len(times),
    }
