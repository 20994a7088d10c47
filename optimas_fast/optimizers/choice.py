"""Choice optimizer: the large-candidate-pool path.

Enumerate the Choice's whole space (or a sample of ``max_candidates`` when larger, the incumbent always
included), run the component for every (candidate, input), and score **all** rows in one batched
``reward_model.score`` call (the reward engine dedupes identical rows, so candidates that give the same
output cost one encoding). The best mean LRF score wins; ties keep the incumbent.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optimas_fast._validate import check_int
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
from optimas_fast.system import Choice, Component

__all__ = ["ChoiceConfig", "ChoiceOptimizer"]


@dataclass
class ChoiceConfig:
    max_candidates: int = 10_000  # pool larger than this is sampled (without replacement)
    max_inputs: int = 8  # stored inputs each candidate runs on

    def validate(self) -> None:
        for name in ("max_candidates", "max_inputs"):
            check_int(getattr(self, name), f"choice.{name}", min=1)


class ChoiceOptimizer(Optimizer):
    kind = "choice"

    def __init__(self, config: ChoiceConfig | None = None):
        self.config = config or ChoiceConfig()
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
        t0, rng, budget, address, key, current = self._start(component, budget, address, rng, Choice)
        xs = self._inputs(inputs, budget.max_inputs or self.config.max_inputs, rng)
        cap = min(self.config.max_candidates, budget.max_candidates or self.config.max_candidates)
        if budget.max_rows is not None:
            cap = max(1, min(cap, budget.max_rows // len(xs) - 1))
        if current.size() - 1 <= cap:
            pool = [c for c in current.candidates() if c != current]
        else:
            pool = [c for c in current.sample(cap + 1, rng) if c != current][:cap]
        cands = [current] + pool  # the incumbent first: ties go to it
        outputs = [run_batch(component, xs, override_for(key, c)) for c in cands]
        mat = score_matrix(component, reward_model, xs, outputs)  # (candidates, inputs), one score call
        means = [mean(row) for row in mat]
        best = pick_best(means)
        return Proposal(
            address,
            cands[best],
            current,
            means[best],
            means[0],
            [{"value": c.describe(), "score": s} for c, s in zip(cands, means)],
            n_rows=sum(y is not None for outs in outputs for y in outs),
            n_inputs=len(xs),
            seconds=self._clock() - t0,
            info={"pool": len(cands), "space": current.size()},
        )
