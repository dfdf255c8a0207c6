"""Reading a model store for serving: :class:`OpenedStore` is kuberank.store's
:class:`~kuberank.store.ModelStore` (manifest, version, parts, the index checked against the
store's encoder) plus what the stages share, each read once per load: the index (or, for the
split path's Ingress, its items without the vectors) with the store's policy, F's tables
(STORE/model/kuberank.json) and the lexical stage."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kuberank.serving import hybrid
from kuberank.serving.policies import check_policy, load_policy
from kuberank.storage import materialize_if_present
from kuberank.store import MODEL_DIR, ModelStore


@dataclass
class ModelTables:
    """What the Ingress and the Ranker need from STORE/model/kuberank.json."""

    kind: str
    user_row: dict[str, int]
    info: Any | None  # kuberank.model.ModelInfo, None for a plain encoder (F = Q·I)


def read_model_tables(store: ModelStore, index_kind: str) -> tuple[ModelTables, Path | None]:
    """F's tables and STORE/model, or (a plain encoder's tables of ``index_kind``, None) when
    the store has no kuberank model."""
    # local: kuberank.model imports torch
    from kuberank.model import MANIFEST, MODEL_FORMAT, read_info

    # only an absent STORE/model means a plain encoder: a store that cannot be read (access
    # denied, unreachable) is refused, not served without its model
    model_dir = materialize_if_present(store.uri_of(MODEL_DIR))
    if model_dir is None:
        return ModelTables(index_kind, {}, None), None
    manifest = model_dir / MANIFEST
    if not manifest.is_file() or json.loads(manifest.read_text()).get("format") != MODEL_FORMAT:
        return ModelTables(index_kind, {}, None), None
    info = read_info(model_dir)
    return ModelTables(info.kind, {u: i for i, u in enumerate(info.user_ids)}, info), model_dir


class OpenedStore(ModelStore):
    """A store opened for one replica's load: each part read once, on first use, and shared
    by the stages that load from it."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self._parts: dict = {}

    def _once(self, name: str, read):
        if name not in self._parts:
            self._parts[name] = read()
        return self._parts[name]

    def _with_policy(self, items):
        items.policy = load_policy(self.uri, items)  # a policy it cannot serve refuses it
        return items

    def index(self):
        """The checked index, with the store's policy."""
        return self._once("checked index", lambda: self._with_policy(self.checked_index()))

    def catalogue(self):
        """The checked index's items without their vectors or ANN graph (item_index's
        ItemCatalogue: ids, attributes, popularity), with the store's policy: what the split
        path's Ingress checks requests against. The index itself where :meth:`index` read it."""
        if "checked index" in self._parts:
            return self._parts["checked index"]
        return self._once("checked catalogue", lambda: self._with_policy(self.checked_catalogue()))

    def tables(self) -> tuple[ModelTables, Path | None]:
        """F's tables (read_model_tables), of the kind the index's metadata names: the
        loaded index's or catalogue's, else index.json alone (whatever was loaded first)."""

        def read():
            loaded = self._parts.get("checked index") or self._parts.get("checked catalogue")
            meta = loaded.meta if loaded is not None else self.index_summary().meta
            return read_model_tables(self, meta.get("kind", "search"))

        return self._once("tables", read)

    def lexical(self):
        """serving/hybrid.py's lexical stage (STORE/lexical), None without one."""
        return self._once("lexical stage", lambda: hybrid.load_stage(self.uri, self.index().ids))

    def lexical_info(self):
        """What STORE/lexical says of itself (hybrid.LexicalInfo: the default retrieval),
        without loading BM25; None without one."""
        return self._once("lexical info", lambda: hybrid.load_info(self.uri))


def check_store(store: str):
    """What a replica's load refuses (:meth:`OpenedStore.index`: an index made by another
    encoder, a policy that cannot be served), from the store's manifest and its index's
    metadata, without reading the vectors: the deploy's check before any replica loads the
    index. Returns the index's summary (kuberank/item_index.py's IndexSummary)."""
    summary = ModelStore(store).index_summary()
    check_policy(store, summary.attributes["fields"])
    return summary


def load_checked_index(store: str):
    """The store's manifest and index (with the store's policy), refusing an index made by
    another encoder or a policy that cannot be served."""
    opened = OpenedStore(store)
    index = opened.index()
    return opened.manifest, index
