"""The re-rankings of a ranked list, one dispatch for offline (``kuberank evaluate
--mmr-lambda / --calibration / --tail-boost``, components/evaluate.py) and served (a request's
``diversity``, serving/reranking.py): the kind names are the served API's.

- ``mmr_lambda``: lambda of maximal marginal relevance over the items' vectors
  (kuberank/diversity.py);
- ``calibration``: lambda of Steck's calibration to the genre shares of the history
  (kuberank/calibration.py);
- ``tail_boost``: beta of the long-tail boost, (1 - beta) relevance plus beta for the items in
  the long tail (kuberank/longtail.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kuberank.calibration import calibrate, target
from kuberank.diversity import RERANK_DEPTH, mmr
from kuberank.errors import KuberankError
from kuberank.longtail import boosted_order

KINDS = ("mmr_lambda", "calibration", "tail_boost")
CALIBRATED_K = 10  # calibration's greedy picks unless told: the first 10, the lists metrics read


class Reranker:
    """What the re-rankings need of the items (rows of each array are item rows; None where
    the items lack it): ``vectors`` (MMR), ``groups`` (calibration: the genre distributions,
    :func:`kuberank.calibration.group_matrix`) and ``tail`` (the long-tail boost: whether each
    item is in the long tail, :func:`kuberank.longtail.long_tail`)."""

    def __init__(
        self,
        vectors: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        tail: np.ndarray | None = None,
    ):
        self.vectors = vectors
        self.groups = groups
        self.tail = tail

    def order(
        self,
        kind: str,
        value: float,
        items: np.ndarray,
        scores: np.ndarray,
        history: Sequence[int] = (),
        picks: int | None = None,
        head: int | None = RERANK_DEPTH,
        length: int | None = None,
    ) -> np.ndarray:
        """The re-ranked order: positions into ``items`` (item rows in the model's order, with
        their ``scores``), every position once. The re-ranking ``kind`` with its ``value``
        re-orders the first ``head`` items (None: all); the greedy ones pick ``picks`` of them
        first (default: MMR the whole head, calibration :data:`CALIBRATED_K`). The rest of the
        head follows as it was, then the items past it. Calibration to a ``history`` (item
        rows) without any grouped item keeps the order. ``length``: only the first ``length``
        positions of that order (None: all of them); the unpicked rest is worked out only when
        the picks are fewer (a served list of k without caps reads its k picks alone)."""
        items = np.asarray(items)
        scores = np.asarray(scores)
        n = len(items)
        size = n if head is None else min(head, n)
        top, rel = items[:size], scores[:size]
        if kind == "mmr_lambda":
            chosen = mmr(rel, self.vectors[top], value, picks)
        elif kind == "calibration":
            p = target(self.groups, history)
            if p is None:  # no grouped history: nothing to calibrate to
                return np.arange(n if length is None else min(length, n))
            k = CALIBRATED_K if picks is None else picks
            chosen = calibrate(rel, self.groups[top], p, value, k)
        elif kind == "tail_boost":
            chosen = boosted_order(rel, self.tail[top], value)
        else:
            raise KuberankError(f"re-ranking: one of {', '.join(KINDS)}, got {kind!r}")
        chosen = np.asarray(chosen, dtype=np.int64)
        if length is not None and length <= len(chosen):
            return chosen[:length]
        unpicked = np.ones(size, dtype=bool)
        unpicked[chosen] = False
        rest = np.flatnonzero(unpicked)  # the head's unpicked, in their order
        order = np.concatenate([chosen, rest, np.arange(size, n)]).astype(np.int64)
        return order if length is None else order[:length]
