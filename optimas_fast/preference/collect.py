"""Preference collection for one component (DESIGN.md section 1, steps 1-3).

For each example of a mini-batch:

1. run the system with the current configuration and read the component's recorded input x;
2. produce candidate outputs of the component for x: the current output, the outputs of K-1 variables
   drawn from its search space (``sample_variants``), and optionally re-samples of the current variable
   under other seeds (only differs for components that sample); duplicates (same rendered text) merge;
   an example with fewer than 2 distinct candidates is skipped;
3. for each candidate run the downstream components R times with distinct seeds and average the metric
   (a component without descendants is scored once: rerunning nothing gives the same number again).

Examples run on ``workers`` threads (each with a copy of the caller's context, so usage attribution and
ledgers follow), which is what lets a batching LM backend decode many of them together. Everything random
is drawn up front, in example order, from the caller's ``random.Random``: results do not depend on thread
timing.
"""

from __future__ import annotations

import contextvars
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from optimas_fast._validate import check_int
from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.preference.pairs import PairStore, build_pairs
from optimas_fast.render import render_inputs, render_outputs
from optimas_fast.reward import PreferencePair
from optimas_fast.system import Choice, Prompt, System, Variable, Weights

__all__ = ["CollectConfig", "CollectResult", "collect_preferences", "sample_variants", "example_key"]

log = logging.getLogger(__name__)

STRATEGIES = ("variables", "resample", "both")


@dataclass
class CollectConfig:
    num_candidates: int = 4  # K: candidate outputs per input (current output included)
    rollouts: int = 1  # R: downstream rollouts per candidate, averaged (1 for the last component)
    strategy: str = "variables"  # "variables" (draw from the search space) | "resample" (other seeds) | "both"
    weights_noise: float = 0.05  # std of the Gaussian noise of Weights variants, relative to each tensor's std
    workers: int = 4  # example threads (a batching LM backend decodes concurrent requests together)

    def validate(self) -> None:
        check_int(self.num_candidates, "num_candidates", min=2)
        check_int(self.rollouts, "rollouts", min=1)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if not self.weights_noise >= 0:
            raise ValueError(f"weights_noise must be >= 0, got {self.weights_noise!r}")
        check_int(self.workers, "workers", min=1)


@dataclass
class CollectResult:
    """What one collection produced."""

    component: str
    pairs: list[PreferencePair] = field(default_factory=list)  # every pair (train and held-out examples)
    train_pairs: list[PreferencePair] = field(default_factory=list)  # pairs of non-held-out examples
    n_examples: int = 0  # examples tried
    n_groups: int = 0  # examples that gave >= 2 distinct candidates
    n_skipped: int = 0  # examples skipped (failed run, < 2 candidates)
    mean_gap: float = 0.0  # mean over groups of (best - worst) reward: how much this component's output matters
    mean_margin: float = 0.0  # mean pair margin


def example_key(example: Mapping[str, Any], index: int) -> str:
    """A stable key for an example: its "id" field when it has one, else its position."""
    ex_id = example.get("id") if isinstance(example, Mapping) else None
    return f"id:{ex_id}" if ex_id is not None else f"pos:{index}"


def _perturbed(w: Weights, noise: float, gen: torch.Generator) -> Weights:
    new = w.copy()
    if new.module is None or noise == 0:
        return new
    with torch.no_grad():
        for p in new.module.parameters():
            scale = float(p.detach().float().std()) if p.numel() > 1 else abs(float(p.detach().float().mean()))
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * noise * (scale or 1.0))
    return new


def _variant_of(var: Variable, rng: random.Random, prompt_pool: Sequence[str], noise: float) -> Variable | None:
    if isinstance(var, Choice):
        # sample() returns the whole space, in order, when asked for all of it: pick at random among those
        picks = [c for c in var.sample(min(var.size(), 8), rng) if c != var]
        return rng.choice(picks) if picks else None
    if isinstance(var, Prompt):
        pool = [p for p in prompt_pool if p != var.text]
        return Prompt(rng.choice(pool)) if pool else None
    if isinstance(var, Weights):
        return _perturbed(var, noise, torch.Generator().manual_seed(rng.randrange(2**31)))
    return None


def sample_variants(
    current: Variable | dict | None,
    k: int,
    rng: random.Random,
    prompt_pool: Mapping[str, Sequence[str]] | None = None,
    noise: float = 0.05,
    address: str = "",
) -> list[Any]:
    """Up to ``k`` overrides of a component's variable (a Variable, or a {key: Variable} dict), distinct
    from the current one where the space allows. ``prompt_pool``: alternative instructions per address."""
    prompt_pool = prompt_pool or {}
    if current is None or k <= 0:
        return []
    out: list[Any] = []
    seen: set = set()
    for _ in range(4 * k):  # a few tries: small spaces run out of distinct values
        if len(out) >= k:
            break
        if isinstance(current, Variable):
            v = _variant_of(current, rng, prompt_pool.get(address, ()), noise)
            if v is None:
                break
            key = id(v) if isinstance(v, Weights) else v
        else:
            v = {}
            for name, var in current.items():
                alt = _variant_of(var, rng, prompt_pool.get(f"{address}.{name}", ()), noise)
                # vary each key with probability 1/2 so that single-key effects show up too
                if alt is not None and rng.random() < 0.5:
                    v[name] = alt
            if not v:
                continue
            key = tuple(sorted((n, id(x) if isinstance(x, Weights) else x) for n, x in v.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append(v)
    return out


def _one_example(
    system: System, name: str, example: Mapping, seed: int, variants: list, cfg: CollectConfig
) -> tuple[dict, list[tuple[str, float]]] | None:
    """(component inputs, [(rendered output, mean reward)]) for one example, or None when skipped."""
    comp = system.components[name]
    trace = system.run(example, seed=seed)
    try:
        step = trace.step(name)
    except KeyError:
        return None
    if step.outputs is None:
        return None
    x = dict(step.inputs)
    cands: list[dict] = [dict(step.outputs)]
    for v in variants:
        try:
            cands.append(system.run_component(name, x, variable=v, seed=seed))
        except BudgetExceeded:
            raise
        except Exception as exc:  # noqa: BLE001 — a variant that fails is just not a candidate
            log.debug("collect: variant of %s failed: %s", name, exc)
    if cfg.strategy in ("resample", "both"):
        for r in range(1, cfg.num_candidates):
            try:
                cands.append(system.run_component(name, x, seed=seed + 7919 * r))
            except BudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001
                log.debug("collect: resample of %s failed: %s", name, exc)
    unique: dict[str, dict] = {}
    for c in cands:
        unique.setdefault(render_outputs(comp, c), c)
    if len(unique) < 2:
        return None
    rollouts = cfg.rollouts if system.descendants(name) else 1
    scored = []
    for text, outputs in unique.items():
        total = 0.0
        for r in range(rollouts):
            t = system.run_downstream(name, outputs, trace, seed=seed + 104729 * (r + 1))
            total += float(t.score or 0.0)
        scored.append((text, total / rollouts))
    return x, scored


def collect_preferences(
    system: System,
    name: str,
    examples: Sequence[Mapping],
    rng: random.Random,
    config: CollectConfig | None = None,
    store: PairStore | None = None,
    prompt_pool: Mapping[str, Sequence[str]] | None = None,
    keys: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> CollectResult:
    """Preference pairs for component ``name`` on ``examples`` (see the module docstring).

    ``store`` (optional) receives every scored group; ``keys`` are the examples' stable keys (default
    ``example_key``); ``progress(n)`` is called as examples finish (for progress bars).
    """
    cfg = config or CollectConfig()
    cfg.validate()
    if name not in system.components:
        raise ValueError(f"collect_preferences: no component {name!r} (has {list(system.components)})")
    comp = system.components[name]
    examples = list(examples)
    keys = list(keys) if keys is not None else [example_key(e, i) for i, e in enumerate(examples)]
    n_var = cfg.num_candidates - 1 if cfg.strategy in ("variables", "both") else 0
    # draw everything random now, in example order: the threads below must not touch rng
    plan = []
    for _ in examples:
        seed = rng.randrange(2**31)
        plan.append((seed, sample_variants(comp.variable, n_var, rng, prompt_pool, cfg.weights_noise, name)))

    def task(i: int):
        return _one_example(system, name, examples[i], plan[i][0], plan[i][1], cfg)

    if cfg.workers == 1 or len(examples) <= 1:
        results = []
        for i in range(len(examples)):
            results.append(task(i))
            if progress:
                progress(1)
    else:
        with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="optimas-collect") as pool:
            futures = [pool.submit(contextvars.copy_context().run, task, i) for i in range(len(examples))]
            results = []
            for f in futures:  # in order; a BudgetExceeded in any example surfaces here
                results.append(f.result())
                if progress:
                    progress(1)

    res = CollectResult(component=name, n_examples=len(examples))
    gaps, margins = [], []
    for key, r in zip(keys, results):
        if r is None:
            res.n_skipped += 1
            continue
        x, scored = r
        text_in = render_inputs(comp, x)
        if store is not None:
            pairs = store.add_group(name, key, text_in, scored, raw_inputs=x)
            held = store.held_out(key)
        else:
            pairs, held = build_pairs(name, text_in, scored), False
        res.n_groups += 1
        rewards = [s for _, s in scored]
        gaps.append(max(rewards) - min(rewards))
        margins += [p.margin for p in pairs]
        res.pairs += pairs
        if not held:
            res.train_pairs += pairs
    res.mean_gap = sum(gaps) / len(gaps) if gaps else 0.0
    res.mean_margin = sum(margins) / len(margins) if margins else 0.0
    log.info(
        "collect %s: %d examples, %d groups, %d pairs (%d train), mean gap %.3f",
        name,
        res.n_examples,
        res.n_groups,
        len(res.pairs),
        len(res.train_pairs),
        res.mean_gap,
    )
    return res
