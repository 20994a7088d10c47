"""Process-group set-up for multi-process reward training (``torchrun --nproc-per-node N script.py``).

Once a process group exists, ``RewardModel.train``/``adapt`` shard every global batch across ranks and run
under DistributedDataParallel (see trainer.py); nothing else changes in user code:

    info = init_distributed()            # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    rm = RewardModel(..., device=info.device)
    rm.train(pairs, epochs=2)           # every rank passes the same pairs and the same seed
    if info.rank == 0: rm.save("ckpt")
    cleanup_distributed()

``RewardModel.score`` shards too: every rank passes the same requests, encodes only its share of the planned
batches (``shard_batches``) and gets all N scores back (``gather_row_scores``), equal to one process's.
"""

from __future__ import annotations

import heapq
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from optimas_fast._validate import check_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank on this node (picks the GPU)
    backend: str  # "nccl" (CUDA) or "gloo" (CPU)
    device: torch.device  # where this rank's model should live


def init_distributed(
    backend: str | None = None, init_method: str | None = None, rank: int | None = None, world_size: int | None = None
) -> DistInfo:
    """Initialise the default process group (idempotent). Without arguments it reads torchrun's
    environment; ``backend`` defaults to NCCL when CUDA is available, else gloo."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size): got rank={rank}, world_size={world_size}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size)
        logger.info("process group: rank %d/%d, backend %s", rank, world_size, backend)
    return DistInfo(rank, world_size, local_rank, backend, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        # Every rank reaches this point before any tears the group down: a gloo rank that destroys its
        # group while a peer is still working can abort ("terminate called without an active exception",
        # seen once in a clean-clone CI check).
        dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batches(batch_tokens: np.ndarray, world_size: int) -> np.ndarray:
    """Owner rank (B,) int64 of each planned batch, balancing budget tokens across ``world_size`` ranks.

    Greedy longest-first: batches by tokens descending (ties by index), each to the least-loaded rank (ties
    to the lowest rank). Deterministic, so every rank computes the same assignment from the same plan without
    communicating; whole batches move, so a prefix-group batch (one shared prefix) stays on one rank. The
    ranks' loads end within one batch of each other (the least-loaded rank takes every next batch), and with
    B >= world_size every rank gets at least one batch."""
    check_int(world_size, "world_size", min=1)
    tokens = np.asarray(batch_tokens, dtype=np.int64)  # (B,)
    if tokens.ndim != 1:
        raise ValueError(f"batch_tokens must be 1-D (one entry per batch), got shape {tokens.shape}")
    owner = np.zeros(len(tokens), dtype=np.int64)  # (B,)
    if world_size == 1:
        return owner
    heap = [(0, r) for r in range(world_size)]  # (load, rank): heapq pops the least load, then lowest rank
    # a Python step per batch (not per row): batches are few (thousands for a million rows)
    for b in np.argsort(-tokens, kind="stable").tolist():
        load, r = heapq.heappop(heap)
        owner[b] = r
        heapq.heappush(heap, (load + int(tokens[b]), r))
    return owner


def fingerprint(arrays: Sequence[np.ndarray]) -> int:
    """CRC32 over the arrays' bytes: ranks compare it to catch different inputs before merging results."""
    crc = 0
    for a in arrays:
        a = np.ascontiguousarray(a)
        crc = zlib.crc32(np.asarray(a.shape, dtype=np.int64).tobytes(), crc)
        crc = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"", crc)
    return crc


def gather_row_scores(local: np.ndarray, owner_of_row: np.ndarray, key: int) -> np.ndarray:
    """All ranks' row scores merged into plan-row order (U,), on every rank.

    ``local``: this rank's scores for the rows it owns, in row order; ``owner_of_row`` (U,): the owner rank of
    every planned row (the same on every rank); ``key``: a fingerprint of the inputs, which must agree (ranks
    that planned different requests would otherwise merge scores of different rows without noticing)."""
    rank, world_size = world()
    parts: list = [None] * world_size
    # one collective of small pickled arrays (4 bytes per row): the payload is the scores themselves
    dist.all_gather_object(parts, (int(key), np.ascontiguousarray(local, dtype=np.float32)))
    keys = [k for k, _ in parts]
    if any(k != keys[0] for k in keys):
        raise RuntimeError(
            f"score under torch.distributed: the ranks passed different requests or settings "
            f"(input fingerprints by rank: {keys}); every rank must call score with the same rows"
        )
    out = np.empty(len(owner_of_row), dtype=np.float32)  # (U,)
    for r, (_, s) in enumerate(parts):
        sel = owner_of_row == r  # (U,)
        if int(sel.sum()) != len(s):
            raise RuntimeError(
                f"score under torch.distributed: rank {r} returned {len(s)} scores for {int(sel.sum())} rows"
            )
        out[sel] = s
    return out
