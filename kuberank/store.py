"""The model store's layout: what ``kuberank export`` writes and serving reads.

Only the names live here so far (issue 14 moves the reading of every part here too)::

    STORE/manifest.json   format kuberank-store/N, version, model and embedding fingerprints
    STORE/onnx/           the exported encoder (fp32, int8) and its tokenizer
    STORE/model/          F's weights and item/user tables (kuberank models)
    STORE/index/          the dense item index (serving/index.py)
    STORE/lexical/        BM25 over the same items and the fitted fusion (kuberank/lexical.py)
    STORE/policy.json     the serving policy, versioned (serving/policies.py, `kuberank policy`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
POLICY = "policy.json"
STORE_FORMAT = "kuberank-store/1"
STORE_FORMAT_PREFIX = "kuberank-store/"


def is_store(path: str | os.PathLike) -> bool:
    """A model store written by ``kuberank export`` (its manifest names the store format)."""
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and str(
        json.loads(manifest.read_text()).get("format", "")
    ).startswith(STORE_FORMAT_PREFIX)
