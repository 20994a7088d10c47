"""Process-group set-up for multi-process reward training (``torchrun --nproc-per-node N script.py``).

Once a process group exists, ``RewardModel.train``/``adapt`` shard every global batch across ranks and run
under DistributedDataParallel (see trainer.py); nothing else changes in user code:

    info = init_distributed()            # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    rm = RewardModel(..., device=info.device)
    rm.train(pairs, epochs=2)           # every rank passes the same pairs and the same seed
    if info.rank == 0: rm.save("ckpt")
    cleanup_distributed()
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank on this node (picks the GPU)
    backend: str  # "nccl" (CUDA) or "gloo" (CPU)
    device: torch.device  # where this rank's model should live


def init_distributed(backend: str | None = None, init_method: str | None = None, rank: int | None = None,
                     world_size: int | None = None) -> DistInfo:
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
