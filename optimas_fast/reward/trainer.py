"""Training, online adaptation and held-out evaluation of a reward Encoder (backbone + heads).

One optimisation step on a batch of preference pairs:

    chosen + rejected rows (prepared once per train() call: tokenised in batched calls, truncation applied)
        --scheduler--> dedupe (a candidate shared by several pairs is encoded once) + prefix-group batches
        (the pair's input prefix is encoded once on decoders)
        --backbone, one call per planned batch (chosen and rejected together)--> unique states (U, H)
        --gather--> h_chosen (B, H), h_rejected (B, H) --ops.fused_head_bt_loss--> loss --> AdamW

The trainer depends on the encoder only (never on RewardModel). Its optimizer state, learning-rate position,
RNG and per-component replay buffers persist across ``train``/``adapt`` calls and go into checkpoints through
``state_dict``/``load_state_dict``. Heads added or removed on the encoder are noticed through
``Encoder.heads_version`` at the next step: the optimizer is rebuilt over the current parameters, keeping
the moments of those that remain, and a removed component's replay buffer is dropped.

Multi-process: when ``torch.distributed`` is initialised (``torchrun``; see distributed.py) each rank takes a
contiguous shard of every global batch and the backbone runs under DistributedDataParallel. Each rank's loss is its
shard's row sum over the global weight total (times the world size) so that DDP's gradient average equals the
single-process weighted mean exactly (up to float summation order).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from optimas_fast import ops
from optimas_fast._validate import check_int

from .data import PreferencePair, as_candidates, as_pairs, pair_weights
from .encoder import Encoder, Rows
from . import schedules
from .metrics import grouped_spearman, pair_metrics

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("truncate_prefix", "drop", "error")


def _can_fuse(params) -> bool:
    """torch's fused AdamW: one kernel over all parameters instead of a loop of small ops per tensor. Measured on
    a 2-core EPYC, MiniLM-L6's 22.7M parameters: 18 ms per step fused vs 92-95 ms foreach / single-tensor (the
    same update up to float rounding). It takes floating-point parameters on CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


@dataclass
class TrainReport:
    """What the last ``train()`` call did (``RewardModel.last_train_report``; the CLI and RewardTrainer read it)."""

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
    lr: float = 5e-5  # backbone learning rate (AdamW)
    head_lr: float | None = None  # heads' learning rate; None = 20 x lr (heads start random, the backbone not)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps (schedules.py: transformers')
    schedule: str = "constant"  # "constant" | "linear" | "cosine" (decay to min_lr_ratio at the end of train())
    min_lr_ratio: float = 0.1  # floor of the linear / cosine decay; adapt() after the horizon runs at this ratio
    batch_pairs: int = 16  # pairs per optimizer step (global, across ranks)
    weighting: str = "margin"  # "margin": weight = normalised margin (reference behaviour) | "uniform"
    margin_floor: float = 0.05  # weight floor as a fraction of the mean margin (no valid pair gets weight 0)
    subtract_margin: bool = False  # subtract margin_scale * margin inside log-sigmoid (margin loss)
    margin_scale: float = 1.0  # multiplier of the subtracted margin
    center: float = 0.0  # reward-centering coefficient lambda in lambda * (r+ + r-)^2
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    group_by_input: bool = True  # keep pairs of one input in one batch (more dedupe and prefix sharing)
    replay_size: int = 256  # per-component replay buffer bound (pairs)
    replay_fraction: float = 0.5  # adapt(): share of each batch drawn from the replay buffers

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite float, got {self.lr!r}")
        if self.head_lr is not None and not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            raise ValueError(f"head_lr must be a positive finite float or None, got {self.head_lr!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {self.schedule!r}")
        if self.weighting not in ("margin", "uniform"):
            raise ValueError(f"weighting must be 'margin' or 'uniform', got {self.weighting!r}")
        check_int(self.batch_pairs, "batch_pairs", min=1)
        check_int(self.replay_size, "replay_size", min=0)
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if not (self.margin_floor > 0):
            raise ValueError(f"margin_floor must be > 0 (else zero-margin pairs get weight 0), got {self.margin_floor!r}")
        check_int(self.warmup_steps, "warmup_steps", min=0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.center < 0 or not math.isfinite(self.center):
            raise ValueError(f"center must be a finite float >= 0, got {self.center!r}")


def make_batches(pairs: Sequence[PreferencePair], batch_pairs: int, group_by_input: bool,
                 gen: torch.Generator) -> list[list[int]]:
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
    return [order[i: i + batch_pairs] for i in range(0, len(order), batch_pairs)]


class _PairLoss(nn.Module):
    """The loss of one (shard of a) batch as a module, so DDP can wrap it: forward encodes the unique rows
    through the encoder's backbone (shared-prefix or independent, as planned) and applies the fused loss."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.net = encoder.net
        self._encoder = (encoder,)  # a tuple keeps the (non-Module) encoder out of the module tree

    def forward(self, rows: Rows, weights: list[float], margins: list[float] | None, divisor: float | None,
                center: float) -> torch.Tensor:
        """Loss of the pairs whose chosen rows are ``rows[:B]`` and rejected rows ``rows[B:]``: the weighted
        mean (divisor None), or the row sum / divisor (DDP shards)."""
        enc = self._encoder[0]
        n = len(rows) // 2
        plan = enc.plan(rows)
        h, _ = enc.encode_planned(rows, plan, inference=False)  # (U, H) in plan.rows order
        dev = h.device
        idx = torch.from_numpy(plan.request_row).to(dev)  # (2B,)
        h_c, h_r = h.index_select(0, idx[:n]), h.index_select(0, idx[n:])  # (B, H) each
        head_ids = torch.from_numpy(rows.head_ids[:n]).to(dev)  # (B,)
        W, b = self.net.stacked_heads()  # (C, H), (C,)
        w = torch.tensor(weights, dtype=torch.float32, device=dev)  # (B,)
        mu = torch.tensor(margins, dtype=torch.float32, device=dev) if margins is not None else None  # (B,)
        if divisor is None:
            return ops.fused_head_bt_loss(h_c, h_r, head_ids, W, b, weight=w, margin=mu, center=center)
        return ops.fused_head_bt_loss(h_c, h_r, head_ids, W, b, weight=w, margin=mu, center=center,
                                      reduction="sum") / divisor


def pair_rows(encoder: Encoder, pairs: Sequence[PreferencePair], check_fit: bool = True) -> Rows:
    """2B prepared rows: the chosen outputs of ``pairs`` first, then the rejected ones (one batched pass)."""
    comps = [p.component for p in pairs]
    ins = [p.inputs for p in pairs]
    return encoder.prepare(comps + comps, ins + ins, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                           check_fit=check_fit)


class Trainer:
    """Optimizer, LR position, RNG and replay buffers of one Encoder (persist across calls).

    Args:
        encoder: what is trained (its ``net``: backbone + heads).
        seed: seeds batch shuffling and replay sampling.
    """

    def __init__(self, encoder: Encoder, seed: int = 1):
        self.encoder = encoder
        self.cfg = TrainConfig()
        self.optimizer: torch.optim.AdamW | None = None
        self.step = 0  # optimizer steps taken so far (drives the LR schedule)
        self.horizon: int | None = None  # last step of the linear schedule (set by train())
        self.gen = torch.Generator().manual_seed(seed)  # batch shuffling and replay sampling
        self.replay: dict[str, deque] = {}
        self.last_report: TrainReport | None = None
        self._loss_module = _PairLoss(encoder)
        self._ddp: nn.Module | None = None
        self._heads_version = encoder.heads_version  # the encoder's heads the optimizer was built over

    # --------------------------------------------------------------------------------------- plumbing
    def _apply_overrides(self, overrides: dict) -> None:
        names = {f.name for f in fields(TrainConfig)}
        for k, v in overrides.items():
            if k not in names:
                raise TypeError(f"unknown training option {k!r}; TrainConfig fields are {sorted(names)}")
            setattr(self.cfg, k, v)
        self.cfg.validate()
        for c in list(self.replay):
            if self.replay[c].maxlen != self.cfg.replay_size:
                self.replay[c] = deque(self.replay[c], maxlen=self.cfg.replay_size)

    def _param_groups(self) -> list[list[tuple[str, nn.Parameter]]]:
        named = [(n, p) for n, p in self.encoder.net.named_parameters() if p.requires_grad]
        heads = [(n, p) for n, p in named if n.startswith("head_")]
        body = [(n, p) for n, p in named if not n.startswith("head_")]
        return [body, heads]

    def _lrs(self) -> tuple[float, float]:
        return self.cfg.lr, self.cfg.head_lr if self.cfg.head_lr is not None else 20.0 * self.cfg.lr

    def sync_params(self) -> None:
        """Follow the encoder's heads: rebuild the optimizer over the current parameters, keeping the state of
        those that remain, and drop replay buffers of components that are gone. Called by the trainer itself
        whenever ``encoder.heads_version`` moved; harmless to call at any time."""
        self._heads_version = self.encoder.heads_version
        known = set(self.encoder.components)
        for c in [c for c in self.replay if c not in known]:
            del self.replay[c]
        self._ddp = None
        if self.optimizer is None:
            return
        old_state = self.optimizer.state
        self.optimizer = None
        self._ensure_optimizer()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in old_state:
                    self.optimizer.state[p] = old_state[p]

    def _ensure_optimizer(self) -> None:
        if self._heads_version != self.encoder.heads_version:
            self.sync_params()
        lr_body, lr_head = self._lrs()
        if self.optimizer is None:
            body, heads = self._param_groups()
            self.optimizer = torch.optim.AdamW(
                [{"params": [p for _, p in body], "lr": lr_body, "base_lr": lr_body},
                 {"params": [p for _, p in heads], "lr": lr_head, "base_lr": lr_head, "weight_decay": 0.0}],
                lr=lr_body, weight_decay=self.cfg.weight_decay, fused=_can_fuse(p for _, p in body + heads))
        else:  # a new lr passed to train()/adapt() resets the base rates, keeping the moments
            for g, lr in zip(self.optimizer.param_groups, (lr_body, lr_head)):
                g["base_lr"] = lr

    def lr_factor(self, step: int) -> float:
        c = self.cfg
        kind = "constant_with_warmup" if c.schedule == "constant" else c.schedule
        return schedules.lr_factor(kind, step, c.warmup_steps, max(1, self.horizon or 1),
                                   0.0 if c.schedule == "constant" else c.min_lr_ratio)

    def _wrapped(self) -> nn.Module:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._loss_module
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.encoder.device
            # find_unused_parameters: encoders' poolers and heads absent from a shard get no gradient
            self._ddp = DDP(self._loss_module, device_ids=[dev.index] if dev.type == "cuda" else None,
                            find_unused_parameters=True)
        return self._ddp

    # ------------------------------------------------------------------------------------------ step
    def _step(self, rows: Rows, weights: list[float], margins: list[float]) -> float:
        """One optimizer step on a global batch (chosen rows, then rejected rows); returns the global loss."""
        n = len(rows) // 2
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
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
        w_shard = weights[lo:hi]
        mu = [m * self.cfg.margin_scale for m in margins[lo:hi]] if self.cfg.subtract_margin else None
        self._ensure_optimizer()
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * self.lr_factor(self.step)
        self.encoder.net.train()
        # memory: last step's gradients and the bf16 scoring copy (stale after this step) are freed before the
        # forward, not after it, so neither sits beside this step's activations (benchmarks/RESULTS.md, "Where
        # reward training's memory goes": SmolLM2-135M, 540 MB of gradients and a 270 MB copy)
        self.optimizer.zero_grad(set_to_none=True)
        self.encoder.release_score_copy()
        with self.encoder.autocast(inference=False):
            loss = self._wrapped()(shard, w_shard, mu, divisor, self.cfg.center)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}; lower lr or check data")
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.cfg.grad_clip)
        self.optimizer.step()
        self.encoder.weights_version += 1  # fused AdamW leaves the parameters' version counters as they were
        self.step += 1
        value = loss.detach().float()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        return float(value)

    def _weights(self, margins: list[float], ref: float) -> list[float]:
        if self.cfg.weighting == "margin":
            return pair_weights(margins, self.cfg.margin_floor, ref)
        return [1.0] * len(margins)

    def _check_components(self, pairs: Sequence[PreferencePair], what: str) -> None:
        known = set(self.encoder.components)
        for i, p in enumerate(pairs):
            if p.component not in known:
                raise ValueError(f"{what}[{i}] is for unknown component {p.component!r}: known components are "
                                 f"{self.encoder.components} (add_component() first)")

    def _remember(self, pairs: Sequence[PreferencePair]) -> None:
        if self.cfg.replay_size == 0:
            return
        for p in pairs:
            self.replay.setdefault(p.component, deque(maxlen=self.cfg.replay_size)).append(p)

    def _overlong(self, rows: Rows, n: int, policy: str) -> tuple[np.ndarray, int, int]:
        """(keep (B,) bool, pairs dropped, pairs truncated) under an overlong policy; raises for "error" and for
        pairs no policy can fit (an outputs text longer than max_length on its own)."""
        max_len = self.encoder.config.template.max_length
        full_c, full_r = rows.full_length[:n], rows.full_length[n:]  # (B,) each
        over = (full_c > max_len) | (full_r > max_len)  # (B,)
        unfit = rows.unfit[:n] | rows.unfit[n:]  # (B,)
        if policy == "error" and over.any():
            i = int(np.argmax(over))
            raise ValueError(f"pairs[{i}] is longer than max_length={max_len} with overlong='error': chosen row "
                             f"{int(full_c[i])} tokens, rejected row {int(full_r[i])} tokens (prefix included); use "
                             "overlong='truncate_prefix' or 'drop', or raise max_length")
        if policy == "drop":
            return ~over, int(over.sum()), 0
        if unfit.any():
            i = int(np.argmax(unfit))
            side, k = ("chosen", i) if rows.unfit[i] else ("rejected", n + i)
            need = int(rows.suffix_lens[k]) + len(self.encoder.tokens.lead) + len(self.encoder.tokens.sep)
            raise ValueError(f"pairs[{i}].{side}: the outputs text is {int(rows.suffix_lens[k])} tokens and the row "
                             f"needs at least {need + self.encoder.config.template.min_prefix_tokens} > max_length="
                             f"{max_len}; the suffix is never truncated: raise max_length, shorten the outputs or "
                             "use overlong='drop'")
        truncated = (rows.truncated[:n] > 0) | (rows.truncated[n:] > 0)  # (B,)
        return np.ones(n, dtype=bool), 0, int(truncated.sum())

    # ------------------------------------------------------------------------------------- public API
    def train(self, pairs, epochs: int = 1, lr: float | None = None, overlong: str = "truncate_prefix",
              **overrides) -> list[dict]:
        """Initial training: ``epochs`` passes over ``pairs`` in shuffled batches of ``batch_pairs``.

        overlong: what to do with pairs longer than ``template.max_length``: "truncate_prefix" (default) cuts
        the prefix (inputs) to fit, "drop" leaves the pair out, "error" raises a ValueError naming the pair.
        Returns per-step dicts (epoch, step, loss, pairs, seconds); ``last_report`` says what was done."""
        t_start = time.perf_counter()
        pairs = as_pairs(pairs)
        check_int(epochs, "epochs", min=1)
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if lr is not None:
            overrides["lr"] = lr
        self._apply_overrides(overrides)
        self._check_components(pairs, "pairs")
        n = len(pairs)
        rows = pair_rows(self.encoder, pairs, check_fit=False)  # every pair tokenised once, in batched calls
        keep, dropped, truncated = self._overlong(rows, n, overlong)
        kept = np.flatnonzero(keep)  # (K,) indices into pairs
        if not len(kept):
            raise ValueError(f"every one of the {n} pairs is longer than max_length="
                             f"{self.encoder.config.template.max_length} and overlong='drop' left none to train on")
        used = [pairs[i] for i in kept]
        margins = [p.margin for p in used]
        ref = float(np.mean(margins))
        n_batches = math.ceil(len(used) / self.cfg.batch_pairs)
        self.horizon = self.step + epochs * n_batches
        history = []
        for epoch in range(epochs):
            for batch_idx in make_batches(used, self.cfg.batch_pairs, self.cfg.group_by_input, self.gen):
                t0 = time.perf_counter()
                src = kept[batch_idx]  # (b,) indices into pairs
                bm = [margins[i] for i in batch_idx]
                loss = self._step(rows.take(np.concatenate([src, src + n])), self._weights(bm, ref), bm)
                history.append({"epoch": epoch, "step": self.step, "loss": loss, "pairs": len(batch_idx),
                                "seconds": time.perf_counter() - t0})
            logger.info("train epoch %d: mean loss %.4f", epoch,
                        float(np.mean([h["loss"] for h in history if h["epoch"] == epoch])))
        self._remember(used)
        seconds = time.perf_counter() - t_start
        self.last_report = TrainReport(
            pairs_used=len(used), pairs_dropped=dropped, pairs_truncated=truncated, steps=len(history),
            seconds=seconds, pairs_per_s=len(used) * epochs / seconds if seconds > 0 else float("nan"),
            final_loss=history[-1]["loss"], overlong=overlong,
            amp="bf16" if self.encoder.uses_bf16(inference=False) else "fp32")
        logger.info("train: %s", asdict(self.last_report))
        return history

    def adapt(self, pairs, steps: int = 1, lr: float | None = None, **overrides) -> list[dict]:
        """Online adaptation: ``steps`` optimizer steps, each on fresh pairs plus a replay draw (optimizer state
        kept). Over-long pairs have their prefix truncated (train()'s default policy)."""
        pairs = as_pairs(pairs)
        check_int(steps, "steps", min=1)
        if lr is not None:
            overrides["lr"] = lr
        self._apply_overrides(overrides)
        self._check_components(pairs, "pairs")
        self._ensure_optimizer()  # follows head changes first: a removed component's replay is gone
        pool = [p for buf in self.replay.values() for p in buf]
        n_replay = int(round(self.cfg.batch_pairs * self.cfg.replay_fraction)) if pool else 0
        n_fresh = max(1, self.cfg.batch_pairs - n_replay)
        ref_margins = [p.margin for p in pairs] + [p.margin for p in pool]
        ref = float(np.mean(ref_margins))
        history, cursor, order = [], 0, torch.randperm(len(pairs), generator=self.gen).tolist()
        for _ in range(steps):
            fresh = []
            while len(fresh) < min(n_fresh, len(pairs)):
                if cursor == len(order):
                    cursor, order = 0, torch.randperm(len(pairs), generator=self.gen).tolist()
                fresh.append(pairs[order[cursor]])
                cursor += 1
            replay = ([pool[i] for i in torch.randint(len(pool), (n_replay,), generator=self.gen).tolist()]
                      if n_replay else [])
            batch = fresh + replay
            t0 = time.perf_counter()
            bm = [p.margin for p in batch]
            loss = self._step(pair_rows(self.encoder, batch), self._weights(bm, ref), bm)
            history.append({"step": self.step, "loss": loss, "fresh": len(fresh), "replay": len(replay),
                            "seconds": time.perf_counter() - t0})
        self._remember(pairs)
        return history

    # ----------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """{"meta": JSON-able (config, step, LR position, replay buffers), "tensors": RNG state and optimizer
        moments}. Moments are stored by the encoder's stable parameter names ("opt::<name>::<slot>"), not by
        position, so they survive heads being added or removed."""
        if self._heads_version != self.encoder.heads_version:
            self.sync_params()
        tensors: dict[str, torch.Tensor] = {"trainer.rng": self.gen.get_state()}
        if self.optimizer is not None:
            for name, p in self.encoder.stable_parameters().items():
                for k, v in self.optimizer.state.get(p, {}).items():
                    tensors[f"opt::{name}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous().clone()
        meta = {"config": asdict(self.cfg), "step": self.step, "horizon": self.horizon,
                "has_optimizer": self.optimizer is not None,
                "base_lrs": [g["base_lr"] for g in self.optimizer.param_groups] if self.optimizer else None,
                "replay": {c: [asdict(p) for p in buf] for c, buf in self.replay.items()}}
        return {"meta": meta, "tensors": tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output into this trainer (the encoder's weights must be loaded already)."""
        meta, tensors = state["meta"], state["tensors"]
        self.cfg = TrainConfig(**meta["config"])
        self.step, self.horizon = int(meta["step"]), meta["horizon"]
        self.gen.set_state(tensors["trainer.rng"])
        self.replay = {c: deque((PreferencePair(**d) for d in ps), maxlen=self.cfg.replay_size)
                       for c, ps in meta["replay"].items()}
        self.optimizer, self._ddp = None, None
        self._heads_version = self.encoder.heads_version
        if not meta["has_optimizer"]:
            return
        self._ensure_optimizer()
        for g, lr in zip(self.optimizer.param_groups, meta["base_lrs"]):
            g["base_lr"] = lr
        params = self.encoder.stable_parameters()
        slots: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt::"):
                name, slot = k[len("opt::"):].rsplit("::", 1)
                slots.setdefault(name, {})[slot] = v
        fused = bool(self.optimizer.defaults.get("fused"))
        for name, st in slots.items():
            p = params[name]
            # the moments live with the parameter; `step` stays on the CPU, except that fused AdamW keeps it with
            # the parameter (as torch's own Optimizer.load_state_dict places it)
            self.optimizer.state[p] = {k: (v.to(p.device, torch.float32).clone() if k == "step" and fused else
                                           v.clone() if k == "step" else v.to(p.device).clone())
                                       for k, v in st.items()}


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
    reqs = ([(p.component, p.inputs, p.chosen) for p in pairs] + [(p.component, p.inputs, p.rejected) for p in pairs]
            + [(c.component, c.inputs, c.outputs) for c in cands])
    s = encoder.score(reqs)[0] if reqs else torch.zeros(0)  # (2B + K,)
    n = len(pairs)
    comps = [p.component for p in pairs]
    pm = pair_metrics(s[:n], s[n: 2 * n], comps, margin=[p.margin for p in pairs] if subtract_margin else None,
                      center=center)
    cand_scores = s[2 * n:].tolist()
    groups: dict[str, dict[str, dict]] = {}  # component -> inputs -> {"scores", "rewards"}
    for c, sc in zip(cands, cand_scores):
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
    out.update(n_pairs=n, accuracy=pm["accuracy"], loss=pm["loss"], margin=pm["margin"],
               alignment=grouped_spearman(all_groups))
    return out
