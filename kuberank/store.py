"""The model store's layout: what ``kuberank export`` writes and serving reads.

The names live here, with :class:`ModelStore` (a store opened once: manifest, version,
fingerprints, parts, the checked index or its summary), :func:`store_path` and
:func:`read_manifest`; every other module imports them instead of spelling them
(tests/test_store.py checks)::

    STORE/manifest.json   MANIFEST: format kuberank-store/N, version, model and embedding fingerprints
    STORE/onnx/           ONNX_DIR: the exported encoder (ENCODER_FILE fp32, INT8_FILE int8) and
                          its tokenizer; ``kuberank compress`` writes the same onnx/ in its model
    STORE/triton/         TRITON_DIR: the Triton model repository served in production
    STORE/triton-local/   TRITON_LOCAL_DIR: its CPU twin (``kuberank serve`` on a laptop)
    STORE/edge/           EDGE_DIR: the edge bundle (components/edge.py)
    STORE/model/          MODEL_DIR: F's weights and item/user tables (kuberank models)
    STORE/index/          INDEX_DIR: the dense item index (kuberank/index.py, components/index.py)
    STORE/lexical/        LEXICAL_DIR: BM25 over the same items and the fitted fusion (lexical.py)
    STORE/policy.json     POLICY: the serving policy, versioned (serving/policies.py)
    STORE/release.json    RELEASE_FILE: the pipeline's release record (pipelines/pipeline.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kuberank.errors import KuberankError
from kuberank.storage import is_s3, materialize

MANIFEST = "manifest.json"
POLICY = "policy.json"
RELEASE_FILE = "release.json"
ONNX_DIR = "onnx"
TRITON_DIR = "triton"
TRITON_LOCAL_DIR = "triton-local"
EDGE_DIR = "edge"
MODEL_DIR = "model"
INDEX_DIR = "index"
LEXICAL_DIR = "lexical"
# What ``kuberank export`` writes, in the manifest's ``parts`` order (index and lexical come later,
# from ``kuberank index``).
EXPORT_PARTS = (ONNX_DIR, TRITON_DIR, TRITON_LOCAL_DIR, EDGE_DIR, MODEL_DIR)
TRITON_PARTS = (TRITON_DIR, TRITON_LOCAL_DIR)
# Every name of the layout (tests/test_store.py refuses them as literals elsewhere).
LAYOUT_NAMES = (MANIFEST, POLICY, RELEASE_FILE, *EXPORT_PARTS, INDEX_DIR, LEXICAL_DIR)

ENCODER_FILE = "model.onnx"  # in ONNX_DIR: the fp32 encoder
INT8_FILE = "model.int8.onnx"  # in ONNX_DIR: the int8 encoder
PORTABLE_FILE = "model.portable.onnx"  # in ONNX_DIR: before fusions (TensorRT builds from it)
ENCODER = f"{ONNX_DIR}/{ENCODER_FILE}"
INT8_ENCODER = Path(ONNX_DIR) / INT8_FILE
STORE_FORMAT = "kuberank-store/1"
STORE_FORMAT_PREFIX = "kuberank-store/"


def store_path(store: str | os.PathLike, *parts: str) -> str:
    """A part of the store: ``STORE/part/...`` for a local store, the same key under an
    ``s3://`` prefix."""
    store = str(store)
    if is_s3(store):
        return "/".join([store.rstrip("/"), *parts])
    return str(Path(store).joinpath(*parts))


def read_manifest(store: str | os.PathLike) -> dict:
    """The store's manifest.json (a KuberankError if the store has none)."""
    path = materialize(store_path(store, MANIFEST))
    try:
        return json.loads(Path(path).read_text())
    except ValueError as exc:
        raise KuberankError(f"{store_path(store, MANIFEST)}: not valid JSON: {exc}") from exc


class ModelStore:
    """A model store opened once from a local path or an ``s3://`` URI: its manifest (read on
    first use, then kept), version and fingerprints, where each part lives, and its index
    checked against its encoder. What reads a store goes through this; what writes one
    (export, index, policies) publishes to :meth:`uri_of` its parts."""

    def __init__(self, uri: str | os.PathLike):
        self.uri = str(uri)
        self._manifest: dict | None = None

    def __repr__(self) -> str:
        return f"ModelStore({self.uri!r})"

    @property
    def manifest(self) -> dict:
        """STORE/manifest.json (a KuberankError if the store has none)."""
        if self._manifest is None:
            self._manifest = read_manifest(self.uri)
        return self._manifest

    @property
    def version(self) -> str:
        """The version the manifest records ("0" when none)."""
        return str(self.manifest.get("version", "0"))

    @property
    def embedding_fingerprint(self) -> str | None:
        return (self.manifest.get("embedding") or {}).get("fingerprint")

    @property
    def model_fingerprint(self) -> str | None:
        return (self.manifest.get("model") or {}).get("fingerprint")

    def uri_of(self, *parts: str) -> str:
        """Where a part lives (``STORE/part/...``, or its key under the s3:// prefix)."""
        return store_path(self.uri, *parts)

    def local(self, *parts: str) -> Path:
        """A part as a local path, downloaded first when the store is on S3."""
        return Path(materialize(self.uri_of(*parts)))

    def _checked(self, read: str):
        """``kuberank.item_index.<read>(STORE)``, refused (IndexMismatchError) when another
        encoder than the store's embedded its vectors."""
        # item_index imports this module's names: imported here to keep the import one-way
        import kuberank.item_index as item_index

        part = getattr(item_index, read)(self.uri)
        item_index.check_index(part.meta, self.manifest, where=self.uri_of(INDEX_DIR))
        return part

    def checked_index(self):
        """STORE/index (kuberank/item_index.py's ItemIndex), checked."""
        return self._checked("load_index")

    def checked_catalogue(self):
        """STORE/index's items without their vectors (kuberank/item_index.py's
        ItemCatalogue), checked like :meth:`checked_index`."""
        return self._checked("read_catalogue")

    def index_summary(self):
        """STORE/index read without its vectors (kuberank/item_index.py's IndexSummary),
        checked like :meth:`checked_index`: what the deploy checks before replicas load it."""
        return self._checked("read_summary")


def is_store(path: str | os.PathLike) -> bool:
    """A model store written by ``kuberank export`` (its manifest names the store format)."""
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and str(
        json.loads(manifest.read_text()).get("format", "")
    ).startswith(STORE_FORMAT_PREFIX)
