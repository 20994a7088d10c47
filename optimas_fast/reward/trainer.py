"""Training, online adaptation and held-out evaluation of a RewardModel.

One optimisation step on a batch of preference pairs:

    chosen + rejected rows --TokenCache--> tokens --scheduler--> dedupe (a candidate shared by several pairs
    is encoded once) + prefix groups (the pair's input prefix is encoded once on decoders)
        --backbone, one call per planned batch (chosen and rejected together)--> unique states (U, H)
        --gather--> h_chosen (B, H), h_rejected (B, H) --ops.fused_head_bt_loss--> loss --> AdamW

The trainer object lives on the model (``model.trainer``): its optimizer state, learning-rate position and
per-component replay buffers persist across ``train``/``adapt`` calls and go into checkpoints.

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
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import _backend as B
from .data import PreferencePair, as_candidates, as_pairs
from .metrics import grouped_spearman

if TYPE_CHECKING:  # type names only: the model module imports this one
    from .model import RewardModel

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    lr: float = 5e-5  # backbone learning rate (AdamW)
    head_lr: float | None = None  # heads' learning rate; None = 20 x lr (heads start random, the backbone not)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps
    schedule: str = "constant"  # "constant" | "linear" (decay to min_lr_ratio at the end of the last train())
    min_lr_ratio: float = 0.1  # linear schedule floor; adapt() after the horizon runs at this ratio
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
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
        if self.weighting not in ("margin", "uniform"):
            raise ValueError(f"weighting must be 'margin' or 'uniform', got {self.weighting!r}")
        if not isinstance(self.batch_pairs, int) or self.batch_pairs < 1:
            raise ValueError(f"batch_pairs must be an int >= 1, got {self.batch_pairs!r}")
        if not isinstance(self.replay_size, int) or self.replay_size < 0:
            raise ValueError(f"replay_size must be an int >= 0, got {self.replay_size!r}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction!r}")
        if not (self.margin_floor > 0):
            raise ValueError(f"margin_floor must be > 0 (else zero-margin pairs get weight 0), got {self.margin_floor!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if self.center < 0 or not math.isfinite(self.center):
            raise ValueError(f"center must be a finite float >= 0, got {self.center!r}")


def pair_weights(margins: Sequence[float], floor: float, reference: float | None = None) -> list[float]:
    """Normalised margins, floored: w = max(m / mean_m, floor). All-equal (even all-zero) margins give w = 1."""
    ref = reference if reference is not None else (float(np.mean(margins)) if len(margins) else 0.0)
    if ref <= 0:
        return [1.0] * len(margins)
    return [max(m / ref, floor) for m in margins]


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
    through the model's backbone (shared-prefix or independent, as planned) and applies the fused loss."""

    def __init__(self, model: "RewardModel"):
        super().__init__()
        self.net = model.net
        self._model = (model,)  # a tuple keeps the (non-Module) model out of the module tree

    def forward(self, pairs: list[PreferencePair], weights: list[float], divisor: float | None,
                cfg: TrainConfig) -> torch.Tensor:
        """Loss of ``pairs``: the weighted mean (divisor None), or the row sum / divisor (DDP shards)."""
        model = self._model[0]
        toks = [model.tokenise(p.component, p.inputs, p.chosen) for p in pairs]
        toks += [model.tokenise(p.component, p.inputs, p.rejected) for p in pairs]
        plan = model.plan(toks)
        h, pos_of, _ = model.encode_planned(toks, plan)  # (U, H)
        n = len(pairs)
        dev = h.device
        idx = torch.tensor([pos_of[d] for d in plan.dedup], device=dev)  # (2B,)
        h_c, h_r = h.index_select(0, idx[:n]), h.index_select(0, idx[n:])  # (B, H) each
        head_ids = torch.tensor([t.head_id for t in toks[:n]], device=dev)  # (B,)
        W, b = self.net.stacked_heads()  # (C, H), (C,)
        w = torch.tensor(weights, dtype=torch.float32, device=dev)  # (B,)
        mu = (torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=dev) * cfg.margin_scale
              if cfg.subtract_margin else None)
        if divisor is None:
            return B.fused_head_bt_loss(h_c, h_r, head_ids, W, b, weight=w, margin=mu, center=cfg.center)
        return B.fused_head_bt_loss(h_c, h_r, head_ids, W, b, weight=w, margin=mu, center=cfg.center,
                                    reduction="sum") / divisor


class Trainer:
    """Optimizer, LR position, RNG and replay buffers of one RewardModel (persist across calls)."""

    def __init__(self, model: "RewardModel"):
        self.model = model
        self.cfg = TrainConfig()
        self.optimizer: torch.optim.AdamW | None = None
        self.step = 0  # optimizer steps taken so far (drives the LR schedule)
        self.horizon: int | None = None  # last step of the linear schedule (set by train())
        self.gen = torch.Generator().manual_seed(model.config.seed + 1)  # batch shuffling and replay sampling
        self.replay: dict[str, deque] = {}
        self._loss_module = _PairLoss(model)
        self._ddp: nn.Module | None = None

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
        named = [(n, p) for n, p in self.model.net.named_parameters() if p.requires_grad]
        heads = [(n, p) for n, p in named if n.startswith("head_")]
        body = [(n, p) for n, p in named if not n.startswith("head_")]
        return [body, heads]

    def _lrs(self) -> tuple[float, float]:
        return self.cfg.lr, self.cfg.head_lr if self.cfg.head_lr is not None else 20.0 * self.cfg.lr

    def sync_params(self, removed: str | None = None) -> None:
        """Rebuild the optimizer over the current parameters, keeping the state of those that remain."""
        if removed is not None:
            self.replay.pop(removed, None)
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
        lr_body, lr_head = self._lrs()
        if self.optimizer is None:
            body, heads = self._param_groups()
            self.optimizer = torch.optim.AdamW(
                [{"params": [p for _, p in body], "lr": lr_body, "base_lr": lr_body},
                 {"params": [p for _, p in heads], "lr": lr_head, "base_lr": lr_head, "weight_decay": 0.0}],
                lr=lr_body, weight_decay=self.cfg.weight_decay)
        else:  # a new lr passed to train()/adapt() resets the base rates, keeping the moments
            for g, lr in zip(self.optimizer.param_groups, (lr_body, lr_head)):
                g["base_lr"] = lr

    def lr_factor(self, step: int) -> float:
        c = self.cfg
        f = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps > 0 else 1.0
        if c.schedule == "linear" and self.horizon is not None:
            span = max(1, self.horizon - c.warmup_steps)
            prog = min(1.0, max(0.0, (step - c.warmup_steps) / span))
            f *= 1.0 - (1.0 - c.min_lr_ratio) * prog
        return f

    def _wrapped(self) -> nn.Module:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._loss_module
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.model.device
            # find_unused_parameters: encoders' poolers and heads absent from a shard get no gradient
            self._ddp = DDP(self._loss_module, device_ids=[dev.index] if dev.type == "cuda" else None,
                            find_unused_parameters=True)
        return self._ddp

    # ------------------------------------------------------------------------------------------ step
    def _step(self, batch: list[PreferencePair], weights: list[float]) -> float:
        """One optimizer step on a global batch; returns the (global) loss value."""
        model = self.model
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if world > 1:
            # ops' mean is sum(rows) / sum(w) (the centering term included), so a shard contributes
            # sum(its rows) / sum(all w); DDP then averages over ranks, which the factor `world` undoes.
            lo, hi = (len(batch) * rank) // world, (len(batch) * (rank + 1)) // world
            shard, w_shard, divisor = batch[lo:hi], weights[lo:hi], float(sum(weights)) / world
            if not shard:  # fewer pairs than ranks: take part in the all-reduce with a zero loss
                shard, w_shard, divisor = batch[:1], weights[:1], math.inf
        else:
            shard, w_shard, divisor = batch, weights, None
        self._ensure_optimizer()
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * self.lr_factor(self.step)
        model.net.train()
        with model.autocast():
            loss = self._wrapped()(shard, w_shard, divisor, self.cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}; lower lr or check data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        value = loss.detach().float()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        return float(value)

    def _check_components(self, pairs: Sequence[PreferencePair], what: str) -> None:
        known = set(self.model.components)
        for i, p in enumerate(pairs):
            if p.component not in known:
                raise ValueError(f"{what}[{i}] is for unknown component {p.component!r}: known components are "
                                 f"{self.model.components} (add_component() first)")

    def _remember(self, pairs: Sequence[PreferencePair]) -> None:
        if self.cfg.replay_size == 0:
            return
        for p in pairs:
            self.replay.setdefault(p.component, deque(maxlen=self.cfg.replay_size)).append(p)

    # ------------------------------------------------------------------------------------- public API
    def train(self, pairs, epochs: int = 1, lr: float | None = None, **overrides) -> list[dict]:
        pairs = as_pairs(pairs)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if lr is not None:
            overrides["lr"] = lr
        self._apply_overrides(overrides)
        self._check_components(pairs, "pairs")
        ref = float(np.mean([p.margin for p in pairs]))
        n_batches = math.ceil(len(pairs) / self.cfg.batch_pairs)
        self.horizon = self.step + epochs * n_batches
        history = []
        for epoch in range(epochs):
            for batch_idx in make_batches(pairs, self.cfg.batch_pairs, self.cfg.group_by_input, self.gen):
                batch = [pairs[i] for i in batch_idx]
                t0 = time.perf_counter()
                w = (pair_weights([p.margin for p in batch], self.cfg.margin_floor, ref)
                     if self.cfg.weighting == "margin" else [1.0] * len(batch))
                loss = self._step(batch, w)
                history.append({"epoch": epoch, "step": self.step, "loss": loss, "pairs": len(batch),
                                "seconds": time.perf_counter() - t0})
            logger.info("train epoch %d: mean loss %.4f", epoch,
                        float(np.mean([h["loss"] for h in history if h["epoch"] == epoch])))
        self._remember(pairs)
        return history

    def adapt(self, pairs, steps: int = 1, lr: float | None = None, **overrides) -> list[dict]:
        pairs = as_pairs(pairs)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if lr is not None:
            overrides["lr"] = lr
        self._apply_overrides(overrides)
        self._check_components(pairs, "pairs")
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
            w = (pair_weights([p.margin for p in batch], self.cfg.margin_floor, ref)
                 if self.cfg.weighting == "margin" else [1.0] * len(batch))
            loss = self._step(batch, w)
            history.append({"step": self.step, "loss": loss, "fresh": len(fresh), "replay": len(replay),
                            "seconds": time.perf_counter() - t0})
        self._remember(pairs)
        return history

    # ----------------------------------------------------------------------------------- persistence
    def state(self, params: dict[str, nn.Parameter]) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able meta, tensors). ``params`` maps stable names (checkpoint.stable_parameters) to the
        parameters: optimizer moments are stored by name, not position, so they survive head changes."""
        tensors: dict[str, torch.Tensor] = {"trainer.rng": self.gen.get_state()}
        if self.optimizer is not None:
            for name, p in params.items():
                for k, v in self.optimizer.state.get(p, {}).items():
                    tensors[f"opt::{name}::{k}"] = torch.as_tensor(v).detach().cpu().contiguous().clone()
        meta = {"config": asdict(self.cfg), "step": self.step, "horizon": self.horizon,
                "has_optimizer": self.optimizer is not None,
                "base_lrs": [g["base_lr"] for g in self.optimizer.param_groups] if self.optimizer else None,
                "replay": {c: [asdict(p) for p in buf] for c, buf in self.replay.items()}}
        return meta, tensors

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
        self.cfg = TrainConfig(**meta["config"])
        self.step, self.horizon = int(meta["step"]), meta["horizon"]
        self.gen.set_state(tensors["trainer.rng"])
        self.replay = {c: deque((PreferencePair(**d) for d in ps), maxlen=self.cfg.replay_size)
                       for c, ps in meta["replay"].items()}
        self.optimizer, self._ddp = None, None
        if not meta["has_optimizer"]:
            return
        self._ensure_optimizer()
        for g, lr in zip(self.optimizer.param_groups, meta["base_lrs"]):
            g["base_lr"] = lr
        slots: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt::"):
                name, slot = k[len("opt::"):].rsplit("::", 1)
                slots.setdefault(name, {})[slot] = v
        for name, st in slots.items():
            p = params[name]
            # AdamW keeps `step` on the CPU; the moments live with the parameter
            self.optimizer.state[p] = {k: (v.clone() if k == "step" else v.to(p.device).clone())
                                       for k, v in st.items()}


def evaluate(model: "RewardModel", pairs, candidates=None) -> dict:
    """Held-out metrics per component and overall.

    - accuracy: share of pairs with r(chosen) > r(rejected) (ties count half)
    - loss: mean Bradley-Terry loss -log sigmoid(r+ - r-) (unweighted)
    - alignment: mean over inputs of Spearman's rho between head scores and the measured global rewards of
      that input's candidates (needs ``candidates``; NaN without them)
    """
    pairs = as_pairs(pairs)
    cands = as_candidates(candidates)
    known = set(model.components)
    for i, p in enumerate(pairs):
        if p.component not in known:
            raise ValueError(f"pairs[{i}] is for unknown component {p.component!r}")
    for i, c in enumerate(cands):
        if c.component not in known:
            raise ValueError(f"candidates[{i}] is for unknown component {c.component!r}")
    reqs = ([(p.component, p.inputs, p.chosen) for p in pairs] + [(p.component, p.inputs, p.rejected) for p in pairs]
            + [(c.component, c.inputs, c.outputs) for c in cands])
    s = model.score(reqs).double()
    n = len(pairs)
    diff = s[:n] - s[n: 2 * n]  # (B,)
    acc = (diff > 0).double() + 0.5 * (diff == 0).double()
    loss = -F.logsigmoid(diff)
    out: dict[str, Any] = {"per_component": {}}
    comps = [p.component for p in pairs]
    cand_scores = s[2 * n:].tolist()
    for comp in model.components:
        sel = torch.tensor([c == comp for c in comps], dtype=torch.bool)
        groups: dict[str, dict] = {}
        for c, sc in zip(cands, cand_scores):
            if c.component == comp:
                g = groups.setdefault(c.inputs, {"scores": [], "rewards": []})
                g["scores"].append(sc)
                g["rewards"].append(c.reward)
        if not sel.any() and not groups:
            continue
        out["per_component"][comp] = {
            "n_pairs": int(sel.sum()),
            "accuracy": float(acc[sel].mean()) if sel.any() else float("nan"),
            "loss": float(loss[sel].mean()) if sel.any() else float("nan"),
            "alignment": grouped_spearman(groups),
        }
    all_groups: dict = {}
    for c, sc in zip(cands, cand_scores):
        g = all_groups.setdefault((c.component, c.inputs), {"scores": [], "rewards": []})
        g["scores"].append(sc)
        g["rewards"].append(c.reward)
    out.update(n_pairs=n, accuracy=float(acc.mean()), loss=float(loss.mean()), alignment=grouped_spearman(all_groups))
    return out
