"""Reading a model store for serving: its manifest and version, a part materialised locally
(s3:// or a path), F's tables (STORE/model/kuberank.json) and the index, checked against the
store's encoder and served with the store's policy."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuberank.errors import KuberankError
from kuberank.serving import hybrid
from kuberank.serving.policies import load_policy
from kuberank.store import INDEX_DIR, MODEL_DIR


def store_part(store: str, part: str) -> Path:
    """``part`` of the store (a kuberank.store name) as a local path, downloaded when the
    store is an s3:// URI."""
    from kuberank.storage import is_s3, materialize

    return materialize(
        "/".join([store.rstrip("/"), part]) if is_s3(store) else str(Path(store) / part)
    )


def read_store_manifest(store: str) -> dict:
    """The store's manifest (components/export.py reads it)."""
    from kuberank.components.export import read_manifest

    return read_manifest(store)


def model_version(manifest: dict) -> str:
    """The version a store's manifest records ("0" when none)."""
    return str(manifest.get("version", "0"))


@dataclass
class ModelTables:
    """What the Ingress and the Ranker need from STORE/model/kuberank.json."""

    kind: str
    user_row: dict[str, int]
    info: Any | None  # kuberank.model.ModelInfo, None for a plain encoder (F = Q·I)


def read_model_tables(store: str, index_kind: str) -> tuple[ModelTables, Path | None]:
    """F's tables and STORE/model, or (a plain encoder's tables of ``index_kind``, None) when
    the store has no kuberank model."""
    from kuberank.model import MANIFEST, MODEL_FORMAT, read_info

    try:
        model_dir = store_part(store, MODEL_DIR)
    except KuberankError:
        return ModelTables(index_kind, {}, None), None
    manifest = model_dir / MANIFEST
    if not manifest.is_file() or json.loads(manifest.read_text()).get("format") != MODEL_FORMAT:
        return ModelTables(index_kind, {}, None), None
    info = read_info(model_dir)
    return ModelTables(info.kind, {u: i for i, u in enumerate(info.user_ids)}, info), model_dir


def load_checked_index(store: str):
    """The store's manifest and index (with the store's policy), refusing an index made by
    another encoder or a policy that cannot be served."""
    from kuberank.serving.index import check_index, load_index

    manifest = read_store_manifest(store)
    index = load_index(store)
    check_index(index.meta, manifest, where=f"{store}/{INDEX_DIR}")
    index.policy = load_policy(store, index)
    return manifest, index


class OpenedStore:
    """A store opened for one replica's load: each part (manifest, checked index, F's tables,
    the lexical stage) read once, on first use, and shared by the stages that load from it."""

    def __init__(self, uri: str):
        self.uri, self._parts = uri, {}

    def _once(self, read, *args):
        """``read(uri, *args)``, the first time it is asked for."""
        if read not in self._parts:
            self._parts[read] = read(self.uri, *args)
        return self._parts[read]

    def manifest(self) -> dict:
        if load_checked_index in self._parts:  # the manifest the index was checked against
            return self._parts[load_checked_index][0]
        return self._once(read_store_manifest)

    def index(self):
        return self._once(load_checked_index)[1]

    def tables(self) -> tuple[ModelTables, Path | None]:
        return self._once(read_model_tables, self.index().meta.get("kind", "search"))

    def lexical(self):
        """serving/hybrid.py's lexical stage (STORE/lexical), None without one."""
        return self._once(hybrid.load_stage, self.index().ids)
