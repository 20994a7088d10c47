"""Reward-guided best-of-N at inference: a wrapper around a ``System`` (or a DSPy ``ProgramSystem``) that takes
the reward model. The system knows nothing of rewards; it lets a *step hook* make one component's step
(``System.run(..., hooks=)``), and this module's hook is best-of-N:

    best = BestOfN(system, rm, {"route": 4}, temperature=0.7)
    trace = best.run(example, seed=3)               # trace.step("route").best_of: candidates, scores, chosen
    result = best.evaluate(testset, workers=8)      # as System.evaluate

Component ``name`` is called N times on the same inputs: the plain call (the run's seed, the component's own
decoding) and N-1 samples under seeds ``seed + 7919 r`` at ``temperature`` (LM calls through
``Component.generate`` sample at least that hot, so greedy components give distinct candidates). The distinct
candidates (by their rendered text, ``optimas_fast.render``) are scored by ``reward.score`` (the component's LRF
head) in one batched call and the highest-scored one goes downstream (ties keep the earliest, i.e. the plain
output); failed candidates are dropped, and the step fails only when all do. The step pays for every
candidate's LM usage. N=1 is the plain run (no reward needed). ``reward`` is anything with
``score(rows) -> (rows,)`` over (component, inputs text, outputs text) rows, e.g. an
``optimas_fast.reward.RewardModel``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from optimas_fast._validate import check_int, check_number
from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.optimize.config import ConfigError
from optimas_fast.render import render_inputs, render_outputs
from optimas_fast.system import Component, EvalResult, LMComponent, RunContext, System, Trace
from optimas_fast.system.context import usage_scope
from optimas_fast.system.system import call_component

__all__ = ["BestOfN", "SEED_STRIDE", "parse_best_of"]

SEED_STRIDE = 7919  # candidate r samples under seed + r * stride (the stride preference collection's resamples use)


class BestOfN:
    """``system`` whose components in ``best_of`` ({name: N}) each pick the best of N candidate outputs by
    ``reward``; see the module docstring. ``system`` is used as it is (never copied or changed).

    Errors at construction, naming the argument: an unknown component, N not an int >= 1, no ``reward`` (or
    one without ``score``) while some N > 1, a reward model without a head for a component, a temperature
    outside (0, 2].
    """

    def __init__(
        self, system: System, reward: Any = None, best_of: Mapping[str, int] | None = None, *, temperature: float = 0.7
    ):
        if not isinstance(system, System):
            raise TypeError(f"BestOfN(system): expected an optimas_fast.system.System, got {type(system).__name__}")
        if best_of is None:
            best_of = {}
        if not isinstance(best_of, Mapping):
            raise TypeError(f"best_of must be a dict {{component: N}}, got {type(best_of).__name__}")
        plan = {}
        for name, n in best_of.items():
            if not isinstance(name, str) or name not in system.components:
                raise ValueError(
                    f"best_of: no component named {name!r} in system '{system.name}' (has {list(system.components)})"
                )
            check_int(n, f"best_of[{name!r}]", min=1)
            if n > 1:
                plan[name] = n
        if plan:
            if reward is None:
                raise ValueError(f"best_of {plan} needs reward= (a reward model with score(rows), e.g. the run's LRF)")
            if not callable(getattr(reward, "score", None)):
                raise TypeError(f"best_of: reward must have a score(rows) method, got {type(reward).__name__}")
            heads = getattr(reward, "components", None)
            if heads is not None:
                missing = [n for n in plan if n not in heads]
                if missing:
                    raise ValueError(f"best_of: the reward model has no head for {missing} (its heads: {list(heads)})")
        check_number(temperature, "temperature", gt=0, max=2)
        self.system = system
        self.reward = reward
        self.plan = plan  # component -> N, the components with N > 1 only
        self.temperature = float(temperature)
        # reward models are not thread-safe (token cache, bf16 copy); evaluate's workers take turns scoring,
        # which is compute-bound anyway. One lock per wrapper: two wrappers never share a reward model here.
        self._lock = threading.Lock()

    @property
    def hooks(self) -> dict[str, BestOfN]:
        """The step hooks handed to ``System.run``: this wrapper for every component with N > 1."""
        return {name: self for name in self.plan}

    def run(
        self,
        example: Mapping[str, Any],
        overrides: Mapping[str, Any] | None = None,
        *,
        seed: int | None = None,
        score: bool = True,
    ) -> Trace:
        """``System.run`` with best-of-N steps; the trace's steps record what was tried (``step.best_of``)."""
        return self.system.run(example, overrides, seed=seed, score=score, hooks=self.hooks)

    def evaluate(
        self,
        examples: Iterable[Mapping[str, Any]],
        *,
        workers: int = 1,
        overrides: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> EvalResult:
        """``System.evaluate`` with best-of-N steps."""
        return self.system.evaluate(examples, workers=workers, overrides=overrides, seed=seed, hooks=self.hooks)

    def __call__(self, c: Component, inputs: dict, var: Any, ctx: RunContext) -> tuple[dict, dict]:
        """The step hook: (the best of N candidate outputs of ``c`` by the reward, what was tried)."""
        n = self.plan[c.name]
        cands: list[dict] = []
        first_exc: Exception | None = None
        failed = 0
        for r in range(n):
            try:
                if r == 0:  # the plain call, in the step's own scope
                    cands.append(call_component(c, inputs, var))
                    continue
                with usage_scope(c.name, (ctx.seed or 0) + SEED_STRIDE * r, temperature=self.temperature) as sub:
                    try:
                        cands.append(call_component(c, inputs, var))
                    finally:
                        ctx.usage += sub.usage  # the step pays for every candidate
            except BudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 — a failed candidate is dropped; all failing fails the step
                failed += 1
                first_exc = first_exc or exc
        if not cands:
            raise first_exc  # type: ignore[misc]
        unique: dict[str, dict] = {}
        for out in cands:
            unique.setdefault(render_outputs(c, out), out)
        texts = list(unique)
        scores: list[float] = []
        chosen = 0
        if len(texts) > 1:
            x_text = render_inputs(c, inputs)
            with self._lock:
                raw = self.reward.score([(c.name, x_text, t) for t in texts])  # one batched call: (len(texts),)
            scores = [float(v) for v in (raw.tolist() if hasattr(raw, "tolist") else raw)]
            if len(scores) != len(texts):
                raise ValueError(f"best_of: reward.score returned {len(scores)} scores for {len(texts)} rows")
            finite = [v if math.isfinite(v) else -math.inf for v in scores]
            chosen = max(range(len(texts)), key=lambda i: (finite[i], -i))  # ties: the earliest (plain) one
        info = {"n": n, "candidates": [unique[t] for t in texts], "scores": scores, "chosen": chosen, "failed": failed}
        return unique[texts[chosen]], info


def parse_best_of(specs: list[str] | None, system: System, targets: list[str] | None) -> dict[str, int]:
    """``--best-of`` values: ``N`` (every optimizable LM component; ``targets`` narrows them to the run's
    optimized ones) or ``name=N``, repeatable, later ones winning. ConfigError naming a bad value."""
    out: dict[str, int] = {}
    lm_comps = [
        n
        for n in system.order
        if isinstance(system.components[n], LMComponent)
        and system.components[n].variables()
        and (targets is None or n in targets)
    ]
    for spec in specs or []:
        name, eq, value = spec.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1 or value.strip() != str(n):
            raise ConfigError(f"--best-of {spec!r}: N must be an int >= 1 (as 'N' or 'component=N')")
        if not eq:
            if not lm_comps:
                raise ConfigError(
                    f"--best-of {spec!r}: system has no optimizable LM component; name one with "
                    f"'component=N' (components: {list(system.order)})"
                )
            out.update({c: n for c in lm_comps})
        elif name not in system.components:
            raise ConfigError(f"--best-of {spec!r}: no component {name!r} (components: {list(system.order)})")
        elif not system.components[name].variables():
            raise ConfigError(f"--best-of {spec!r}: {name!r} has no variable, so the LRF has no head for it")
        else:
            out[name] = n
    return out
