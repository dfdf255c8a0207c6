"""Calibrated re-ranking (Steck, "Calibrated Recommendations", RecSys 2018).

A user whose history is 70% dramas and 30% comedies should get a list in about those
proportions, not only dramas because dramas score highest. Each item belongs to groups (an
item attribute: MovieLens ``genres``); an item with g groups gives each 1/g. Then:

- the user's target ``p(g|u)``: the mean of the history items' group distributions;
- a list's distribution ``q(g|list)``: the mean of its items' distributions, smoothed towards
  the target as ``q~ = (1 - alpha) q + alpha p`` (alpha 0.01, Steck's choice) so KL stays
  finite;
- miscalibration: ``KL(p || q~) = sum_g p(g) log(p(g) / q~(g))``, 0 when the list matches;
- the re-ranking picks k items greedily, each step the candidate that maximises
  ``(1 - lambda) * sum of relevance + ... - lambda * KL(p || q~(list + candidate))``, with the
  relevance min-max scaled over the candidates (as MMR's, kuberank/diversity.py). lambda = 0
  keeps the model's order; larger lambda follows the history's proportions more closely.

Users without any grouped history item have no target: their lists are left as they were and
they are not counted in :func:`miscalibration`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALPHA = 0.01
CALIBRATION_ATTRIBUTE = "genres"


def item_groups(values: Sequence) -> list[tuple[str, ...]]:
    """The groups of each item from one attribute value per item: a list of names (its
    groups), a single name or number (one group), or None/NaN (no group). Calibration and the
    policies' caps (serving/policies.py) both group items this way."""
    per_item = []
    for value in values:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            per_item.append(())
        elif isinstance(value, (list, tuple, np.ndarray)):
            per_item.append(tuple(str(v) for v in value))
        else:
            per_item.append((str(value),))
    return per_item


def group_matrix(values: Sequence) -> tuple[list[str], np.ndarray]:
    """Group names and the items' group distributions ([items, groups], rows sum to 1, or
    to 0 for an item without groups) from one attribute value per item (:func:`item_groups`)."""
    per_item = item_groups(values)
    names = sorted({g for groups in per_item for g in groups})
    column = {g: j for j, g in enumerate(names)}
    matrix = np.zeros((len(per_item), len(names)), dtype=np.float64)
    for i, groups in enumerate(per_item):
        for g in set(groups):
            matrix[i, column[g]] = 1.0 / len(set(groups))
    return names, matrix


def target(groups: np.ndarray, history: Sequence[int]) -> np.ndarray | None:
    """p(g|u): the mean group distribution of the history items (rows of ``groups``), or None
    when no history item has a group."""
    rows = groups[np.asarray(history, dtype=np.int64)] if len(history) else groups[:0]
    rows = rows[rows.sum(axis=1) > 0]
    if len(rows) == 0:
        return None
    return rows.mean(axis=0)


def kl(p: np.ndarray, q: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """KL(p || (1 - alpha) q + alpha p) over the last axis (q may be [n, groups])."""
    smoothed = (1.0 - alpha) * q + alpha * p
    mask = p > 0
    return np.sum(p[mask] * np.log(p[mask] / smoothed[..., mask]), axis=-1)


def calibrate(
    relevance: np.ndarray,
    candidate_groups: np.ndarray,
    p: np.ndarray,
    lam: float,
    k: int,
    alpha: float = ALPHA,
) -> np.ndarray:
    """Steck's greedy calibrated list: the order (positions into ``relevance``) of the first
    ``min(k, len)`` picks, then the remaining candidates in their given order. ``relevance``
    and ``candidate_groups`` ([candidates, groups]) are in the model's order; ties go to the
    higher-ranked candidate."""
    n = len(relevance)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min() if n else 0.0
    rel = (rel - rel.min()) / span if span > 0 else np.zeros(n)
    chosen = np.zeros(n, dtype=bool)
    order: list[int] = []
    total_groups = np.zeros(candidate_groups.shape[1])
    total_rel = 0.0
    for step in range(min(k, n)):
        q = (total_groups[None, :] + candidate_groups) / (step + 1)
        value = (1.0 - lam) * (total_rel + rel) - lam * kl(p, q, alpha)
        value[chosen] = -np.inf
        pick = int(np.argmax(value))
        order.append(pick)
        chosen[pick] = True
        total_groups += candidate_groups[pick]
        total_rel += rel[pick]
    rest = [i for i in range(n) if not chosen[i]]
    return np.asarray(order + rest, dtype=np.int64)


def miscalibration(
    lists: Sequence[Sequence[int]],
    histories: Sequence[Sequence[int]],
    groups: np.ndarray,
    k: int,
    alpha: float = ALPHA,
) -> float:
    """Mean KL(p(g|u) || q~(g|top k)) over the users that have a target (0 is perfectly
    calibrated)."""
    values = []
    for items, history in zip(lists, histories, strict=True):
        p = target(groups, history)
        top = np.asarray(items[:k], dtype=np.int64)
        if p is None or len(top) == 0:
            continue
        values.append(float(kl(p, groups[top].mean(axis=0), alpha)))
    return float(np.mean(values)) if values else 0.0
