"""Weights optimizer: policy optimisation of a local torch module against the LRF.

Method (documented choice): **antithetic evolution strategies** (OpenAI-ES) with a final best-of-N.
The component's outputs reach the LRF as *text* (rendered fields), so the LRF score is not differentiable
in the module's parameters; ES is the score-function (REINFORCE) gradient of the expected LRF score under a
Gaussian search distribution over the parameters, which needs nothing but forward calls:

    for step in 1..S:
        eps_1..eps_P/2 ~ N(0, I) (scaled per tensor by the tensor's std), candidates theta +- sigma * eps
        r = mean LRF score of each candidate's outputs on the stored inputs      (one batched score call)
        theta <- theta + lr * sigma * (2 / P) * sum_i rank_centred(r_i) * eps_i   (ranks in [-1/2, 1/2])
    best-of-N: the incumbent, every candidate evaluated, and the final theta compete on the same inputs.

This works for any module whose forward produces the component's outputs (the Amazon example's scorer).
A Hugging Face causal LM with a LoRA adapter (``LoRAComponent`` with a ``Weights(LoRAAdapter)`` variable) is
optimized by best-of-N sampling + DPO instead (``optimizers/lora.py`` documents the choice).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from optimas_fast._validate import check_int, check_number
from optimas_fast.optimizers.base import (
    Optimizer,
    OptimizerBudget,
    Proposal,
    mean,
    override_for,
    pick_best,
    run_batch,
    score_matrix,
)
from optimas_fast.optimizers.lora import LoRAAdapter, LoRAComponent, optimize_lora
from optimas_fast.system import Component, Weights

__all__ = ["WeightsConfig", "WeightsOptimizer"]


@dataclass
class WeightsConfig:
    population: int = 8  # candidates per ES step (even: antithetic pairs)
    steps: int = 3  # ES updates per optimize call
    sigma: float = 0.02  # perturbation std, relative to each tensor's std
    lr: float = 0.5  # step size on the (relative) ES gradient
    max_inputs: int = 8  # stored inputs each candidate runs on
    # LoRA on a causal LM (a Weights(LoRAAdapter) variable; see optimizers/lora.py): best-of-N + DPO
    lora_samples: int = 4  # completions sampled per stored input (best vs worst become a DPO pair)
    lora_temperature: float = 1.0  # sampling temperature of those completions
    lora_steps: int = 8  # Adam steps on the adapter per optimize call
    lora_lr: float = 1e-3  # adapter learning rate
    lora_beta: float = 0.1  # DPO temperature (strength of the implicit KL leash to the incumbent)

    def validate(self) -> None:
        for name in ("population", "steps", "max_inputs", "lora_steps"):
            check_int(getattr(self, name), f"weights.{name}", min=1)
        check_int(self.lora_samples, "weights.lora_samples", min=2)
        for name in ("lora_temperature", "lora_lr", "lora_beta"):
            check_number(getattr(self, name), f"weights.{name}", gt=0)
        if self.population % 2:
            raise ValueError(f"weights.population must be even (antithetic pairs), got {self.population}")
        if not self.sigma > 0 or not self.lr > 0:
            raise ValueError(f"weights.sigma and weights.lr must be > 0, got {self.sigma!r}, {self.lr!r}")


def _flat(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta (P,), per-element noise scale (P,)) over the trainable parameters, float32."""
    thetas, scales = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        t = p.detach().float().reshape(-1)
        s = float(t.std()) if t.numel() > 1 else abs(float(t.mean()))
        thetas.append(t)
        scales.append(torch.full_like(t, s if s > 0 else 1.0))
    return torch.cat(thetas), torch.cat(scales)


def _with_theta(w: Weights, theta: torch.Tensor) -> Weights:
    new = w.copy()
    i = 0
    with torch.no_grad():
        for p in new.module.parameters():
            if not p.requires_grad:
                continue
            n = p.numel()
            p.copy_(theta[i : i + n].view_as(p).to(p.dtype))
            i += n
    return new


def _centred_ranks(r: Sequence[float]) -> torch.Tensor:
    x = torch.tensor(r, dtype=torch.float64)
    ranks = torch.empty_like(x)
    ranks[torch.argsort(x, stable=True)] = torch.arange(len(x), dtype=torch.float64)
    return (ranks / max(1, len(x) - 1) - 0.5).float()  # in [-0.5, 0.5]


class WeightsOptimizer(Optimizer):
    kind = "weights"

    def __init__(self, config: WeightsConfig | None = None):
        self.config = config or WeightsConfig()
        self.config.validate()

    def optimize(
        self,
        component: Component,
        inputs: Sequence[Mapping[str, Any]],
        reward_model: Any,
        budget: OptimizerBudget | None = None,
        *,
        address: str | None = None,
        rng: random.Random | None = None,
    ) -> Proposal:
        t0, rng, budget, address, key, current = self._start(component, budget, address, rng, Weights)
        if current.module is None:
            raise NotImplementedError(
                f"WeightsOptimizer: {address!r} is a path-based Weights ({current.path}); "
                "it optimizes in-process modules: a torch module (ES) or a LoRAAdapter of a "
                "LoRAComponent (best-of-N + DPO, optimas_fast.optimizers.lora)"
            )
        cfg = self.config
        xs = self._inputs(inputs, budget.max_inputs or cfg.max_inputs, rng)
        if isinstance(current.module, LoRAAdapter):
            if not isinstance(component, LoRAComponent):
                raise TypeError(
                    f"WeightsOptimizer: {address!r} holds a LoRAAdapter but component "
                    f"'{component.name}' is not a LoRAComponent (its policy generates the samples)"
                )
            cands, scores, info = optimize_lora(component, xs, key, current, reward_model, cfg, rng)
            best = pick_best(scores)  # ties keep the incumbent
            return Proposal(
                address,
                cands[best],
                current,
                scores[best],
                scores[0],
                [{"value": "incumbent" if i == 0 else "dpo", "score": s} for i, s in enumerate(scores)],
                n_rows=len(xs) * (cfg.lora_samples + len(cands)),
                n_inputs=len(xs),
                seconds=self._clock() - t0,
                info=info,
            )
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        theta, scale = _flat(current.module)
        pool: list[tuple[Weights, float]] = []  # every evaluated candidate with its mean score
        incumbent_score = None
        history = []
        for step in range(cfg.steps):
            eps = torch.randn(cfg.population // 2, theta.numel(), generator=gen) * scale  # (P/2, D)
            eps = torch.cat([eps, -eps])  # (P, D) antithetic
            cands = [_with_theta(current, theta + cfg.sigma * e) for e in eps]
            base = [current] if step == 0 else []
            outs = [run_batch(component, xs, override_for(key, c)) for c in base + cands]
            means = [mean(row) for row in score_matrix(component, reward_model, xs, outs)]
            if step == 0:
                incumbent_score, means = means[0], means[1:]
            pool += list(zip(cands, means))
            # ES gradient of the expected score (ranks for robustness to the LRF's scale), times sigma^2 so
            # that lr is in units of one perturbation: lr=1 moves as far as one candidate did
            direction = (_centred_ranks(means)[:, None] * eps).sum(0) * (2.0 / cfg.population)  # (D,)
            theta = theta + cfg.lr * cfg.sigma * direction
            history.append({"step": step, "mean": sum(means) / len(means), "max": max(means)})
        final = _with_theta(current, theta)
        outs = [run_batch(component, xs, override_for(key, final))]
        final_score = mean(score_matrix(component, reward_model, xs, outs)[0])
        cands = [current] + [c for c, _ in pool] + [final]
        scores = [incumbent_score] + [s for _, s in pool] + [final_score]
        best = pick_best(scores)  # ties keep the incumbent
        return Proposal(
            address,
            cands[best],
            current,
            scores[best],
            incumbent_score,
            [{"value": f"candidate {i}", "score": s} for i, s in enumerate(scores)],
            n_rows=len(xs) * len(cands),
            n_inputs=len(xs),
            seconds=self._clock() - t0,
            info={
                "es": history,
                "final_score": final_score,
                "picked": "incumbent"
                if best == 0
                else ("final" if best == len(cands) - 1 else f"population {best - 1}"),
            },
        )
