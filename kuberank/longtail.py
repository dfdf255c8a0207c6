"""The long tail of a catalogue: popularity terciles, novelty, and the long-tail boost.

An item's popularity is its number of training interactions. Sorted by it (most popular first,
ties by index), the catalogue is cut into three parts of (nearly) equal size, its popularity
terciles: ``head``, ``mid`` and ``tail`` (:func:`popularity_terciles`; the exposure metrics of
kuberank/beyond_accuracy.py count the slots each one gets). The long tail is the ``tail``
tercile (:func:`long_tail`).

The long-tail boost is a popularity-bias correction. It re-ranks a list's candidates by

    (1 - beta) * relevance + beta * [the item is in the long tail]

with relevance min-max scaled over the candidates. beta = 0 keeps the model's order. beta = 1
puts every long-tail candidate first, each part in the model's order. In between, a tail item
moves above the items whose scaled relevance is less than beta / (1 - beta) above its own. It
only re-orders the candidates the model retrieved, so a rare item that the model did not find
relevant is never pulled in.

The boost is binary, not graded by rarity. The earlier boost mixed relevance with novelty
(self-information). Within the same nDCG budget it moved mostly head items to the mid
tercile, because most candidates of a good model are head or mid items. On MovieLens-100K
validation it gave tail exposure x1.44 for -4.2% nDCG@10, where the binary boost gives x1.64
for -0.3% (beta 0.09; docs/benchmarks.md, "diversity").
"""

from __future__ import annotations

import numpy as np

TERCILES = ("head", "mid", "tail")
TAIL = TERCILES.index("tail")


def novelty(popularity: np.ndarray, users: int) -> np.ndarray:
    """Each item's self-information -log2((popularity + 1) / (users + 1))."""
    return -np.log2((np.asarray(popularity, dtype=np.float64) + 1.0) / (users + 1.0))


def popularity_terciles(popularity: np.ndarray) -> np.ndarray:
    """Tercile of each item (0 head, 1 mid, 2 tail): the catalogue sorted by popularity (most
    popular first, ties by index) and cut into three parts of (nearly) equal size."""
    pop = np.asarray(popularity)
    order = np.lexsort((np.arange(len(pop)), -pop))
    tercile = np.zeros(len(pop), dtype=np.int64)
    for t, part in enumerate(np.array_split(order, 3)):
        tercile[part] = t
    return tercile


def long_tail(popularity: np.ndarray) -> np.ndarray:
    """Per item, whether it is in the long tail (the least popular tercile)."""
    return popularity_terciles(popularity) == TAIL


def _scaled(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min() if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros(len(values))


def boost(relevance: np.ndarray, in_tail: np.ndarray, beta: float) -> np.ndarray:
    """The boosted scores of the candidates (in their given order): higher is better.
    ``in_tail``: per candidate, whether it is in the long tail."""
    rel = _scaled(np.asarray(relevance, dtype=np.float64))
    return (1.0 - beta) * rel + beta * np.asarray(in_tail, dtype=np.float64)


def boosted_order(relevance: np.ndarray, in_tail: np.ndarray, beta: float) -> np.ndarray:
    """Positions into the candidates, best boosted score first (ties: the model's order)."""
    value = boost(relevance, in_tail, beta)
    return np.lexsort((np.arange(len(value)), -value))
