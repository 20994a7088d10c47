"""Held-out metrics: pairwise accuracy, and alignment (Spearman rank correlation between head scores and the
measured global reward of candidates)."""
from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their mean rank (what Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho with tie correction; NaN when either side is constant or has < 2 values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman: a and b must have the same shape, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def grouped_spearman(groups: dict, scores_key: str = "scores", rewards_key: str = "rewards") -> float:
    """Mean Spearman over input groups (ranking the candidates of one input is what the optimiser uses).

    Groups whose rewards (or scores) are all equal carry no ranking information and are skipped; NaN when
    no group is informative.
    """
    vals = [spearman(g[scores_key], g[rewards_key]) for g in groups.values() if len(g[scores_key]) >= 2]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")
