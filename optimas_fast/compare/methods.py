"""The compared methods, one function each, one signature: ``method(cell) -> MethodResult``.

Every method receives a ``Cell``: a freshly built system whose metric already sits behind the cell's
``MetricCounter`` (``cell.counter``; the harness put it there), the data split, a fresh reward model, the
proposer LM, the run config and the seed. A method spends metric calls only through ``cell.system`` (or copies
of it, which share the counted metric), so the counter sees every one and stops the method with
``MetricBudgetExceeded`` the moment the next call would go over the budget. Each method records its anytime
curve (metric calls spent, best validation score so far) with ``cell.point``.

- ``unoptimized``: the system as configured (its validation score is measured outside the budget, as the
  reference line of the plot).
- ``optimas``: this project's loop with ``budget.max_metric_calls`` = the budget and enough iterations to
  spend it.
- ``global``: the no-local-reward ablation: the loop's proposer and candidate generators (prompt proposals by
  the same ``PromptOptimizer``, Choice values from the variable's own space), but each candidate is scored by
  the **global metric** on ``optimizer_inputs`` training examples (full runs), then the same validation gate.
- ``random``: random search over the joint space (every Choice drawn from its space, every Prompt from the
  proposer's pool of rewrites, Weights as configured), each draw judged on the validation set.
- ``gepa`` and ``mipro`` live in their own modules.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimas_fast.optimize import Optimas
from optimas_fast.optimize.budget import MetricBudgetExceeded, MetricCounter
from optimas_fast.optimizers import PromptOptimizer
from optimas_fast.system import Choice, Prompt, System, Variable

__all__ = ["Cell", "MethodResult", "MethodSkipped", "run_unoptimized", "run_optimas", "run_global", "run_random"]

log = logging.getLogger(__name__)


class MethodSkipped(Exception):
    """A method that cannot run on this system/LM; the message says why (it goes into the report)."""


@dataclass
class Cell:
    """What one (system, method, seed) run gets from the harness."""

    system: System  # freshly built; its metric is counted by ``counter``
    train: list  # training examples
    val: list  # validation examples
    rm: Any  # a fresh reward model (only ``optimas`` trains it)
    proposer: Any  # the LM that writes prompt proposals (and reflections, for GEPA)
    config: Any  # the run config (optimas_fast.run.RunConfig) with loop.seed = seed
    seed: int  # the cell's seed
    budget: int  # metric calls
    counter: MetricCounter  # the cell's metric-call counter (limit = budget)
    work_dir: Path  # a folder the method may write into (the loop's run directory, GEPA's state)
    curve: list = field(default_factory=list)  # [(metric calls spent, best validation score so far)]

    @property
    def loop(self):
        return self.config.loop

    @property
    def workers(self) -> int:
        return self.config.loop.val_workers

    def point(self, best_val: float) -> None:
        """Records the anytime curve: ``best_val`` after the metric calls spent so far."""
        self.curve.append((self.counter.used, float(best_val)))

    def evaluate(self, system: System, examples: Sequence, overrides: Mapping | None = None) -> tuple[float, list]:
        """Mean and per-example scores of ``examples`` (each one a metric call)."""
        res = system.evaluate(examples, workers=self.workers, overrides=overrides, seed=self.seed)
        return res.mean, list(res.scores)

    def targets(self) -> list[str]:
        """The components the loop config optimizes (all with a variable, unless ``loop.components`` says)."""
        names = [n for n in self.system.order if self.system.components[n].variables()]
        return [n for n in names if self.loop.components is None or n in self.loop.components]


@dataclass
class MethodResult:
    system: System  # the configuration the method returns (test-evaluated by the harness)
    best_val: float  # its validation score, as the method measured it
    stopped: str | None = None  # why it ended before its own end (a budget), if it did
    info: dict = field(default_factory=dict)  # method-specific details (JSON-safe)
    extra: Any = None  # in-memory extras for the harness (e.g. the Optimas loop, for the LRF-vs-judge section)


# ------------------------------------------------------------------------------------------- unoptimized
def run_unoptimized(cell: Cell) -> MethodResult:
    # the reference line: measured without charging the budget (nothing is optimized)
    previous = cell.counter.limit
    cell.counter.limit = None
    try:
        val, _ = cell.evaluate(cell.system, cell.val)
    finally:
        cell.counter.limit = previous
        cell.counter.used = 0
    cell.curve.append((0, float(val)))
    return MethodResult(cell.system, val)


# ------------------------------------------------------------------------------------------- optimas
def run_optimas(cell: Cell) -> MethodResult:
    loop_cfg = dataclasses.replace(
        cell.loop,
        seed=cell.seed,
        # enough iterations to spend the budget: every iteration makes at least one metric call
        iterations=max(cell.loop.iterations, cell.budget),
        budget=dataclasses.replace(cell.loop.budget, max_metric_calls=cell.budget),
    )
    loop = Optimas(cell.rm, cell.proposer, loop_cfg, progress=False)
    res = loop.optimize(cell.system, cell.train, cell.val, run_dir=cell.work_dir / "optimas")
    for h in res.history:
        cell.curve.append((int(h.get("metric_calls", 0)), float(h["best_val"])))
    info = {
        "iterations": max(0, len(res.history) - 1),
        "loop_metric_calls": res.metric_calls,
        "accepted": sum(1 for h in res.history if h.get("accepted")),
    }
    return MethodResult(res.system, res.best_val, res.stopped, info, extra=loop)


# ------------------------------------------------------------------------------------------- shared helpers
def _proposer_or_skip(cell: Cell, addresses: Sequence[str], method: str):
    if addresses and cell.proposer is None:
        raise MethodSkipped(f"{method} needs a proposer LM for the Prompt variables {list(addresses)}")
    return PromptOptimizer(cell.proposer, cell.loop.prompt) if cell.proposer is not None else None


def _first_inputs(system: System, name: str, example: Mapping) -> dict:
    comp = system.components[name]
    return {f: example.get(f, "") for f in comp.inputs}


def _choice_candidates(var: Choice, k: int, rng: random.Random) -> list[Variable]:
    """Up to ``k`` values of ``var``'s space other than the current one (all of them when the space is small)."""
    if var.size() - 1 <= k:
        return [c for c in var.candidates() if c != var]
    return [c for c in var.sample(k + 1, rng) if c != var][:k]


def _best(scored: Sequence[tuple[Variable, float]]) -> tuple[Variable, float]:
    """Highest score; ties keep the earliest (the incumbent comes first)."""
    best = scored[0]
    for item in scored[1:]:
        if item[1] > best[1]:
            best = item
    return best


# ------------------------------------------------------------------------------------------- global
def run_global(cell: Cell) -> MethodResult:
    """The no-local-reward ablation (module docstring). Components are visited round-robin (there are no
    preference gaps to pick by); each visit, every Prompt/Choice variable of the component gets
    ``prompt.num_proposals`` candidates (proposer rewrites, or values of the Choice's space) scored with the
    incumbent on the same ``optimizer_inputs`` training examples by the global metric; the best goes through
    the validation gate (strictly higher keeps it, as in the loop). Weights stay as configured."""
    system = cell.system.copy()
    targets = cell.targets()
    rng = random.Random(f"{cell.seed}:global")
    addresses = [a for n in targets for a, v in system.components[n].variables().items() if v.kind == "prompt"]
    prompt_opt = _proposer_or_skip(cell, addresses, "global")
    k = cell.loop.prompt.num_proposals
    n_inputs = min(cell.loop.optimizer_inputs, len(cell.train))
    best_val, stopped, steps, accepted = float("nan"), None, 0, 0
    try:
        best_val, _ = cell.evaluate(system, cell.val)
        cell.point(best_val)
        while True:
            name = targets[steps % len(targets)]
            steps += 1
            batch = rng.sample(cell.train, n_inputs)
            for address, var in system.components[name].variables().items():
                if var.kind == "prompt":
                    texts = prompt_opt.propose(
                        system.components[name],
                        address,
                        var.text,
                        system.components[name].format_inputs(batch[0], 400),
                        k,
                        rng,
                    )
                    cands: list[Variable] = [Prompt(t) for t in texts]
                elif var.kind == "choice":
                    cands = _choice_candidates(var, k, rng)
                else:
                    continue  # Weights: no global-metric optimizer (it would cost a full run per ES sample)
                if not cands:
                    continue
                scored = [(c, cell.evaluate(system, batch, {address: c})[0]) for c in [var] + cands]
                if var.kind == "prompt":  # the proposer sees the scored history, as in Optimas (OPRO)
                    hist = prompt_opt.history.setdefault(address, [])
                    hist += [(c.text, s) for c, s in scored if c.text not in {t for t, _ in hist}]
                cand, _ = _best(scored)
                if cand is var:
                    continue
                v, _ = cell.evaluate(system, cell.val, {address: cand})
                if v > best_val:
                    system.set_variable(address, cand)
                    best_val, accepted = v, accepted + 1
                cell.point(best_val)
    except MetricBudgetExceeded as exc:
        stopped = str(exc)
    return MethodResult(system, best_val, stopped, {"steps": steps, "accepted": accepted})


# ------------------------------------------------------------------------------------------- random
def run_random(cell: Cell) -> MethodResult:
    """Random search (module docstring): draw i is a joint configuration, judged by its validation score; the
    best one so far is kept (ties keep the earlier). Draws already tried are skipped; a joint space smaller
    than the budget is enumerated at most once."""
    system = cell.system.copy()
    targets = cell.targets()
    rng = random.Random(f"{cell.seed}:random")
    variables = {a: v for n in targets for a, v in system.components[n].variables().items()}
    prompts = [a for a, v in variables.items() if v.kind == "prompt"]
    prompt_opt = _proposer_or_skip(cell, prompts, "random")
    pools: dict[str, list[Variable]] = {}
    for address, var in variables.items():
        if var.kind == "prompt":
            name = address.split(".")[0]
            texts = prompt_opt.seed_pool(
                system.components[name],
                address,
                _first_inputs(system, name, cell.train[0]),
                cell.loop.prompt.num_proposals,
                rng,
            )
            pools[address] = [var] + [Prompt(t) for t in texts]
        elif var.kind == "choice":
            pools[address] = list(var.candidates()) if var.size() <= 256 else None  # None: sample each draw
    joint = 1
    for address, pool in pools.items():
        joint *= pool.__len__() if pool is not None else variables[address].size()
    best: dict[str, Variable] = {}
    best_val, stopped, draws = float("nan"), None, 0
    tried = set()
    try:
        best_val, _ = cell.evaluate(system, cell.val)
        cell.point(best_val)
        tried.add(tuple(sorted((a, v.describe()) for a, v in variables.items() if a in pools)))
        misses = 0
        while len(tried) < joint and misses < 1000:
            draw = {}
            for address, pool in pools.items():
                var = variables[address]
                draw[address] = rng.choice(pool) if pool is not None else var.sample(1, rng)[0]
            key = tuple(sorted((a, v.describe()) for a, v in draw.items()))
            if key in tried:
                misses += 1
                continue
            tried.add(key)
            misses = 0
            draws += 1
            v, _ = cell.evaluate(system, cell.val, draw)
            if v > best_val:
                best_val, best = v, draw
            cell.point(best_val)
    except MetricBudgetExceeded as exc:
        stopped = str(exc)
    for address, var in best.items():
        system.set_variable(address, var)
    return MethodResult(system, best_val, stopped, {"draws": draws, "joint_space": joint})


METHOD_FUNCTIONS: dict[str, Callable[[Cell], MethodResult]] = {
    "unoptimized": run_unoptimized,
    "optimas": run_optimas,
    "global": run_global,
    "random": run_random,
}
