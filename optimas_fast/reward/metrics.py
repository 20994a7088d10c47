"""Held-out metrics of a reward model, from its scores: ``pair_metrics`` (pairwise accuracy, Bradley-Terry loss,
margin; overall and per component) and alignment (Spearman rank correlation between head scores and the measured
global reward of candidates).

``pair_metrics`` is the one definition of pairwise accuracy in the package: ``RewardModel.evaluate`` (and
through it the loop's alignment monitor), the TRL-style ``RewardTrainer.evaluate``, ``optimas-fast reward eval``
and ``Trainer.step``'s per-component training accuracy all report it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from optimas_fast import ops


def pair_hits(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """(B,) float64: 1 where r+ > r-, 1/2 where r+ == r- (a tie), 0 where r+ < r-. The accuracy of pair_metrics
    and of Trainer.step's per-component report is the mean of these."""
    diff = r_chosen.double() - r_rejected.double()  # (B,)
    return (diff > 0).double() + 0.5 * (diff == 0).double()


def pair_metrics(
    r_chosen, r_rejected, components: Sequence[str] | None = None, margin=None, center: float = 0.0
) -> dict:
    """Pairwise metrics of scored preference pairs.

    r_chosen, r_rejected: (B,) scores of each pair's preferred and other output (tensors or sequences).
    components: (B,) component of each pair, for the per-component block (None: overall only).
    margin: (B,) subtracted inside the loss (TRL's margin column), or None. center: lambda of the centering term.

    Returns ``{"n_pairs", "accuracy", "loss", "margin", "per_component": {component: the same four}}``:

    - accuracy: the share of pairs with r+ > r-, **a tie (r+ == r-) counting one half**: the expected accuracy of
      a ranker that breaks ties at random, so a constant scorer reads 0.5, not 0 (strict ``>``, TRL's) or 1
      (``>=``). The margin does not enter it.
    - loss: the mean of ``ops.bt_loss(reduction="none")`` rows, -log sigmoid(r+ - r- - mu) + center (r+ + r-)^2,
      unweighted (TRL's evaluation loss: its mean log-sigmoid plus center times the mean squared sum).
    - margin: the mean of r+ - r-.
    Computed in float64 (the scores' float32 differences are exact there). NaN for an empty block.
    """
    rc = torch.as_tensor(r_chosen, dtype=torch.float64).reshape(-1)  # (B,)
    rr = torch.as_tensor(r_rejected, dtype=torch.float64).reshape(-1)  # (B,)
    n = rc.shape[0]
    if rr.shape[0] != n:
        raise ValueError(f"pair_metrics: r_rejected has {rr.shape[0]} scores, r_chosen {n}")
    mu = None if margin is None else torch.as_tensor(margin, dtype=torch.float64).reshape(-1)  # (B,)
    if mu is not None and mu.shape[0] != n:
        raise ValueError(f"pair_metrics: margin has {mu.shape[0]} values for {n} pairs")
    if components is not None and len(components) != n:
        raise ValueError(f"pair_metrics: components has {len(components)} names for {n} pairs")
    diff = rc - rr  # (B,)
    hits = pair_hits(rc, rr)  # (B,): 1 right, 1/2 tie, 0 wrong
    loss = (
        ops.bt_loss(rc, rr, margin=mu, center=center, reduction="none") if n else torch.zeros(0, dtype=torch.float64)
    )  # (B,)

    def block(sel: torch.Tensor | None) -> dict:
        h, lo, d = (hits, loss, diff) if sel is None else (hits[sel], loss[sel], diff[sel])
        k = int(h.shape[0])
        nan = float("nan")
        return {
            "n_pairs": k,
            "accuracy": float(h.mean()) if k else nan,
            "loss": float(lo.mean()) if k else nan,
            "margin": float(d.mean()) if k else nan,
        }

    out = block(None)
    out["per_component"] = {}
    if components is not None:
        names = np.asarray(components, dtype=object)
        for c in dict.fromkeys(components):  # first-seen order
            out["per_component"][c] = block(torch.from_numpy(names == c))
    return out


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
        ranks[order[i : j + 1]] = (i + j) / 2.0
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
