"""The lexical index: BM25 (bm25s, Lucene variant, k1=0.9, b=0.4, English stopwords) over
item texts (title + text for search collections). One definition used by the ``bm25``
baseline of ``kuberank evaluate``, by ``kuberank index`` (STORE/lexical, beside the dense
index) and by hybrid retrieval (:mod:`kuberank.fusion`).

Layout::

    STORE/lexical/lexical.json   format, count, params, the fusion fitted on validation
    STORE/lexical/*.index.*      bm25s's own files (scores as a CSC matrix, vocabulary)
    STORE/lexical/ids.json       item ids, the column order of the scores
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kuberank.errors import KuberankError

LEXICAL_FORMAT = "kuberank-lexical/1"
META_FILE = "lexical.json"
IDS_FILE = "ids.json"
BM25_PARAMS = {"k1": 0.9, "b": 0.4}
STOPWORDS = "en"


def read_meta(meta_file: str | os.PathLike) -> dict:
    """A lexical index's lexical.json alone (STORE/lexical/lexical.json), its format checked:
    its size, BM25 parameters and the fusion ``kuberank index`` recorded
    (``["fusion"]["default"]``: the store's default retrieval), without loading BM25."""
    meta_file = Path(meta_file)
    directory = meta_file.parent
    if not meta_file.is_file():
        raise KuberankError(
            f"{directory}: no lexical index; build it with `kuberank index --model DIR "
            "--dataset SPEC --out STORE`"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != LEXICAL_FORMAT:
        raise KuberankError(f"{directory}: not a kuberank lexical index ({meta.get('format')})")
    return meta


class LexicalIndex:
    """BM25 scores of every item for query texts."""

    def __init__(self, model, ids: list[str], meta: dict | None = None):
        self.model, self.ids = model, list(ids)
        self.vocab = set(model.vocab_dict)
        self.meta = meta or {}

    @classmethod
    def build(cls, ids: list[str], texts: list[str]) -> LexicalIndex:
        import bm25s  # local: heavy (~0.17 s), only the lexical path needs it

        if len(ids) != len(texts):
            raise KuberankError(f"lexical index: {len(ids)} ids for {len(texts)} texts")
        model = bm25s.BM25(**BM25_PARAMS)
        tokens = bm25s.tokenize([t or "" for t in texts], stopwords=STOPWORDS, show_progress=False)
        model.index(tokens, show_progress=False)
        return cls(model, ids)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, queries: list[str | None]) -> np.ndarray:
        """[queries, items] BM25 scores; a query with no indexed term scores 0 everywhere."""
        import bm25s

        tokens = bm25s.tokenize(
            [q or "" for q in queries], stopwords=STOPWORDS, return_ids=False, show_progress=False
        )
        out = np.zeros((len(queries), len(self.ids)), dtype=np.float32)
        for i, query in enumerate(tokens):
            known = [t for t in query if t in self.vocab]
            if known:
                out[i] = self.model.get_scores(known)
        return out

    def save(self, directory: str | os.PathLike, meta: dict) -> dict:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save(str(directory), show_progress=False)
        (directory / IDS_FILE).write_text(json.dumps(self.ids))
        meta = {"format": LEXICAL_FORMAT, "count": len(self.ids), "params": BM25_PARAMS, **meta}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self.meta = meta
        return meta

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LexicalIndex:
        import bm25s

        directory = Path(directory)
        meta = read_meta(directory / META_FILE)
        ids = json.loads((directory / IDS_FILE).read_text())
        model = bm25s.BM25.load(str(directory), show_progress=False, verbosity=0)
        if len(ids) != meta["count"]:
            raise KuberankError(f"{directory}: {len(ids)} ids, lexical.json says {meta['count']}")
        return cls(model, ids, meta)
