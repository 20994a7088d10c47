"""The shared optimizer interface, the proposal it returns, and the batched run-and-score helpers.

Every optimizer takes its settings in ``__init__`` and its data in one method with one signature:

    proposal = optimizer.optimize(component, inputs, reward_model, budget, address=..., rng=...)

- ``component``: the component whose variable is optimized (run directly, not through the system);
- ``inputs``: stored input dicts of that component (the optimizer scores candidates on these);
- ``reward_model``: anything with ``score(rows) -> (N,) tensor`` over (component, inputs text, outputs text);
- ``budget``: an ``OptimizerBudget`` (or None for the optimizer's defaults);
- ``address``: which variable of a several-variable component (``"name.key"``), default the single one;
- ``rng``: a ``random.Random`` for anything sampled (determinism is the caller's seed).

The optimizer never changes the component: it returns a ``Proposal`` (the best variable found, which may be
the incumbent, with every candidate's mean LRF score). Candidates and the incumbent are scored on the *same*
inputs, and each output row stays aligned with the input it came from (rows are built per (candidate,
input), scored in one batched call, and reshaped back).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optimas_fast._validate import check_int
from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.render import render_inputs, render_outputs
from optimas_fast.system import Component, Variable
from optimas_fast.system.context import usage_scope

__all__ = ["Optimizer", "Proposal", "OptimizerBudget", "run_batch", "score_matrix", "resolve_address"]

log = logging.getLogger(__name__)

# A failed (candidate, input) call scores this much below the worst successful row: a candidate that
# breaks the component must lose to one that works, without making the mean infinite.
FAILURE_PENALTY = 1.0


@dataclass
class OptimizerBudget:
    """The size of one ``optimize`` call's search (candidates, inputs, rows scored by the LRF); None = the optimizer's
    own default. Not a spending limit: a run's limits are ``optimize.BudgetConfig`` (``loop.budget:``), enforced
    by ``lm.Budget`` (LM calls, tokens, dollars) and ``optimize.budget.MetricCounter`` (metric calls)."""

    max_candidates: int | None = None  # candidates scored (the incumbent not counted)
    max_inputs: int | None = None  # stored inputs each candidate runs on
    max_rows: int | None = None  # (candidate, input) rows scored in total

    def validate(self) -> None:
        for name in ("max_candidates", "max_inputs", "max_rows"):
            check_int(getattr(self, name), f"OptimizerBudget.{name}", min=1, allow_none=True)


@dataclass
class Proposal:
    """What an optimizer found for one variable."""

    address: str  # variable address ("component" or "component.key")
    variable: Variable  # the best variable found (the incumbent itself when nothing beat it)
    incumbent: Variable  # the variable the component had
    score: float  # mean LRF score of ``variable``'s outputs on the inputs
    incumbent_score: float  # mean LRF score of the incumbent's outputs on the same inputs
    candidates: list[dict] = field(default_factory=list)  # {"value": describe(), "score": mean} per candidate
    n_rows: int = 0  # (candidate, input) rows scored
    n_inputs: int = 0  # inputs used
    seconds: float = 0.0  # wall time
    info: dict = field(default_factory=dict)  # optimizer-specific details (e.g. ES steps)

    @property
    def changed(self) -> bool:
        return self.variable is not self.incumbent and self.variable != self.incumbent

    def summary(self) -> dict:
        return {
            "address": self.address,
            "changed": self.changed,
            "value": self.variable.describe(),
            "incumbent": self.incumbent.describe(),
            "score": self.score,
            "incumbent_score": self.incumbent_score,
            "n_candidates": len(self.candidates),
            "n_rows": self.n_rows,
            "n_inputs": self.n_inputs,
            "seconds": self.seconds,
            "top": sorted(self.candidates, key=lambda c: -c["score"])[:5],
            **self.info,
        }


def resolve_address(component: Component, address: str | None) -> tuple[str, str | None, Variable]:
    """(address, key or None, current variable) for ``address`` of ``component``."""
    variables = component.variables()
    if not variables:
        raise ValueError(f"component '{component.name}' has no variable to optimize")
    if address is None:
        if len(variables) != 1:
            raise ValueError(f"component '{component.name}' has several variables {sorted(variables)}: pass address=")
        address = next(iter(variables))
    if address not in variables:
        raise ValueError(f"component '{component.name}' has no variable {address!r} (has {sorted(variables)})")
    key = address.partition(".")[2] or None
    return address, key, variables[address]


def override_for(key: str | None, value: Variable) -> Any:
    return value if key is None else {key: value}


def run_batch(
    component: Component, inputs: Sequence[Mapping[str, Any]], override: Any = None, seed: int | None = None
) -> list[dict | None]:
    """The component's outputs for each input with ``override`` applied; None where a call failed.

    Components with ``forward_batch`` (the examples' LM components) get the whole list in one call, which
    a batching LM decodes together; others are called per input.
    """
    var = component.resolve_variable(override)
    batch_fn = getattr(component, "forward_batch", None)
    with usage_scope(component.name, seed):
        if callable(batch_fn) and len(inputs) > 1:
            try:
                rows = [{f: x[f] for f in component.inputs} for x in inputs]
                return [component.check_outputs(r) for r in batch_fn(rows, var)]
            except BudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 — retry row by row to find the failing inputs
                log.debug("run_batch %s: batch failed (%s); retrying per input", component.name, exc)
        out: list[dict | None] = []
        for x in inputs:
            try:
                out.append(
                    component.check_outputs(component.forward(variable=var, **{f: x[f] for f in component.inputs}))
                )
            except BudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 — a failing (candidate, input) is penalised, not fatal
                log.debug("run_batch %s: input failed: %s", component.name, exc)
                out.append(None)
        return out


def score_matrix(
    component: Component,
    reward_model: Any,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Sequence[dict | None]],
) -> list[list[float]]:
    """LRF scores (candidates × inputs) of ``outputs[c][i]`` (None = failed), in **one** ``score`` call.

    Rows are built per (candidate, input) in that order and reshaped back, so a score always belongs to the
    input its output came from. Failed rows get (worst successful score - FAILURE_PENALTY).
    """
    x_text = [render_inputs(component, x) for x in inputs]
    rows, where = [], []
    for c, outs in enumerate(outputs):
        if len(outs) != len(inputs):
            raise ValueError(f"score_matrix: candidate {c} has {len(outs)} outputs for {len(inputs)} inputs")
        for i, y in enumerate(outs):
            if y is not None:
                rows.append((component.name, x_text[i], render_outputs(component, y)))
                where.append((c, i))
    scores = reward_model.score(rows).tolist() if rows else []
    floor = (min(scores) if scores else 0.0) - FAILURE_PENALTY
    mat = [[floor] * len(inputs) for _ in outputs]
    for (c, i), s in zip(where, scores):
        mat[c][i] = float(s) if math.isfinite(s) else floor
    return mat


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else -math.inf


def pick_best(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the lowest index (the incumbent sits at index 0)."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


class Optimizer:
    """Base class; subclasses implement ``optimize`` and may keep JSON state across calls."""

    kind: str = ""  # the variable kind it optimizes ("prompt", "choice", "weights")

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
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass

    @staticmethod
    def _inputs(inputs: Sequence[Mapping[str, Any]], cap: int | None, rng: random.Random) -> list[Mapping[str, Any]]:
        inputs = list(inputs)
        if not inputs:
            raise ValueError("optimize: no stored inputs to score candidates on")
        if cap is not None and len(inputs) > cap:
            inputs = [inputs[i] for i in sorted(rng.sample(range(len(inputs)), cap))]
        return inputs

    @staticmethod
    def _clock() -> float:
        return time.perf_counter()

    def _start(
        self,
        component: Component,
        budget: OptimizerBudget | None,
        address: str | None,
        rng: random.Random | None,
        expected: type,
    ):
        """The common opening of every ``optimize``: start the clock, default and check the budget, find the
        variable and check its type. Returns (t0, rng, budget, address, key, current variable)."""
        t0 = self._clock()
        rng = rng or random.Random(0)
        budget = budget or OptimizerBudget()
        budget.validate()
        address, key, current = resolve_address(component, address)
        if not isinstance(current, expected):
            raise TypeError(
                f"{type(self).__name__}: variable {address!r} is a {current.kind}, "
                f"not {'weights' if self.kind == 'weights' else 'a ' + self.kind}"
            )
        return t0, rng, budget, address, key, current
