"""The index step: embed every item of a dataset with the exported model into STORE/index.

Pure core: :func:`build_index` (model directory + dataset + exported store -> STORE/index,
STORE/lexical and the edge bundle's items). Thin wrappers: ``kuberank index`` (kuberank/cli) and
the kfp component :func:`index_op`. What it writes is read by :mod:`kuberank.item_index` (the
layout, :func:`~kuberank.item_index.load_index`, :func:`~kuberank.item_index.check_index`)::

    STORE/index/                 the dense index (kuberank/item_index.py): vectors, ids, the items'
                                 attributes (:func:`attributes_of`), an interaction log's
                                 popularity (:func:`popularity_of`), an HNSW graph beyond
                                 ann_threshold items
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
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from kfp import dsl

from kuberank import datasets, fusion
from kuberank.beyond_accuracy import train_popularity
from kuberank.components.edge import index_store_bundle
from kuberank.encoder import TextEncoder, check_model_dir, model_fingerprint
from kuberank.errors import KuberankError
from kuberank.item_index import (
    ANN_FILE,
    ATTRIBUTES_FILE,
    BOOLEAN,
    DEFAULT_ANN_THRESHOLD,
    EMBEDDINGS_FILE,
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    IDS_FILE,
    INDEX_FORMAT,
    META_FILE,
    NUMBER,
    POPULARITY_FILE,
    STRING,
    STRINGS,
    IndexMismatchError,
    load_faiss,
)
from kuberank.kfp_component import step_component
from kuberank.lexical import LexicalIndex
from kuberank.onnx_encoder import OnnxEncoder
from kuberank.progress import bar
from kuberank.storage import materialize, publish
from kuberank.store import (
    ENCODER,
    ENCODER_FILE,
    INDEX_DIR,
    LEXICAL_DIR,
    ONNX_DIR,
    read_manifest,
    store_path,
)

# --- what the index keeps of the items ----------------------------------------------------


def _kind(values: list) -> str | None:
    """The attribute type of a column's non-missing values, or None (not filterable)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, bool) for v in present):
        return BOOLEAN
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return NUMBER
    if all(isinstance(v, str) for v in present):
        return STRING
    if all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in present):
        return STRINGS
    return None


def _plain(value: Any) -> Any:
    """A table cell as JSON: numpy scalars and arrays to Python, NaN and None to None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def attributes_of(items) -> dict:
    """``{"fields": {name: type}, "values": {name: [value per item]}}`` of an items table's
    attribute columns (every column besides item_id, text and title whose values have one
    type)."""
    fields, values = {}, {}
    for name in items.columns:
        if name in ("item_id", "text", "title"):
            continue
        column = [_plain(v) for v in items[name].tolist()]
        kind = _kind(column)
        if kind is not None:
            fields[str(name)], values[str(name)] = kind, column
    return {"fields": fields, "values": values}


def popularity_of(data) -> dict | None:
    """``{"users", "counts"}`` (training interactions per item, in the dataset's item order)
    of an interaction log, for the index; None for a search collection."""
    if data.kind != datasets.RECOMMENDATION:
        return None
    counts, users = train_popularity(data)
    return {"users": int(users), "counts": [int(c) for c in counts]}


# --- the step -------------------------------------------------------------------------------


def build_hnsw(
    embeddings: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION
):
    """A faiss HNSW graph over normalised vectors with inner-product similarity."""
    faiss = load_faiss()
    index = faiss.IndexHNSWFlat(embeddings.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    step = 4096
    for start in bar(range(0, len(embeddings), step), desc="ann index", unit="chunk"):
        index.add(np.ascontiguousarray(embeddings[start : start + step], dtype=np.float32))
    return index


def store_encoder(store_local: Path, max_length: int):
    """The store's exported fp32 ONNX encoder (STORE/onnx/model.onnx): the shared towers' item
    encoder, and the query encoder the fusion is fitted with."""
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
    from kuberank.model import item_tower_path  # local: kuberank.model imports torch

    model_dir = Path(model_dir)
    tower = item_tower_path(model_dir)
    if tower != model_dir:
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
            load_faiss().write_index(graph, str(work / ANN_FILE))
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
        publish(work, store_path(store, INDEX_DIR))
    return meta


def build_lexical(
    store: str, store_local: Path, data, ids, texts, embeddings, max_length: int, encoder=None
) -> dict:
    """STORE/lexical (:mod:`kuberank.lexical`) over the same items, and for a search collection
    with validation queries the hybrid fusion fitted on its tuning queries (train and
    validation; :func:`kuberank.fusion.fit_on_judged`) with the store's own query encoder and
    these item vectors: what serving computes. ``encoder``: the store's ONNX encoder when
    :func:`embed_items` opened it already."""
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
        publish(Path(tmp) / LEXICAL_DIR, store_path(store, LEXICAL_DIR))
    return {"items": meta["count"], "default": record["default"], "weight": record.get("weight")}


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

    from kuberank.components.index import build_index
    from kuberank.item_index import IndexMismatchError

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
