"""The model store's layout: what ``kuberank export`` writes and serving reads.

The names live here, with :func:`store_path` (a part of a local or ``s3://`` store) and
:func:`read_manifest` (issue 14 moves the reading of every part here too); every other module
imports them instead of spelling them (tests/test_store.py checks)::

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


def is_store(path: str | os.PathLike) -> bool:
    """A model store written by ``kuberank export`` (its manifest names the store format)."""
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and str(
        json.loads(manifest.read_text()).get("format", "")
    ).startswith(STORE_FORMAT_PREFIX)
