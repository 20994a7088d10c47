"""Scoring: prepared rows (or raw requests) -> rewards (N,), the planned batches sharded across the ranks of a
process group under ``torchrun`` (each rank encodes its share, all ranks get every score), and the report of
what one call did.

    rows --plan--> batches --shard_batches--> this rank's batches --encode_planned--> states (U_rank, H)
         --ops.multihead_score--> (U_rank,) --gather_row_scores--> (U,) --Plan.scatter--> (N,)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from optimas_fast import ops

from .distributed import fingerprint, gather_row_scores, shard_batches, world
from .encode import encode_planned
from .encoder import Encoder
from .rows import Rows

logger = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    """What one ``score`` call did (also logged at INFO)."""

    n_requests: int = 0  # rows asked for
    n_unique: int = 0  # rows actually encoded after dedupe (by all ranks together)
    n_batches: int = 0  # backbone calls (prefix + suffix passes count as one call); under torchrun: this rank's
    prefix_sharing: str = ""  # "on" or why it is off
    tokens_encoded: int = 0  # tokens pushed through the backbone (padding included); under torchrun: this rank's
    tokens_naive: int = 0  # tokens an independent, unpadded, non-deduped encoding would push
    cache_hits: int = 0  # token-cache hits during this call (distinct texts found in the cache)
    scheduler: str = ""  # the planner that ran ("native": the C++ planner)
    ops: str = ""  # which ops provider ran the heads
    amp: str = ""  # "bf16" or "fp32"
    attention: str = ""  # the backbone's attention implementation (e.g. "sdpa", "eager")
    seconds: float = 0.0  # wall time
    host_seconds: float = 0.0  # of which outside backbone calls (parse, tokenise, plan, pad, heads, scatter)
    rank: int = 0  # this process's rank when the batches were sharded across a process group (else 0)
    world_size: int = 1  # ranks that shared the batches (1: this process encoded them all)
    n_batches_total: int = 0  # planned batches over all ranks


def score_rows(enc: Encoder, rows: Rows, shard: bool = True) -> tuple[torch.Tensor, ScoreReport]:
    """Rewards (N,) float32 on CPU for prepared rows, and what it took.

    Under ``torchrun`` (a process group of world size > 1) and ``shard=True`` this is a collective: every
    rank must pass the same rows (checked by a fingerprint) with the same weights; each encodes only its
    share of the planned batches (``shard_batches``: balanced by tokens, whole batches, so rows sharing a
    prefix stay on one rank) and all ranks return all N scores, equal to one process's (per-row math is
    the same; only which process runs a batch changes). ``shard=False`` scores everything locally (e.g.
    on rank 0 alone)."""
    t0 = time.perf_counter()
    enc._backbone_seconds = 0.0
    plan = enc.plan(rows)
    rank, world_size = world() if shard else (0, 1)
    mine = owner_of_row = None
    if world_size > 1:
        owner = shard_batches(plan.batch_tokens, world_size)  # (B,) the same on every rank
        owner_of_row = np.repeat(owner, np.diff(plan.batch_offsets))  # (U,)
        mine = np.flatnonzero(owner == rank).tolist()  # ascending: states come out in plan-row order
    was_training = enc.net.training
    enc.net.eval()
    try:
        with torch.inference_mode():
            h, n_tok = encode_planned(enc, rows, plan, inference=True, batches=mine)  # (U or U_rank, H)
            sel = plan.rows if mine is None else plan.rows[owner_of_row == rank]  # (U or U_rank,)
            head_ids = torch.from_numpy(rows.head_ids[sel]).to(enc.device)
            W, b = enc.net.stacked_heads()  # (C, H), (C,)
            s = ops.multihead_score(h, head_ids, W, b).float().cpu()  # (U or U_rank,)
        if mine is not None:
            key = fingerprint(
                (
                    rows.head_ids,
                    rows.prefix_of,
                    rows.suffix_of,
                    rows.prefix_tokens,
                    rows.prefix_offsets,
                    rows.suffix_tokens,
                    rows.suffix_offsets,
                    plan.batch_tokens,
                )
            )
            s = torch.from_numpy(gather_row_scores(s.numpy(), owner_of_row, key))  # (U,) all ranks' rows
        scores = plan.scatter(s)  # (N,) duplicates get their representative's score
    finally:
        enc.net.train(was_training)
    seconds = time.perf_counter() - t0
    report = ScoreReport(
        n_requests=len(rows),
        n_unique=len(plan.rows),
        n_batches=len(plan) if mine is None else len(mine),
        prefix_sharing=enc.prefix_sharing_status(),
        tokens_encoded=n_tok,
        tokens_naive=int((rows.prefix_lens + rows.suffix_lens).sum()),
        scheduler="native",
        ops="optimas_fast.ops",
        amp="bf16" if enc.precision.uses_bf16(True) else "fp32",
        attention=enc.attention_name(),
        seconds=seconds,
        host_seconds=seconds - enc._backbone_seconds,
        rank=rank,
        world_size=world_size,
        n_batches_total=len(plan),
    )
    return scores, report


def score(enc: Encoder, requests: Iterable[Any], shard: bool = True) -> tuple[torch.Tensor, ScoreReport]:
    """Rewards (N,) float32 on CPU for ScoreRequest / (component, inputs, outputs) rows, with the report
    (its times include parsing and tokenising). Under ``torchrun`` the batches are sharded across ranks
    (a collective: every rank calls it with the same requests; see ``score_rows``)."""
    t0 = time.perf_counter()
    hits0 = enc.tokens.hits
    rows = enc.prepare_requests(requests)
    if not len(rows):
        return torch.empty(0), ScoreReport(prefix_sharing=enc.prefix_sharing_status())
    t_prep = time.perf_counter() - t0
    scores, report = score_rows(enc, rows, shard=shard)
    report.cache_hits = enc.tokens.hits - hits0
    report.seconds += t_prep
    report.host_seconds += t_prep
    logger.info("score: %s", asdict(report))
    return scores, report
