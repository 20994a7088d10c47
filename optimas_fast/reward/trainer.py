"""Training, online adaptation and held-out evaluation of a reward Encoder (backbone + heads).

One training primitive, ``Trainer.step(batch, lr) -> StepReport``, under every training loop:

    PairBatch: chosen + rejected rows (prepared by the loop: tokenised in batched calls, truncation applied),
    pair weights, subtracted margins, centering
        --scheduler--> dedupe (a candidate shared by several pairs is encoded once) + prefix-group batches
        (the pair's input prefix is encoded once on decoders)
        --backbone, one call per planned batch (chosen and rejected together)--> unique states (U, H)
        --gather--> h_chosen (B, H), h_rejected (B, H) --ops.fused_head_bt_loss--> loss --> AdamW

The step applies the loss and the optimizer and nothing else: the learning rate, weight decay and clipping are
arguments of each call, so no loop's settings leak into another's. The loops over it, each owning its data
order, schedule (schedules.py) and settings:

- ``TrainLoops.train`` / ``TrainLoops.adapt``: ``RewardModel.train`` (epochs over pairs) and ``RewardModel.adapt``
  (a few steps on fresh pairs plus per-component replay), with the model's ``TrainConfig`` as defaults and a
  call's keyword overrides applied to that call alone;
- ``trl_trainer.RewardTrainer.train``: TRL's names, steps and schedule (also ``optimas-fast reward train``).

The Trainer keeps the optimizer (its moments persist across calls and loops, as one model's state) and the count
of steps taken; heads added or removed on the encoder are noticed through ``Encoder.components.version`` at the next
step: the optimizer is rebuilt over the current parameters, keeping the moments of those that remain.

Multi-process: when ``torch.distributed`` is initialised (``torchrun``; see distributed.py) each rank takes a
contiguous shard of every global batch and the backbone runs under DistributedDataParallel. Each rank's loss is its
shard's row sum over the global weight total (times the world size) so that DDP's gradient average equals the
single-process weighted mean exactly (up to float summation order).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from optimas_fast import ops
from optimas_fast._validate import check_bool, check_choice, check_int, check_number

from . import attention, schedules
from .data import PreferencePair, as_candidates, as_pairs, pair_weights
from .encode import encode_planned
from .encoder import Encoder
from .metrics import grouped_spearman, pair_hits, pair_metrics
from .rows import Rows
from .sharded import score

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("truncate_prefix", "drop", "error")
# TrainConfig.schedule: train()'s learning-rate schedule ("constant" warms up when warmup_steps > 0: schedules.py's
# "constant_with_warmup"); TrainConfig.weighting: how a pair's margin weights its loss
TRAIN_SCHEDULES = ("constant", "linear", "cosine")
WEIGHTINGS = ("margin", "uniform")


def _can_fuse(params) -> bool:
    """torch's fused AdamW: one kernel over all parameters instead of a loop of small ops per tensor. Measured on
    a 2-core EPYC, MiniLM-L6's 22.7M parameters: 18 ms per step fused vs 92-95 ms foreach / single-tensor (the
    same update up to float rounding). It takes floating-point parameters on CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------ the step
@dataclass
class PairBatch:
    """One optimizer step's pairs, as the loss sees them (a loop builds it; ``Trainer.step`` consumes it)."""

    rows: Rows  # 2B prepared rows: the B chosen rows, then the B rejected rows (pair_rows)
    weights: Sequence[float]  # (B,) pair weights >= 0: the loss is their weighted mean
    margins: Sequence[float] | None = None  # (B,) subtracted inside the log-sigmoid (TRL's margin), or None
    center: float = 0.0  # lambda of lambda * (r+ + r-)^2 (reward centering)

    def __len__(self) -> int:
        return len(self.rows) // 2


@dataclass
class StepReport:
    """What one ``Trainer.step`` did (global over ranks under torchrun)."""

    loss: float  # the batch's loss before the update
    accuracy: dict[str, float]  # per component: metrics.pair_hits on the batch's scores before the update
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # tokens pushed through the backbone (padding included; this rank's under torchrun)
    pairs: int  # pairs in the batch
    lr: float  # the backbone's learning rate of this step
    seconds: float  # wall time of the step


class _PairLoss(nn.Module):
    """The loss of one (shard of a) batch as a module, so DDP can wrap it: forward encodes the unique rows
    through the encoder's backbone (shared-prefix or independent, as planned) and applies the fused loss."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.net = encoder.net
        self._encoder = (encoder,)  # a tuple keeps the (non-Module) encoder out of the module tree

    def forward(
        self,
        rows: Rows,
        weights: Sequence[float],
        margins: Sequence[float] | None,
        divisor: float | None,
        center: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(loss, r_chosen, r_rejected, tokens) of the pairs whose chosen rows are ``rows[:B]`` and rejected rows
        ``rows[B:]``: the weighted mean loss (divisor None), or the row sum / divisor (DDP shards); the (B,)
        scores are detached (for the step's accuracy)."""
        enc = self._encoder[0]
        n = len(rows) // 2
        plan = enc.plan(rows)
        h, tokens = encode_planned(enc, rows, plan, inference=False)  # (U, H) in plan.rows order
        dev = h.device
        idx = torch.from_numpy(plan.request_row).to(dev)  # (2B,)
        h_c, h_r = h.index_select(0, idx[:n]), h.index_select(0, idx[n:])  # (B, H) each
        head_ids = torch.from_numpy(rows.head_ids[:n]).to(dev)  # (B,)
        W, b = self.net.stacked_heads()  # (C, H), (C,)
        w = torch.tensor(list(weights), dtype=torch.float32, device=dev)  # (B,)
        mu = torch.tensor(list(margins), dtype=torch.float32, device=dev) if margins is not None else None  # (B,)
        if divisor is None:
            loss = ops.fused_head_bt_loss(h_c, h_r, head_ids, W, b, weight=w, margin=mu, center=center)
        else:
            loss = (
                ops.fused_head_bt_loss(h_c, h_r, head_ids, W, b, weight=w, margin=mu, center=center, reduction="sum")
                / divisor
            )
        with torch.no_grad():  # the scores again for the accuracy: two (B, H) x H products, no graph
            Wd, bd = W.detach(), b.detach()
            r_c = ops.multihead_score(h_c.detach().float(), head_ids, Wd, bd)  # (B,)
            r_r = ops.multihead_score(h_r.detach().float(), head_ids, Wd, bd)  # (B,)
        return loss, r_c, r_r, tokens


def pair_chunks(rows: Rows, budget: int | None, shares_prefix: bool) -> list[np.ndarray]:
    """The pairs of ``rows`` (chosen rows first, then rejected) as chunks of pair indices whose distinct rows hold
    at most ``budget`` tokens (``RewardModelConfig.train_chunk_tokens``; None: one chunk). Pairs of one input stay
    in one chunk, so a candidate shared by several pairs and (decoders) the shared prefix are still encoded once;
    a group over the budget is a chunk of its own. Groups are packed greedily in order of their longest row, so a
    chunk holds inputs of similar length and pads little (the loss is a sum over pairs: any partition is exact)."""
    n = len(rows) // 2
    if budget is None or n <= 1:
        return [np.arange(n)]
    key = rows.prefix_of[:n]  # (n,) a pair's input: chosen and rejected share its prefix
    plen, slen = rows.prefix_lens, rows.suffix_lens  # (2n,)
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(key.tolist()):
        groups.setdefault(k, []).append(i)
    sized = []  # (longest row, tokens, pair indices) per group
    for members in groups.values():
        both = np.concatenate([members, np.asarray(members) + n])  # (2m,) the group's rows
        distinct = {(int(rows.prefix_of[r]), int(rows.suffix_of[r])): r for r in both.tolist()}
        if shares_prefix:  # each distinct prefix once, then the suffixes
            prefixes = {int(rows.prefix_of[r]): int(plen[r]) for r in distinct.values()}
            t = sum(prefixes.values()) + sum(int(slen[r]) for r in distinct.values())
        else:
            t = sum(int(plen[r] + slen[r]) for r in distinct.values())
        sized.append((int((plen[both] + slen[both]).max()), t, members))
    sized.sort(key=lambda g: g[0])  # stable: equal lengths keep their order
    chunks: list[list[int]] = []
    used = budget + 1  # tokens of the open chunk (none open yet)
    for _, t, members in sized:
        if used + t > budget:
            chunks.append(list(members))
            used = t
        else:
            chunks[-1].extend(members)
            used += t
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in chunks]  # each in batch order (one chunk: 0..n-1)


def _set_checkpointing(encoder: Encoder, on: bool) -> None:
    """Turn the backbone's activation checkpointing (``config.gradient_checkpointing``) on or off; the config is
    read live, so each step follows it."""
    backbone = encoder.net.backbone
    if on and encoder.shares_prefix and not encoder._shared_prefix_kernel():
        raise ValueError(
            "config.gradient_checkpointing=True with prefix sharing on a decoder needs the shared-prefix attention "
            "kernel (config.shared_prefix_kernel=True, attn_implementation='sdpa', a llama / qwen2 / qwen3 backbone "
            "with full attention): transformers' checkpointing drops the KV cache that the per-row path passes from "
            "the prefix call to the suffix call. Set config.prefix_sharing=False, or bound activations with "
            "config.train_chunk_tokens"
        )
    # what transformers' is_activation_checkpointing reads (its older name is deprecated in 5.x)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules()) == on:
        return
    new_api = hasattr(backbone, "activation_checkpointing_enable")  # transformers >= 5.2x; older: gradient_*
    if not on:
        (backbone.activation_checkpointing_disable if new_api else backbone.gradient_checkpointing_disable)()
        return
    if not getattr(backbone, "supports_gradient_checkpointing", False) and not hasattr(backbone, "get_base_model"):
        raise ValueError(
            f"config.gradient_checkpointing=True: {type(backbone).__name__} does not support activation checkpointing"
        )
    # non-reentrant: works with inputs that need no grad and with autocast; the context makes a suffix layer's
    # recompute attend to its shared prefix again (attention.checkpoint_contexts)
    kwargs = {"use_reentrant": False, "context_fn": attention.checkpoint_contexts}
    if new_api:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def pair_rows(encoder: Encoder, pairs: Sequence[PreferencePair], check_fit: bool = True) -> Rows:
    """2B prepared rows: the chosen outputs of ``pairs`` first, then the rejected ones (one batched pass)."""
    comps = [p.component for p in pairs]
    ins = [p.inputs for p in pairs]
    return encoder.prepare(
        comps + comps, ins + ins, [p.chosen for p in pairs] + [p.rejected for p in pairs], check_fit=check_fit
    )


class Trainer:
    """The training step of one Encoder: the optimizer (AdamW; moments persist across calls) and the count of
    steps taken (``global_step``). Every training loop calls ``step``; none of them configures the Trainer.

    Args:
        encoder: what is trained (its ``net``: backbone + heads).
    """

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.optimizer: torch.optim.AdamW | None = None
        self.global_step = 0  # optimizer steps taken so far, by every loop
        self._loss_module = _PairLoss(encoder)
        self._ddp: nn.Module | None = None
        self._heads_version = encoder.components.version  # the encoder's heads the optimizer was built over

    # --------------------------------------------------------------------------------------- plumbing
    def _param_groups(self) -> list[list[tuple[str, nn.Parameter]]]:
        named = [(n, p) for n, p in self.encoder.net.named_parameters() if p.requires_grad]
        heads = [(n, p) for n, p in named if n.startswith("head_")]
        body = [(n, p) for n, p in named if not n.startswith("head_")]
        return [body, heads]

    def sync_params(self) -> None:
        """Follow the encoder's heads: rebuild the optimizer over the current parameters, keeping the state of
        those that remain. Called by the trainer itself whenever ``encoder.components.version`` moved; harmless to
        call at any time."""
        self._heads_version = self.encoder.components.version
        self._ddp = None
        if self.optimizer is None:
            return
        old_state = self.optimizer.state
        self.optimizer = None
        self.ensure_optimizer()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in old_state:
                    self.optimizer.state[p] = old_state[p]

    def ensure_optimizer(self) -> torch.optim.AdamW:
        """The optimizer over the encoder's current parameters: group 0 the backbone, group 1 the heads (never
        weight-decayed). Learning rates and weight decay are set by each ``step``."""
        if self._heads_version != self.encoder.components.version:
            self.sync_params()
        if self.optimizer is None:
            body, heads = self._param_groups()
            self.optimizer = torch.optim.AdamW(
                [{"params": [p for _, p in body]}, {"params": [p for _, p in heads], "weight_decay": 0.0}],
                lr=0.0,
                weight_decay=0.0,
                fused=_can_fuse(p for _, p in body + heads),
            )
        return self.optimizer

    def _wrapped(self) -> nn.Module:
        if _world()[1] == 1:
            return self._loss_module
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.encoder.device
            # find_unused_parameters: encoders' poolers and heads absent from a shard get no gradient
            self._ddp = DDP(
                self._loss_module, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True
            )
        return self._ddp

    # ------------------------------------------------------------------------------------------ step
    def step(
        self,
        batch: PairBatch,
        lr: float,
        *,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
    ) -> StepReport:
        """One optimizer step on a global batch: the loss through ``ops``, backward, clipping, AdamW.

        lr: the backbone's learning rate for this step (>= 0: a warm-up may start at 0); head_lr: the heads'
        (None: lr); weight_decay: the backbone's decoupled weight decay for this step (heads get none);
        max_grad_norm: clip the global gradient norm to this (None: no clipping). Returns the StepReport."""
        t0 = time.perf_counter()
        head_lr = lr if head_lr is None else head_lr
        for name, v in (("lr", lr), ("head_lr", head_lr), ("weight_decay", weight_decay)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Trainer.step: {name} must be a finite number >= 0, got {v!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"Trainer.step: max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        rows, weights = batch.rows, list(batch.weights)
        n = len(batch)
        if n < 1 or len(rows) != 2 * n or len(weights) != n or (batch.margins is not None and len(batch.margins) != n):
            raise ValueError(
                f"Trainer.step: a batch of {len(rows)} rows needs 2B rows (chosen, then rejected) and B "
                f"weights / margins, got {len(weights)} weights"
            )
        rank, world = _world()
        if world > 1:
            # ops' mean is sum(rows) / sum(w) (the centering term included), so a shard contributes
            # sum(its rows) / sum(all w); DDP then averages over ranks, which the factor `world` undoes.
            lo, hi = (n * rank) // world, (n * (rank + 1)) // world
            divisor = float(sum(weights)) / world
            if hi == lo:  # fewer pairs than ranks: take part in the all-reduce with a zero loss
                lo, hi, divisor = 0, 1, math.inf
        else:
            lo, hi, divisor = 0, n, None
        take = np.concatenate([np.arange(lo, hi), np.arange(n + lo, n + hi)])  # (2b,)
        shard = rows if (lo, hi) == (0, n) else rows.take(take)
        mu = list(batch.margins[lo:hi]) if batch.margins is not None else None
        opt = self.ensure_optimizer()
        for g, group_lr in zip(opt.param_groups, (lr, head_lr), strict=True):
            g["lr"] = group_lr
        opt.param_groups[0]["weight_decay"] = weight_decay
        self.encoder.net.train()
        # memory: last step's gradients and the bf16 scoring copy (stale after this step) are freed before the
        # forward, not after it, so neither sits beside this step's activations (benchmarks/RESULTS.md, "Where
        # reward training's memory goes": SmolLM2-135M, 540 MB of gradients and a 270 MB copy)
        opt.zero_grad(set_to_none=True)
        self.encoder.precision.release_copy()
        loss, r_c, r_r, tokens = self._forward_backward(shard, weights[lo:hi], mu, divisor, batch.center, world)
        params = [p for g in opt.param_groups for p in g["params"]]
        if max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            # the global 2-norm as clip_grad_norm_ computes it (torch.nn.utils.get_total_norm needs torch >= 2.6)
            norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        opt.step()
        self.encoder.precision.weights_version += 1  # fused AdamW leaves the parameters' version counters as they were
        self.global_step += 1
        value = loss.detach().float()
        # per-component accuracy: hits and counts per head, summed over ranks
        C = len(self.encoder.components)
        ids = torch.from_numpy(shard.head_ids[: len(shard) // 2]).long()  # (b,)
        tally = torch.zeros(2, C, dtype=torch.float64)  # (hits, pairs) per head
        if divisor != math.inf:
            tally[0].index_add_(0, ids, pair_hits(r_c.cpu(), r_r.cpu()))
            tally[1].index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        if world > 1:
            dev = value.device
            tally = tally.to(dev)
            dist.all_reduce(value)
            dist.all_reduce(tally)
            value /= world
            tally = tally.cpu()
        acc = {c: float(tally[0, i] / tally[1, i]) for i, c in enumerate(self.encoder.components) if tally[1, i] > 0}
        return StepReport(
            loss=float(value),
            accuracy=acc,
            grad_norm=float(grad_norm),
            tokens=int(tokens),
            pairs=n,
            lr=float(lr),
            seconds=time.perf_counter() - t0,
        )

    def _forward_backward(
        self,
        shard: Rows,
        weights: list[float],
        mu: list[float] | None,
        divisor: float | None,
        center: float,
        world: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The shard's loss (detached), scores (b,) each and tokens, its gradient accumulated into ``.grad``: in one
        forward and backward, or chunk by chunk under ``config.train_chunk_tokens`` (see ``pair_chunks``): each
        chunk's row sum divided by the whole shard's divisor, so the gradients add up to the unchunked ones."""
        _set_checkpointing(self.encoder, self.encoder.config.gradient_checkpointing)
        module = self._wrapped()
        chunks = pair_chunks(shard, self.encoder.config.train_chunk_tokens, self.encoder.shares_prefix)
        b = len(shard) // 2
        div = divisor if divisor is not None or len(chunks) == 1 else float(sum(weights))
        total, r_c, r_r, tokens = None, None, None, 0
        for k, idx in enumerate(chunks):
            part = shard if len(chunks) == 1 else shard.take(np.concatenate([idx, b + idx]))
            # DDP: gradients are all-reduced once, by the last chunk's backward
            sync = module.no_sync() if world > 1 and k < len(chunks) - 1 else contextlib.nullcontext()
            with sync:
                with self.encoder.precision.autocast(inference=False):
                    mu_k = None if mu is None else [mu[i] for i in idx]
                    loss, c, r, t = module(part, [weights[i] for i in idx], mu_k, div, center)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at step {self.global_step}; lower lr or check data"
                    )
                loss.backward()
            if len(chunks) == 1:
                return loss.detach(), c, r, t
            if total is None:
                total = torch.zeros((), dtype=loss.dtype, device=loss.device)
                r_c, r_r = c.new_empty(b), r.new_empty(b)  # (b,) each, in the shard's pair order
            idx_t = torch.from_numpy(idx).to(c.device)
            total += loss.detach()
            r_c[idx_t], r_r[idx_t] = c, r
            tokens += t
        return total, r_c, r_r, tokens

    # ----------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """{"meta": {"step", "has_optimizer"}, "tensors": optimizer moments}. Moments are stored by the encoder's
        stable parameter names ("opt::<name>::<slot>"), not by position, so they survive heads being added or
        removed."""
        if self._heads_version != self.encoder.components.version:
            self.sync_params()
        tensors: dict[str, torch.Tensor] = {}
        if self.optimizer is not None:
            for name, p in self.encoder.stable_parameters().items():
                for k, v in self.optimizer.state.get(p, {}).items():
                    tensors[f"opt::{name}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous().clone()
        return {"meta": {"step": self.global_step, "has_optimizer": self.optimizer is not None}, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (the encoder's weights must be loaded already)."""
        meta, tensors = state["meta"], state["tensors"]
        self.global_step = int(meta["step"])
        self.optimizer, self._ddp = None, None
        self._heads_version = self.encoder.components.version
        if not meta["has_optimizer"]:
            return
        opt = self.ensure_optimizer()
        params = self.encoder.stable_parameters()
        slots: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt::"):
                name, slot = k[len("opt::") :].rsplit("::", 1)
                slots.setdefault(name, {})[slot] = v
        fused = bool(opt.defaults.get("fused"))
        for name, st in slots.items():
            p = params[name]
            # the moments live with the parameter; `step` stays on the CPU, except that fused AdamW keeps it with
            # the parameter (as torch's own Optimizer.load_state_dict places it)
            opt.state[p] = {
                k: (
                    v.to(p.device, torch.float32).clone()
                    if k == "step" and fused
                    else v.clone()
                    if k == "step"
                    else v.to(p.device).clone()
                )
                for k, v in st.items()
            }


# ------------------------------------------------------------------------------------------------ the engine loops
@dataclass
class TrainReport:
    """What the last ``train()`` call did (``RewardModel.last_train_report``; the CLI and benchmarks read it)."""

    pairs_used: int = 0  # distinct pairs trained on (after the overlong policy)
    pairs_dropped: int = 0  # pairs left out by overlong="drop"
    pairs_truncated: int = 0  # pairs used with a truncated prefix (overlong="truncate_prefix")
    steps: int = 0  # optimizer steps taken
    seconds: float = 0.0  # wall time of the call, tokenising included
    pairs_per_s: float = 0.0  # pairs processed (pairs_used x epochs) per second
    final_loss: float = float("nan")  # loss of the last step
    overlong: str = "truncate_prefix"  # the policy in effect
    amp: str = "fp32"  # "bf16" (autocast) or "fp32": the precision training ran in (RewardModelConfig.amp)


@dataclass
class TrainConfig:
    """Settings of ``RewardModel.train`` and ``RewardModel.adapt`` (the engine's own loops).

    The model holds one (``rm.loops.config``, given as ``RewardModel(..., train_config=...)`` or as ``reward.train:``
    in a run's YAML) as the defaults of both; a call's keyword overrides apply to that call alone. The Optimas loop
    trains the reward model with these settings and has none of its own. No seed here: the data order and replay
    draws follow the model's seed (``RewardModelConfig.seed``, which a run sets from ``loop.seed``)."""

    lr: float = 5e-5  # backbone learning rate (AdamW)
    head_lr: float | None = None  # heads' learning rate; None = 20 x lr (heads start random, the backbone not)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # train(): linear warm-up from 0 over this many optimizer steps (schedules.py)
    schedule: str = "constant"  # train(): "constant" | "linear" | "cosine" (decay to min_lr_ratio at its last step)
    min_lr_ratio: float = 0.1  # train(): floor of the linear / cosine decay, as a fraction of lr
    batch_pairs: int = 16  # pairs per optimizer step (global, across ranks)
    weighting: str = "margin"  # "margin": weight = normalised margin (reference behaviour) | "uniform"
    margin_floor: float = 0.05  # weight floor as a fraction of the mean margin (no valid pair gets weight 0)
    subtract_margin: bool = False  # subtract margin_scale * margin inside log-sigmoid (margin loss)
    margin_scale: float = 1.0  # multiplier of the subtracted margin
    center: float = 0.0  # reward-centering coefficient lambda in lambda * (r+ + r-)^2
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    group_by_input: bool = True  # train(): keep pairs of one input in one batch (more dedupe and prefix sharing)
    replay_size: int = 256  # per-component replay buffer bound (pairs)
    replay_fraction: float = 0.5  # adapt(): share of each batch drawn from the replay buffers

    def validate(self, prefix: str = "") -> None:
        """ValueError naming the bad field as ``{prefix}{field}`` (a run's loader passes ``"reward.train."``, so the
        message names the YAML key)."""
        p = prefix
        check_number(self.lr, f"{p}lr", gt=0, finite=True)
        check_number(self.head_lr, f"{p}head_lr", gt=0, finite=True, allow_none=True)
        check_number(self.weight_decay, f"{p}weight_decay", min=0, finite=True)
        check_int(self.warmup_steps, f"{p}warmup_steps", min=0)
        check_choice(self.schedule, f"{p}schedule", list(TRAIN_SCHEDULES))
        check_number(self.min_lr_ratio, f"{p}min_lr_ratio", min=0, max=1)
        check_int(self.batch_pairs, f"{p}batch_pairs", min=1)
        check_choice(self.weighting, f"{p}weighting", list(WEIGHTINGS))
        check_number(
            self.margin_floor,
            f"{p}margin_floor",
            gt=0,
            finite=True,
            what="a finite number > 0 (else zero-margin pairs get weight 0)",
        )
        check_bool(self.subtract_margin, f"{p}subtract_margin")
        check_number(self.margin_scale, f"{p}margin_scale", finite=True)
        check_number(self.center, f"{p}center", min=0, finite=True)
        check_number(self.grad_clip, f"{p}grad_clip", gt=0, finite=True, allow_none=True)
        check_bool(self.group_by_input, f"{p}group_by_input")
        check_int(self.replay_size, f"{p}replay_size", min=0)
        check_number(self.replay_fraction, f"{p}replay_fraction", min=0, lt=1)


def make_batches(
    pairs: Sequence[PreferencePair], batch_pairs: int, group_by_input: bool, gen: torch.Generator
) -> list[list[int]]:
    """Shuffled batches of pair indices; with group_by_input, pairs of one (component, inputs) stay adjacent."""
    if not group_by_input:
        order = torch.randperm(len(pairs), generator=gen).tolist()
    else:
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(pairs):
            groups.setdefault((p.component, p.inputs), []).append(i)
        keys = list(groups)
        order = []
        for g in torch.randperm(len(keys), generator=gen).tolist():
            members = groups[keys[g]]
            order += [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
    return [order[i : i + batch_pairs] for i in range(0, len(order), batch_pairs)]


class TrainLoops:
    """``RewardModel.train`` and ``RewardModel.adapt``: short loops over ``Trainer.step``.

    Each owns its schedule (train: ``config.schedule`` over its own steps, schedules.py; adapt: a constant
    ``lr``) and reads its settings from ``config`` (the model's TrainConfig) with the call's overrides on top, for
    that call only. Between calls they keep the data-order RNG and the per-component replay buffers that adapt
    draws from (train and adapt both add to them); checkpoints store these with the Trainer's state.

    Args:
        trainer: the model's Trainer (the step; its optimizer is shared with every other loop of the model).
        seed: seeds batch shuffling and replay sampling.
        config: the defaults of both loops (None: TrainConfig()).
    """

    def __init__(self, trainer: Trainer, seed: int = 1, config: TrainConfig | None = None):
        self.trainer = trainer
        self.encoder = trainer.encoder
        self.config = config if config is not None else TrainConfig()
        self.gen = torch.Generator().manual_seed(seed)  # batch shuffling and replay sampling
        self.replay: dict[str, list[PreferencePair]] = {}  # component -> newest pairs, at most replay_size
        self.last_report: TrainReport | None = None

    # --------------------------------------------------------------------------------------- plumbing
    def settings(self, overrides: dict) -> TrainConfig:
        """The model's config with a call's overrides applied (a copy: ``self.config`` is untouched)."""
        names = {f.name for f in fields(TrainConfig)}
        for k in overrides:
            if k not in names:
                raise TypeError(f"unknown training option {k!r}; TrainConfig fields are {sorted(names)}")
        cfg = replace(self.config, **overrides)
        cfg.validate()
        return cfg

    def _batch(self, rows: Rows, margins: list[float], ref: float, cfg: TrainConfig) -> PairBatch:
        weights = pair_weights(margins, cfg.margin_floor, ref) if cfg.weighting == "margin" else [1.0] * len(margins)
        mu = [m * cfg.margin_scale for m in margins] if cfg.subtract_margin else None
        return PairBatch(rows, weights, mu, cfg.center)

    def _step(self, batch: PairBatch, factor: float, cfg: TrainConfig) -> StepReport:
        """One step at ``factor`` times the call's learning rates (the schedule's multiplier)."""
        head_lr = cfg.head_lr if cfg.head_lr is not None else 20.0 * cfg.lr
        return self.trainer.step(
            batch, cfg.lr * factor, head_lr=head_lr * factor, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip
        )

    def _check_components(self, pairs: Sequence[PreferencePair], what: str) -> None:
        known = set(self.encoder.components)
        for i, p in enumerate(pairs):
            if p.component not in known:
                raise ValueError(
                    f"{what}[{i}] is for unknown component {p.component!r}: known components are "
                    f"{self.encoder.components} (add_component() first)"
                )

    def _follow_heads(self) -> None:
        """Drop the replay buffers of components whose heads are gone."""
        known = set(self.encoder.components)
        for c in [c for c in self.replay if c not in known]:
            del self.replay[c]

    def _remember(self, pairs: Sequence[PreferencePair], size: int) -> None:
        """Add ``pairs`` to their components' buffers, each keeping its newest ``size`` pairs (0: remember none)."""
        if size == 0:
            return
        for p in pairs:
            self.replay.setdefault(p.component, []).append(p)
        for c, buf in self.replay.items():
            if len(buf) > size:
                self.replay[c] = buf[-size:]

    def _overlong(self, rows: Rows, n: int, policy: str) -> tuple[np.ndarray, int, int]:
        """(keep (B,) bool, pairs dropped, pairs truncated) under an overlong policy; raises for "error" and for
        pairs no policy can fit (an outputs text longer than max_length on its own)."""
        max_len = self.encoder.config.template.max_length
        full_c, full_r = rows.full_length[:n], rows.full_length[n:]  # (B,) each
        over = (full_c > max_len) | (full_r > max_len)  # (B,)
        unfit = rows.unfit[:n] | rows.unfit[n:]  # (B,)
        if policy == "error" and over.any():
            i = int(np.argmax(over))
            raise ValueError(
                f"pairs[{i}] is longer than max_length={max_len} with overlong='error': chosen row "
                f"{int(full_c[i])} tokens, rejected row {int(full_r[i])} tokens (prefix included); use "
                "overlong='truncate_prefix' or 'drop', or raise max_length"
            )
        if policy == "drop":
            return ~over, int(over.sum()), 0
        if unfit.any():
            i = int(np.argmax(unfit))
            side, k = ("chosen", i) if rows.unfit[i] else ("rejected", n + i)
            need = int(rows.suffix_lens[k]) + len(self.encoder.tokens.lead) + len(self.encoder.tokens.sep)
            raise ValueError(
                f"pairs[{i}].{side}: the outputs text is {int(rows.suffix_lens[k])} tokens and the row "
                f"needs at least {need + self.encoder.config.template.min_prefix_tokens} > max_length="
                f"{max_len}; the suffix is never truncated: raise max_length, shorten the outputs or "
                "use overlong='drop'"
            )
        truncated = (rows.truncated[:n] > 0) | (rows.truncated[n:] > 0)  # (B,)
        return np.ones(n, dtype=bool), 0, int(truncated.sum())

    # ------------------------------------------------------------------------------------- the loops
    def train(
        self, pairs, epochs: int = 1, lr: float | None = None, overlong: str = "truncate_prefix", **overrides
    ) -> list[dict]:
        """Initial training: ``epochs`` passes over ``pairs`` in shuffled batches of ``batch_pairs``, the learning
        rate following ``schedule`` over this call's steps (warm-up, then decay to ``min_lr_ratio``).

        overlong: what to do with pairs longer than ``template.max_length``: "truncate_prefix" (default) cuts
        the prefix (inputs) to fit, "drop" leaves the pair out, "error" raises a ValueError naming the pair.
        Returns per-step dicts (epoch, step, loss, pairs, seconds, lr, grad_norm, tokens, accuracy);
        ``last_report`` says what was done."""
        t_start = time.perf_counter()
        pairs = as_pairs(pairs)
        check_int(epochs, "epochs", min=1)
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        cfg = self.settings({**overrides, **({"lr": lr} if lr is not None else {})})
        self._check_components(pairs, "pairs")
        self._follow_heads()
        n = len(pairs)
        rows = pair_rows(self.encoder, pairs, check_fit=False)  # every pair tokenised once, in batched calls
        keep, dropped, truncated = self._overlong(rows, n, overlong)
        kept = np.flatnonzero(keep)  # (K,) indices into pairs
        if not len(kept):
            raise ValueError(
                f"every one of the {n} pairs is longer than max_length="
                f"{self.encoder.config.template.max_length} and overlong='drop' left none to train on"
            )
        used = [pairs[i] for i in kept]
        margins = [p.margin for p in used]
        ref = float(np.mean(margins))  # weights do not depend on which pairs a batch happens to hold
        total = epochs * math.ceil(len(used) / cfg.batch_pairs)
        kind = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
        floor = 0.0 if cfg.schedule == "constant" else cfg.min_lr_ratio
        history: list[dict] = []
        for epoch in range(epochs):
            for batch_idx in make_batches(used, cfg.batch_pairs, cfg.group_by_input, self.gen):
                src = kept[batch_idx]  # (b,) indices into pairs
                batch = self._batch(
                    rows.take(np.concatenate([src, src + n])), [margins[i] for i in batch_idx], ref, cfg
                )
                f = schedules.lr_factor(kind, len(history), cfg.warmup_steps, total, floor)
                rep = self._step(batch, f, cfg)
                history.append(
                    {
                        "epoch": epoch,
                        "step": self.trainer.global_step,
                        "loss": rep.loss,
                        "pairs": rep.pairs,
                        "seconds": rep.seconds,
                        "lr": rep.lr,
                        "grad_norm": rep.grad_norm,
                        "tokens": rep.tokens,
                        "accuracy": rep.accuracy,
                    }
                )
            logger.info(
                "train epoch %d: mean loss %.4f",
                epoch,
                float(np.mean([h["loss"] for h in history if h["epoch"] == epoch])),
            )
        self._remember(used, cfg.replay_size)
        seconds = time.perf_counter() - t_start
        self.last_report = TrainReport(
            pairs_used=len(used),
            pairs_dropped=dropped,
            pairs_truncated=truncated,
            steps=len(history),
            seconds=seconds,
            pairs_per_s=len(used) * epochs / seconds if seconds > 0 else float("nan"),
            final_loss=history[-1]["loss"],
            overlong=overlong,
            amp="bf16" if self.encoder.precision.uses_bf16(inference=False) else "fp32",
        )
        logger.info("train: %s", asdict(self.last_report))
        return history

    def adapt(self, pairs, steps: int = 1, lr: float | None = None, **overrides) -> list[dict]:
        """Online adaptation: ``steps`` optimizer steps at a constant ``lr``, each on fresh pairs plus a draw
        from the replay buffers (``replay_fraction`` of ``batch_pairs``); the optimizer's moments are the model's,
        kept from earlier calls. Over-long pairs have their prefix truncated (train()'s default policy)."""
        pairs = as_pairs(pairs)
        check_int(steps, "steps", min=1)
        cfg = self.settings({**overrides, **({"lr": lr} if lr is not None else {})})
        self._check_components(pairs, "pairs")
        self._follow_heads()  # a removed component's replay is gone
        pool = [p for buf in self.replay.values() for p in buf]
        n_replay = int(round(cfg.batch_pairs * cfg.replay_fraction)) if pool else 0
        n_fresh = max(1, cfg.batch_pairs - n_replay)
        ref = float(np.mean([p.margin for p in pairs] + [p.margin for p in pool]))
        history, cursor, order = [], 0, torch.randperm(len(pairs), generator=self.gen).tolist()
        for _ in range(steps):
            fresh = []
            while len(fresh) < min(n_fresh, len(pairs)):
                if cursor == len(order):
                    cursor, order = 0, torch.randperm(len(pairs), generator=self.gen).tolist()
                fresh.append(pairs[order[cursor]])
                cursor += 1
            replay = (
                [pool[i] for i in torch.randint(len(pool), (n_replay,), generator=self.gen).tolist()]
                if n_replay
                else []
            )
            chosen = fresh + replay
            rep = self._step(
                self._batch(pair_rows(self.encoder, chosen), [p.margin for p in chosen], ref, cfg), 1.0, cfg
            )
            history.append(
                {
                    "step": self.trainer.global_step,
                    "loss": rep.loss,
                    "fresh": len(fresh),
                    "replay": len(replay),
                    "seconds": rep.seconds,
                    "lr": rep.lr,
                    "grad_norm": rep.grad_norm,
                    "tokens": rep.tokens,
                    "accuracy": rep.accuracy,
                }
            )
        self._remember(pairs, cfg.replay_size)
        return history

    # ----------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's trainer section (format unchanged since optimas-fast-reward/1): {"meta": config,
        step, replay buffers, ...; "tensors": the RNG state and the Trainer's optimizer moments}."""
        tr = self.trainer.state_dict()
        meta = {
            "config": asdict(self.config),
            "step": tr["meta"]["step"],
            "horizon": None,
            "has_optimizer": tr["meta"]["has_optimizer"],
            "base_lrs": None,
            "replay": {c: [asdict(p) for p in buf] for c, buf in self.replay.items()},
        }
        return {"meta": meta, "tensors": {"trainer.rng": self.gen.get_state(), **tr["tensors"]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (also the trainer sections of checkpoints written before the step and
        the loops were split, whose ``config`` held the last call's settings: they become this model's
        defaults, so a loaded run continues as it would have)."""
        meta, tensors = state["meta"], state["tensors"]
        self.config = TrainConfig(**meta["config"])
        self.gen.set_state(tensors["trainer.rng"])
        keep = self.config.replay_size
        self.replay = {c: [PreferencePair(**d) for d in ps][-keep:] if keep else [] for c, ps in meta["replay"].items()}
        self.trainer.load_state_dict(
            {
                "meta": {"step": meta["step"], "has_optimizer": meta["has_optimizer"]},
                "tensors": {k: v for k, v in tensors.items() if k.startswith("opt::")},
            }
        )


def evaluate(encoder: Encoder, pairs, candidates=None, subtract_margin: bool = False, center: float = 0.0) -> dict:
    """Held-out metrics per component and overall: ``metrics.pair_metrics`` of the pairs' scores (n_pairs,
    accuracy with ties counting half, Bradley-Terry loss, margin) plus

    - alignment: mean over inputs of Spearman's rho between head scores and the measured global rewards of
      that input's candidates (needs ``candidates``; NaN without them).

    subtract_margin / center: the loss as TRL's evaluation computes it (the pairs' margins subtracted inside the
    log-sigmoid, the centering term added); off by default (the plain Bradley-Terry loss).
    """
    pairs = as_pairs(pairs)
    cands = as_candidates(candidates)
    known = set(encoder.components)
    for i, p in enumerate(pairs):
        if p.component not in known:
            raise ValueError(f"pairs[{i}] is for unknown component {p.component!r}")
    for i, c in enumerate(cands):
        if c.component not in known:
            raise ValueError(f"candidates[{i}] is for unknown component {c.component!r}")
    reqs = (
        [(p.component, p.inputs, p.chosen) for p in pairs]
        + [(p.component, p.inputs, p.rejected) for p in pairs]
        + [(c.component, c.inputs, c.outputs) for c in cands]
    )
    s = score(encoder, reqs)[0] if reqs else torch.zeros(0)  # (2B + K,)
    n = len(pairs)
    comps = [p.component for p in pairs]
    pm = pair_metrics(
        s[:n], s[n : 2 * n], comps, margin=[p.margin for p in pairs] if subtract_margin else None, center=center
    )
    cand_scores = s[2 * n :].tolist()
    groups: dict[str, dict[str, dict]] = {}  # component -> inputs -> {"scores", "rewards"}
    for c, sc in zip(cands, cand_scores, strict=True):
        g = groups.setdefault(c.component, {}).setdefault(c.inputs, {"scores": [], "rewards": []})
        g["scores"].append(sc)
        g["rewards"].append(c.reward)
    nan = float("nan")
    out: dict[str, Any] = {"per_component": {}}
    for comp in encoder.components:
        m = pm["per_component"].get(comp)
        if m is None and comp not in groups:
            continue
        m = dict(m) if m is not None else {"n_pairs": 0, "accuracy": nan, "loss": nan, "margin": nan}
        out["per_component"][comp] = {**m, "alignment": grouped_spearman(groups.get(comp, {}))}
    all_groups = {(comp, inp): g for comp, gs in groups.items() for inp, g in gs.items()}
    out.update(
        n_pairs=n, accuracy=pm["accuracy"], loss=pm["loss"], margin=pm["margin"], alignment=grouped_spearman(all_groups)
    )
    return out
