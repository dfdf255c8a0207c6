"""The item index: embeddings of every item, their ids, an ANN index beyond a size threshold,
and the fingerprints of the model that embedded them.

Pure core: :func:`build_index` (model directory + dataset + exported store -> STORE/index),
:func:`load_index` / :class:`ItemIndex` (exact or ANN top-n search), :func:`check_index`
(refuses an index embedded by another model). Thin wrappers: ``kuberank index`` and the kfp
component :func:`index_op`.

Layout::

    STORE/index/index.json       format, count, dim, kind, dataset, fingerprints, ann settings
    STORE/index/embeddings.npy   float32 [count, dim], L2-normalised item vectors
    STORE/index/ids.json         item ids, row order of embeddings.npy
    STORE/index/attributes.json  the items' attributes that filters use (serving/filters.py)
    STORE/index/ann.faiss        HNSW graph (faiss, inner product) when count > ann_threshold
    STORE/lexical/               BM25 over the same items and the fitted fusion (kuberank/lexical.py)
    STORE/edge/items.*           the same items for the edge bundle (int8; components/edge.py)

Items are embedded with the exported fp32 ONNX encoder (``STORE/onnx/model.onnx``, the one the
store's embedding fingerprint was computed with) when the towers are shared, and with the
PyTorch item tower (``DIR/item_tower``) when they are separate. The index records

- ``model_fingerprint``: :func:`kuberank.encoder.model_fingerprint` of the model directory, which
  must equal the store manifest's ``model.fingerprint`` (export of the same model), and
- ``embedding_fingerprint``: the store manifest's ``embedding.fingerprint``.

Serving compares both with the manifest it serves and refuses a mismatch.
"""

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kfp import dsl

from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component
from kuberank.progress import bar
from kuberank.store import ENCODER, ENCODER_FILE, INDEX_DIR, LEXICAL_DIR, ONNX_DIR

INDEX_FORMAT = "kuberank-index/1"
META_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
ANN_FILE = "ann.faiss"
ATTRIBUTES_FILE = "attributes.json"
# Exact search over 50k x 384 float32 items is ~20 MFLOP per query (~2-4 ms on one core); beyond
# that an HNSW graph answers in well under a millisecond.
DEFAULT_ANN_THRESHOLD = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128


class IndexMismatchError(KuberankError):
    """The index was embedded by a different model than the encoder being served."""


def _join(store: str, *parts: str) -> str:
    from kuberank.storage import is_s3

    if is_s3(store):
        return "/".join([store.rstrip("/"), *parts])
    return str(Path(store).joinpath(*parts))


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # the ANN path needs the pinned faiss-cpu wheel
        raise KuberankError(
            "the ANN index needs faiss (pip install faiss-cpu==1.15.1); "
            "or raise --ann-threshold to keep exact search"
        ) from exc
    return faiss


def build_hnsw(
    embeddings: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION
):
    """A faiss HNSW graph over normalised vectors with inner-product similarity."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(embeddings.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    step = 4096
    for start in bar(range(0, len(embeddings), step), desc="ann index", unit="chunk"):
        index.add(np.ascontiguousarray(embeddings[start : start + step], dtype=np.float32))
    return index


def store_encoder(store_local: Path, max_length: int):
    """The store's exported fp32 ONNX encoder (STORE/onnx/model.onnx): the shared towers' item
    encoder, and the query encoder the fusion is fitted with."""
    from kuberank.onnx_encoder import OnnxEncoder

    onnx_dir = store_local / ONNX_DIR
    return OnnxEncoder(
        onnx_dir / ENCODER_FILE,
        tokenizer=onnx_dir / "tokenizer.json",
        max_length=max_length,
        intra_op_threads=None,
    )


def embed_items(
    model_dir: str | os.PathLike, store_local: Path, texts: list[str], max_length: int
) -> tuple[np.ndarray, str, object | None]:
    """Item vectors of ``texts``, a word on which encoder made them, and the store's ONNX
    encoder when it made them (None: the PyTorch item tower did)."""
    from kuberank.model import item_tower_path

    model_dir = Path(model_dir)
    tower = item_tower_path(model_dir)
    if tower != model_dir:
        from kuberank.encoder import TextEncoder

        encoder = TextEncoder(str(tower), max_length=max_length)
        return encoder.encode(texts, desc="embed items"), "item_tower (PyTorch fp32)", None
    encoder = store_encoder(store_local, max_length)
    vectors = encoder.encode(texts, desc="embed items")
    return vectors, f"{ENCODER} (ONNX Runtime fp32)", encoder


def build_index(
    model_dir: str | os.PathLike,
    dataset: str,
    store: str | os.PathLike,
    *,
    ann_threshold: int = DEFAULT_ANN_THRESHOLD,
    hnsw_m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
) -> dict:
    """Embed the dataset's items (documents or catalogue) with ``model_dir`` and write
    ``STORE/index``. The store must hold an export of the same model. Returns index.json."""
    from kuberank import datasets
    from kuberank.components.edge import index_store_bundle
    from kuberank.components.export import read_manifest
    from kuberank.encoder import check_model_dir, model_fingerprint
    from kuberank.serving.filters import attributes_of
    from kuberank.serving.reranking import POPULARITY_FILE, popularity_of
    from kuberank.storage import materialize, publish

    started = time.perf_counter()
    model_dir, store = check_model_dir(model_dir), str(store)
    manifest = read_manifest(store)
    fingerprint = model_fingerprint(model_dir)
    exported = (manifest.get("model") or {}).get("fingerprint")
    if exported != fingerprint:
        raise IndexMismatchError(
            f"--out {store}: holds an export of another model (fingerprint {exported}, "
            f"--model {model_dir} is {fingerprint}); run the export of this model into the "
            "store first"
        )
    data = datasets.load(dataset)
    ids, texts = [str(i) for i in data.item_ids], [str(t or "") for t in data.item_texts]
    if not ids:
        raise KuberankError(f"--dataset {dataset}: has no items to index")
    store_local = materialize(store)
    embeddings, item_encoder, onnx = embed_items(
        model_dir, store_local, texts, int(manifest["embedding"]["max_length"])
    )
    ann = None
    with tempfile.TemporaryDirectory(prefix="kuberank-index-") as tmp:
        work = Path(tmp) / INDEX_DIR
        work.mkdir()
        np.save(work / EMBEDDINGS_FILE, embeddings.astype(np.float32))
        (work / IDS_FILE).write_text(json.dumps(ids))
        attributes = attributes_of(data.items)
        (work / ATTRIBUTES_FILE).write_text(json.dumps(attributes))
        popularity = popularity_of(data)  # the long-tail boost's (serving/reranking.py)
        if popularity is not None:
            (work / POPULARITY_FILE).write_text(json.dumps(popularity))
        if len(ids) > ann_threshold:
            graph = build_hnsw(embeddings, hnsw_m, ef_construction)
            _faiss().write_index(graph, str(work / ANN_FILE))
            ann = {
                "type": "faiss-hnsw-ip",
                "file": ANN_FILE,
                "m": hnsw_m,
                "ef_construction": ef_construction,
                "ef_search": ef_search,
            }
        meta = {
            "format": INDEX_FORMAT,
            "count": len(ids),
            "dim": int(embeddings.shape[1]),
            "kind": data.kind,
            "dataset": {"name": data.name, "source": data.source},
            "model_fingerprint": fingerprint,
            "embedding_fingerprint": manifest["embedding"]["fingerprint"],
            "model_version": manifest.get("version"),
            "item_encoder": item_encoder,
            "attributes": attributes["fields"],
            "ann_threshold": ann_threshold,
            "ann": ann,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        meta["lexical"] = build_lexical(
            store,
            store_local,
            data,
            ids,
            texts,
            embeddings,
            int(manifest["embedding"]["max_length"]),
            onnx,
        )
        # The store's edge bundle gets the same items (components/edge.py): a store is complete
        # after export + index, and a device ranks what the server ranks.
        edge = index_store_bundle(store, embeddings, ids, manifest["embedding"]["fingerprint"])
        meta["edge_items"] = None if edge is None else edge["items"]
        (work / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish(work, _join(store, INDEX_DIR))
    return meta


def build_lexical(
    store: str, store_local: Path, data, ids, texts, embeddings, max_length: int, encoder=None
) -> dict:
    """STORE/lexical (:mod:`kuberank.lexical`) over the same items, and for a search collection
    with validation queries the hybrid fusion fitted on its tuning queries (train and
    validation; :func:`kuberank.fusion.fit_on_judged`) with the store's own query encoder and
    these item vectors: what serving computes. ``encoder``: the store's ONNX encoder when
    :func:`embed_items` opened it already."""
    from kuberank import datasets, fusion
    from kuberank.lexical import LexicalIndex
    from kuberank.storage import publish

    lexical = LexicalIndex.build(ids, texts)
    record = {"method": "rrf", "default": "dense", "note": "no validation queries to fit on"}
    if data.kind == datasets.SEARCH and "tuning" in data.splits():
        task = datasets.eval_task(data, "tuning")
        # the query encoder serving runs (fp32 here)
        if encoder is None:
            encoder = store_encoder(store_local, max_length)
        queries = encoder.encode(task.texts, desc="fit fusion")
        dense = np.asarray(queries, dtype=np.float32) @ embeddings.T
        record = fusion.fit_on_judged(
            dense, lexical.scores(task.texts), task.query_ids, task.exclude, task.qrels, ids
        )
    with tempfile.TemporaryDirectory(prefix="kuberank-lexical-") as tmp:
        meta = lexical.save(Path(tmp) / LEXICAL_DIR, {"fusion": record})
        publish(Path(tmp) / LEXICAL_DIR, _join(store, LEXICAL_DIR))
    return {"items": meta["count"], "default": record["default"], "weight": record.get("weight")}


def check_index(meta: dict, manifest: dict, where: str = INDEX_DIR) -> None:
    """Refuse an index whose fingerprints differ from the exported encoder's."""
    if meta.get("format") != INDEX_FORMAT:
        raise IndexMismatchError(f"{where}: not a kuberank index (format {meta.get('format')!r})")
    pairs = (
        ("model_fingerprint", (manifest.get("model") or {}).get("fingerprint")),
        ("embedding_fingerprint", (manifest.get("embedding") or {}).get("fingerprint")),
    )
    for key, expected in pairs:
        if meta.get(key) != expected:
            raise IndexMismatchError(
                f"{where}: embedded by another encoder ({key} {meta.get(key)} != the store's "
                f"{expected}); rebuild it with `kuberank index --model <the exported model> ...`"
            )


@dataclass
class ItemIndex:
    """Item vectors with exact (matrix product) or ANN (faiss HNSW) top-n search."""

    meta: dict
    ids: list[str]
    embeddings: np.ndarray  # [N, D] float32
    ann: object | None = None
    attributes: dict | None = None  # ATTRIBUTES_FILE: {"fields", "values"}; None: none kept
    policy: object | None = None  # the store's serving policy (serving/policies.py), if any
    # POPULARITY_FILE: {"users", "counts"} of an interaction log's training rows; None: none
    popularity: dict | None = None

    def __post_init__(self):
        self.row = {item: i for i, item in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def rows_of(self, ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """(rows of the known ids, the unknown ids)."""
        rows = [self.row.get(i, -1) for i in ids]
        return (
            np.array([r for r in rows if r >= 0], dtype=np.int64),
            [i for i, r in zip(ids, rows, strict=True) if r < 0],
        )

    def search(
        self, queries: np.ndarray, n: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query, up to ``n`` rows by descending inner product (ties: lower row first)
        and their scores, without the rows in ``exclude[i]``."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        exclude = exclude or [np.zeros(0, dtype=np.int64)] * len(queries)
        width = min(len(self), n + max((len(e) for e in exclude), default=0))
        if width <= 0:
            empty = np.zeros(0, dtype=np.int64)
            return [empty] * len(queries), [empty.astype(np.float32)] * len(queries)
        if self.ann is not None:
            scores, rows = self.ann.search(queries, width)
        else:
            full = queries @ self.embeddings.T
            rows = np.argpartition(-full, width - 1, axis=1)[:, :width]
            scores = np.take_along_axis(full, rows, axis=1)
        out_rows, out_scores = [], []
        for i in range(len(queries)):
            r, s = rows[i], scores[i]
            keep = r >= 0
            if len(exclude[i]):
                keep &= ~np.isin(r, exclude[i])
            r, s = r[keep], s[keep]
            order = np.lexsort((r, -s))[:n]
            out_rows.append(r[order].astype(np.int64))
            out_scores.append(s[order].astype(np.float32))
        return out_rows, out_scores


def load_index(store: str | os.PathLike) -> ItemIndex:
    """Read STORE/index (local path or s3:// through materialize)."""
    from kuberank.storage import materialize

    root = Path(materialize(_join(str(store), INDEX_DIR)))
    meta_file = root / META_FILE
    if not meta_file.is_file():
        raise KuberankError(f"{root}: no {META_FILE}; build it with `kuberank index`")
    meta = json.loads(meta_file.read_text())
    embeddings = np.load(root / EMBEDDINGS_FILE).astype(np.float32, copy=False)
    ids = json.loads((root / IDS_FILE).read_text())
    if embeddings.shape != (meta.get("count"), meta.get("dim")) or len(ids) != len(embeddings):
        raise KuberankError(
            f"{root}: inconsistent index ({embeddings.shape} embeddings, {len(ids)} ids, "
            f"index.json says {meta.get('count')}x{meta.get('dim')})"
        )
    ann = None
    if meta.get("ann"):
        ann = _faiss().read_index(str(root / meta["ann"]["file"]))
        ann.hnsw.efSearch = int(meta["ann"].get("ef_search", HNSW_EF_SEARCH))
    attributes_file = root / ATTRIBUTES_FILE  # indexes built before filters have none
    attributes = json.loads(attributes_file.read_text()) if attributes_file.is_file() else None
    from kuberank.serving.reranking import read_popularity

    return ItemIndex(
        meta=meta,
        ids=ids,
        embeddings=embeddings,
        ann=ann,
        attributes=attributes,
        popularity=read_popularity(root, len(ids)),
    )


@step_component()
def index_op(
    model: dsl.Input[dsl.Model],
    dataset: dsl.Input[dsl.Dataset],
    store: str,
    export_fingerprint: str,
    index: dsl.Output[dsl.Artifact],
    ann_threshold: int = 50_000,  # DEFAULT_ANN_THRESHOLD (kfp runs this function's source alone)
) -> str:
    """kfp wrapper around :func:`build_index`: embed the prepared dataset's items with the
    exported model into STORE/index. ``export_fingerprint`` (the export step's output) orders the
    step after the export and must match the store. The output artifact holds index.json."""
    import json
    from pathlib import Path

    from kuberank.serving.index import IndexMismatchError, build_index

    meta = build_index(model.path, f"prepared:{dataset.path}", store, ann_threshold=ann_threshold)
    if meta["embedding_fingerprint"] != export_fingerprint:
        raise IndexMismatchError(
            f"{store}: the store's embedding fingerprint {meta['embedding_fingerprint']} is not the "
            f"export's {export_fingerprint}: another export wrote the store meanwhile"
        )
    Path(index.path).write_text(json.dumps(meta, indent=2) + "\n")
    index.metadata.update({k: meta[k] for k in ("count", "dim", "kind", "embedding_fingerprint")})
    index.metadata["store"] = store
    return meta["embedding_fingerprint"]
