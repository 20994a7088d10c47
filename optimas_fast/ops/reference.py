"""Plain-PyTorch reference for every op: the `torch` backend, and the ground truth every test compares
against (in float64). Autograd does the backward. Any device, any floating dtype.

These are deliberately the obvious formulas; the fast backends must agree with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss_rows(r_chosen, r_rejected, weight=None, margin=None, center: float = 0.0):
    """Per-pair loss  l_i = -w_i * log sigmoid(r+_i - r-_i - mu_i) + center * (r+_i + r-_i)^2,  shape (B,)."""
    d = r_chosen - r_rejected  # (B,)
    if margin is not None:
        d = d - margin
    nll = -F.logsigmoid(d)  # stable for |d| up to float max: log1p(exp(-|d|)) form inside
    rows = nll if weight is None else weight * nll
    if center:
        rows = rows + center * (r_chosen + r_rejected) ** 2
    return rows


def reduce_rows(rows, weight, reduction: str):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    # mean: divide by the total weight when weights are given (a weighted average), else by B
    return rows.sum() / (weight.sum() if weight is not None else rows.shape[0])


def bt_loss(r_chosen, r_rejected, weight=None, margin=None, center: float = 0.0, reduction: str = "mean"):
    rows = bt_loss_rows(r_chosen, r_rejected, weight, margin, center)
    return reduce_rows(rows, weight, reduction)


def multihead_score(hidden, head_ids, W, b):
    """scores[n] = hidden[n] . W[head_ids[n]] + b[head_ids[n]];  hidden (N, H), W (C, H), b (C) -> (N,)."""
    return (hidden * W[head_ids]).sum(-1) + b[head_ids]  # (N, H) gather of heads, not an (N, C) product


def fused_head_bt_loss(
    h_chosen, h_rejected, head_ids, W, b, weight=None, margin=None, center: float = 0.0, reduction: str = "mean"
):
    rc = multihead_score(h_chosen, head_ids, W, b)  # (B,)
    rr = multihead_score(h_rejected, head_ids, W, b)  # (B,)
    return bt_loss(rc, rr, weight, margin, center, reduction)


def last_token_positions(lengths, T: int, padding_side: str):
    """Index of each row's last real token: lengths-1 with right padding, T-1 with left padding."""
    if padding_side == "right":
        return lengths.long() - 1
    return torch.full_like(lengths, T - 1, dtype=torch.long)


def last_token_hidden(hidden, lengths, padding_side: str = "right"):
    """hidden (B, T, H), lengths (B,) -> (B, H): each row's hidden state at its last real token."""
    B, T, _ = hidden.shape
    pos = last_token_positions(lengths, T, padding_side)  # (B,)
    return hidden[torch.arange(B, device=hidden.device), pos]  # (B, H)
