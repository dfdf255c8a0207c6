"""Long-tail boost: a popularity-bias correction that re-ranks a list's candidates by

    (1 - beta) * relevance + beta * novelty

both min-max scaled over the candidates, with an item's novelty its self-information
``-log2((popularity + 1) / (users + 1))`` (training interactions, as ``novelty@k`` in
kuberank/beyond_accuracy.py). beta = 0 keeps the model's order; beta = 1 ranks the candidates
by rarity alone. It only re-orders the candidates the model retrieved (a rare item that the
model did not find relevant is never pulled in), so it trades little relevance for more
exposure of the tail.
"""

from __future__ import annotations

import numpy as np


def novelty(popularity: np.ndarray, users: int) -> np.ndarray:
    """Each item's self-information -log2((popularity + 1) / (users + 1))."""
    return -np.log2((np.asarray(popularity, dtype=np.float64) + 1.0) / (users + 1.0))


def _scaled(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min() if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros(len(values))


def boost(relevance: np.ndarray, candidate_novelty: np.ndarray, beta: float) -> np.ndarray:
    """The boosted scores of the candidates (in their given order): higher is better."""
    rel = _scaled(np.asarray(relevance, dtype=np.float64))
    nov = _scaled(np.asarray(candidate_novelty, dtype=np.float64))
    return (1.0 - beta) * rel + beta * nov


def boosted_order(relevance: np.ndarray, candidate_novelty: np.ndarray, beta: float) -> np.ndarray:
    """Positions into the candidates, best boosted score first (ties: the model's order)."""
    value = boost(relevance, candidate_novelty, beta)
    return np.lexsort((np.arange(len(value)), -value))
