"""The item index as serving reads it: its format, :func:`load_index` / :class:`ItemIndex`
(exact or ANN top-n search) and :func:`check_index` (refuses an index embedded by another
model). The step that builds it is components/index.py (``kuberank index``, ``index_op``).

Layout::

    STORE/index/index.json       format, count, dim, kind, dataset, fingerprints, ann settings
    STORE/index/embeddings.npy   float32 [count, dim], L2-normalised item vectors
    STORE/index/ids.json         item ids, row order of embeddings.npy
    STORE/index/attributes.json  the items' attributes that filters use (serving/filters.py), of
                                 the types STRING, STRINGS, NUMBER, BOOLEAN
    STORE/index/popularity.json  an interaction log's training popularity (the long-tail boost,
                                 serving/reranking.py)
    STORE/index/ann.faiss        HNSW graph (faiss, inner product) when count > ann_threshold

The index records the ``model_fingerprint`` and ``embedding_fingerprint`` of the export that
embedded it; serving compares both with the manifest it serves and refuses a mismatch.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kuberank.errors import KuberankError
from kuberank.storage import materialize, materialize_if_present
from kuberank.store import INDEX_DIR, store_path

INDEX_FORMAT = "kuberank-index/1"
META_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
ANN_FILE = "ann.faiss"
ATTRIBUTES_FILE = "attributes.json"
POPULARITY_FILE = "popularity.json"
# The attribute types an index keeps (components/index.py writes them, serving/filters.py reads)
STRING, STRINGS, NUMBER, BOOLEAN = "string", "strings", "number", "boolean"
# Exact search over 50k x 384 float32 items is ~20 MFLOP per query (~2-4 ms on one core); beyond
# that an HNSW graph answers in well under a millisecond.
DEFAULT_ANN_THRESHOLD = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128


class IndexMismatchError(KuberankError):
    """The index was embedded by a different model than the encoder being served."""


def load_faiss():
    """The faiss module (optional: only the ANN path needs it, so it is imported here)."""
    try:
        import faiss  # local: heavy optional, only the ANN path needs it
    except ImportError as exc:  # the ANN path needs the pinned faiss-cpu wheel
        raise KuberankError(
            "the ANN index needs faiss (pip install faiss-cpu==1.15.1); "
            "or raise --ann-threshold to keep exact search"
        ) from exc
    return faiss


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
class ItemCatalogue:
    """The items of an index without their vectors or ANN graph: their ids (the row order),
    attributes and popularity, with the store's policy. What a request is checked against
    (known history ids, filters, re-rankings, the policy) where nothing is searched: the split
    path's Ingress (serving/pipeline.py ``load_pipeline`` without an encoding)."""

    meta: dict
    ids: list[str]
    attributes: dict | None = None  # ATTRIBUTES_FILE: {"fields", "values"}; None: none kept
    policy: object | None = None  # the store's serving policy (serving/policies.py), if any
    # POPULARITY_FILE: {"users", "counts"} of an interaction log's training rows; None: none
    popularity: dict | None = None

    def __post_init__(self):
        self.row = {item: i for i, item in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """(rows of the known ids, the unknown ids)."""
        rows = [self.row.get(i, -1) for i in ids]
        return (
            np.array([r for r in rows if r >= 0], dtype=np.int64),
            [i for i, r in zip(ids, rows, strict=True) if r < 0],
        )


@dataclass(kw_only=True)
class ItemIndex(ItemCatalogue):
    """Item vectors with exact (matrix product) or ANN (faiss HNSW) top-n search."""

    embeddings: np.ndarray  # [N, D] float32
    ann: object | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

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


def read_popularity(path: Path | None, count: int) -> dict | None:
    """STORE/index/popularity.json (at ``path``), checked against the item count (None: the
    index has none)."""
    if path is None or not path.is_file():
        return None
    popularity = json.loads(path.read_text())
    if len(popularity.get("counts", ())) != count:
        raise KuberankError(f"{path}: {len(popularity.get('counts', ()))} counts for {count} items")
    return popularity


def _read_meta(meta_file: Path | None, where) -> dict:
    if meta_file is None or not meta_file.is_file():
        raise KuberankError(f"{where}: no {META_FILE}; build it with `kuberank index`")
    return json.loads(meta_file.read_text())


def _index_file(store: str | os.PathLike, name: str) -> Path | None:
    """One file of STORE/index as a local path (from S3, that file alone); None when absent."""
    return materialize_if_present(store_path(store, INDEX_DIR, name))


@dataclass
class IndexSummary:
    """What an index holds, read without its vectors, ids or ANN graph: its index.json, the
    attribute fields it keeps and its popularity. Enough for the checks that refuse a store
    before any replica loads it (kuberank/store.py ``ModelStore.index_summary``); it answers
    ``attributes["fields"]`` and ``popularity`` like an :class:`ItemIndex`; the items
    themselves without vectors are an :class:`ItemCatalogue`."""

    meta: dict
    attributes: dict  # {"fields": index.json's attribute fields}
    popularity: dict | None


def read_summary(store: str | os.PathLike) -> IndexSummary:
    """STORE/index's :class:`IndexSummary` (index.json and popularity.json only)."""
    meta = _read_meta(_index_file(store, META_FILE), store_path(store, INDEX_DIR))
    popularity = read_popularity(_index_file(store, POPULARITY_FILE), meta.get("count"))
    return IndexSummary(meta, {"fields": dict(meta.get("attributes") or {})}, popularity)


def _read_items(meta: dict, file_of, where) -> dict:
    """The fields of an :class:`ItemCatalogue` from STORE/index's files (``file_of(name)``: a
    local path, or None when absent): ids.json, attributes.json, popularity.json."""
    ids_file = file_of(IDS_FILE)
    if ids_file is None:
        raise KuberankError(f"{where}: no {IDS_FILE}; rebuild the index with `kuberank index`")
    ids = json.loads(ids_file.read_text())
    if len(ids) != meta.get("count"):
        raise KuberankError(
            f"{where}: inconsistent index ({len(ids)} ids, index.json says {meta.get('count')})"
        )
    attributes_file = file_of(ATTRIBUTES_FILE)  # indexes built before filters have none
    attributes = None
    if attributes_file is not None and attributes_file.is_file():
        attributes = json.loads(attributes_file.read_text())
    popularity = read_popularity(file_of(POPULARITY_FILE), len(ids))
    return {"meta": meta, "ids": ids, "attributes": attributes, "popularity": popularity}


def read_catalogue(store: str | os.PathLike) -> ItemCatalogue:
    """STORE/index's :class:`ItemCatalogue`: index.json, ids.json, attributes.json and
    popularity.json (from S3, those files alone), never the vectors or the ANN graph."""
    where = store_path(store, INDEX_DIR)
    meta = _read_meta(_index_file(store, META_FILE), where)
    return ItemCatalogue(**_read_items(meta, lambda name: _index_file(store, name), where))


def load_index(store: str | os.PathLike) -> ItemIndex:
    """Read STORE/index (local path or s3:// through materialize)."""
    root = Path(materialize(store_path(store, INDEX_DIR)))
    meta = _read_meta(root / META_FILE, root)
    embeddings = np.load(root / EMBEDDINGS_FILE).astype(np.float32, copy=False)
    if embeddings.shape != (meta.get("count"), meta.get("dim")):
        raise KuberankError(
            f"{root}: inconsistent index ({embeddings.shape} embeddings, "
            f"index.json says {meta.get('count')}x{meta.get('dim')})"
        )
    items = _read_items(meta, lambda name: root / name, root)
    ann = None
    if meta.get("ann"):
        ann = load_faiss().read_index(str(root / meta["ann"]["file"]))
        ann.hnsw.efSearch = int(meta["ann"].get("ef_search", HNSW_EF_SEARCH))
    return ItemIndex(**items, embeddings=embeddings, ann=ann)
