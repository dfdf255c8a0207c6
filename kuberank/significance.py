"""Seeds and significance: summaries over seeds and paired tests over queries (or users).

Pure functions on numbers; the benchmarks (``rec-peers``, ``search``) call them with per-query
metric values from :mod:`kuberank.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from kuberank import metrics


def per_query_metric(
    run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], name: str
) -> dict[str, float]:
    """``name`` (e.g. ``ndcg@10``) of every judged query, with the definitions and the judged
    set of :func:`kuberank.metrics.evaluate_run` (their mean is its value)."""
    k = int(name.split("@")[1]) if "@" in name else None
    cutoffs = (k,) if k else metrics.DEFAULT_CUTOFFS
    return {
        qid: metrics.per_query(run.get(qid, []), rels, cutoffs)[name]
        for qid, rels in qrels.items()
        if any(r > 0 for r in rels.values())
    }


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def paired_test(
    a: Mapping[str, float], b: Mapping[str, float], resamples: int = 10_000, seed: int = 0
) -> dict:
    """Paired comparison of two systems' per-query scores over the queries both have.

    Returns the means, their difference (a - b), the paired t-test's two-sided p-value
    (``scipy.stats.ttest_rel``), and a paired bootstrap over queries (``resamples`` draws,
    ``numpy.random.default_rng(seed)``): the 95% percentile interval of the mean difference
    and the two-sided p-value of the sign of the difference (twice the smaller share of
    resampled means on either side of 0, at least 1/resamples)."""
    # local: scipy.stats takes ~0.6 s to import (python -X importtime)
    from scipy.stats import ttest_rel

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise ValueError(f"paired test: {len(common)} common queries; need at least 2")
    x = np.array([a[q] for q in common], dtype=np.float64)
    y = np.array([b[q] for q in common], dtype=np.float64)
    diff = x - y
    if np.allclose(diff, diff[0]):
        t_p = 1.0 if diff[0] == 0 else 0.0  # no variance: identical or a constant shift
    else:
        t_p = float(ttest_rel(x, y).pvalue)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diff), size=(resamples, len(diff)))
    boot = diff[draws].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    side = min((boot <= 0).mean(), (boot >= 0).mean())
    return {
        "queries": len(common),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "difference": float(diff.mean()),
        "t_p": t_p,
        "bootstrap_p": float(min(1.0, max(2 * side, 1.0 / resamples))),
        "bootstrap_ci95": (float(low), float(high)),
        "resamples": resamples,
    }


def average_per_query(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-query mean over seeds (queries every seed scored)."""
    common = set.intersection(*(set(s) for s in per_seed)) if per_seed else set()
    return {q: math.fsum(s[q] for s in per_seed) / len(per_seed) for q in sorted(common)}
