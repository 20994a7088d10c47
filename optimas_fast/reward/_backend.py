"""The two things the reward engine borrows from lower layers: the fused ops and the request scheduler.

`optimas_fast.ops` and `optimas_fast.scheduler` are the real providers. While a tree is being assembled
(or in a stripped-down install) either may be missing; then this module supplies plain-PyTorch / pure-Python
twins with the same contract, so the reward engine always runs and ``backend_report()`` says which one did.
The twins are also what the tests compare the real providers against, so they stay deliberately simple.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _load(name: str, attrs: Sequence[str]):
    """The module ``optimas_fast.<name>`` if it imports and has every attribute in ``attrs``, else None."""
    try:
        mod = importlib.import_module(f"optimas_fast.{name}")
    except ImportError as e:  # a missing native build surfaces here as ImportError too
        logger.debug("optimas_fast.%s unavailable (%s): using the reward engine's torch twin", name, e)
        return None
    if not all(hasattr(mod, a) for a in attrs):
        return None
    return mod


_ops = _load("ops", ("multihead_score", "fused_head_bt_loss", "last_token_hidden"))
_sched = _load("scheduler", ("Scheduler",))


# ----------------------------------------------------------------------------------------------- ops twins
def _ref_multihead_score(hidden, head_ids, W, b):
    # (N, H) · (N, H) summed over H: each row meets only its own head's weights.
    return (hidden * W.index_select(0, head_ids)).sum(-1) + b.index_select(0, head_ids)  # (N,)


def _ref_fused_head_bt_loss(h_chosen, h_rejected, head_ids, W, b, weight=None, margin=None, center=0.0,
                            reduction="mean"):
    r_c = _ref_multihead_score(h_chosen, head_ids, W, b)  # (B,)
    r_r = _ref_multihead_score(h_rejected, head_ids, W, b)  # (B,)
    diff = r_c - r_r
    if margin is not None:
        diff = diff - margin
    nll = -F.logsigmoid(diff)  # (B,)
    if weight is not None:
        nll = nll * weight
    rows = nll + center * (r_c + r_r) ** 2  # (B,)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    # as in optimas_fast.ops: the mean divides every row (centering included) by the total weight
    return rows.sum() / (weight.sum() if weight is not None else rows.shape[0])


def _ref_last_token_hidden(hidden, lengths, padding_side="right"):
    B, T, _ = hidden.shape
    if padding_side == "right":
        idx = lengths.to(torch.long) - 1  # (B,)
    else:
        idx = torch.full((B,), T - 1, dtype=torch.long, device=hidden.device)
    return hidden[torch.arange(B, device=hidden.device), idx.to(hidden.device)]  # (B, H)


if _ops is not None:
    multihead_score = _ops.multihead_score
    fused_head_bt_loss = _ops.fused_head_bt_loss
    last_token_hidden = _ops.last_token_hidden
else:
    multihead_score = _ref_multihead_score
    fused_head_bt_loss = _ref_fused_head_bt_loss
    last_token_hidden = _ref_last_token_hidden


# ------------------------------------------------------------------------------------------ scheduler twin
@dataclass
class PlannedBatch:
    """One backbone call: representative request indices, and (prefix sharing) their prefix groups."""

    rows: list[int]  # representative request indices, in execution order
    max_len: int  # longest row (prefix + suffix) in tokens
    oversized: bool = False  # a single row longer than the token budget (run alone)
    groups: list[list[int]] = field(default_factory=list)  # positions into `rows` sharing one prefix


@dataclass
class PlannedRequests:
    batches: list[PlannedBatch]
    dedup: list[int]  # (N,) request index -> index of its representative (identical request)
    scheduler: str  # "native" or "python-fallback"


def _fallback_plan(keys, lengths, token_budget, max_rows):
    """Dedupe identical requests, sort by (prefix key, length), cut greedily by padded token cost."""
    rep_of: dict = {}
    dedup = []
    for i, k in enumerate(keys):
        dedup.append(rep_of.setdefault(k, i))
    reps = sorted(set(dedup), key=lambda i: (keys[i][1], lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in reps:
        new_max = max(cur_max, lengths[i])
        if cur and ((len(cur) + 1) * new_max > token_budget or len(cur) + 1 > max_rows):
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches, dedup


def plan_requests(head_ids: Sequence[int], prefixes: Sequence[tuple], suffixes: Sequence[tuple],
                  prefix_keys: Sequence[int], token_budget: int, max_rows: int,
                  share_prefix: bool) -> PlannedRequests:
    """Plan backbone calls for N tokenised requests (head id, prefix ids, suffix ids).

    Uses the native scheduler when present (`optimas_fast.scheduler`), else a pure-Python twin. Prefix groups
    inside each batch are recomputed here from ``prefix_keys`` (the interned prefix ids), so the engine only
    relies on the scheduler's ``batches[*].rows`` and ``dedup`` fields.
    """
    n = len(head_ids)
    lengths = [len(p) + len(s) for p, s in zip(prefixes, suffixes)]
    if _sched is not None:
        sched = _sched.Scheduler(token_budget=token_budget, max_rows=max_rows, mode="padded",
                                 share_prefix=share_prefix)
        plan = sched.plan(list(zip(head_ids, prefixes, suffixes)))
        rows_per_batch = [[int(r) for r in b.rows] for b in plan.batches]
        dedup = [int(d) for d in plan.dedup]
        name = "native"
    else:
        keys = [(int(h), int(pk), s) for h, pk, s in zip(head_ids, prefix_keys, suffixes)]
        rows_per_batch, dedup = _fallback_plan(keys, lengths, token_budget, max_rows)
        name = "python-fallback"
    batches = []
    for rows in rows_per_batch:
        max_len = max(lengths[r] for r in rows)
        groups: dict[int, list[int]] = {}
        for pos, r in enumerate(rows):
            groups.setdefault(int(prefix_keys[r]), []).append(pos)
        batches.append(PlannedBatch(rows=rows, max_len=max_len, oversized=len(rows) == 1 and max_len > token_budget,
                                    groups=list(groups.values())))
    assert len(dedup) == n
    return PlannedRequests(batches=batches, dedup=dedup, scheduler=name)


def backend_report() -> dict:
    """Which providers the reward engine is using right now (for logs and benchmark reports)."""
    info = {"ops": "optimas_fast.ops" if _ops is not None else "torch-twin",
            "scheduler": "native" if _sched is not None else "python-fallback"}
    if _ops is not None and hasattr(_ops, "backend_info"):
        try:
            info["ops_backend"] = _ops.backend_info()
        except Exception as e:  # reporting must never break scoring
            info["ops_backend"] = f"unavailable: {e}"
    return info
