"""The Optimas loop (DESIGN.md section 1, "The loop").

    result = Optimas(reward_model, proposer_lm, OptimasConfig(iterations=10)).optimize(
        system, trainset, valset, run_dir="runs/x")          # resume: ..., resume_from="runs/x"
    optimized = result.system                                # a new System; ``system`` is left as it was

``optimize`` follows DSPy's convention: it works on ``system.copy()`` (independent variables; LM clients,
caches and indexes shared) and returns that copy in ``result.system``, so the system passed in keeps its
configuration. The reward model is the loop's own and is trained in place.

Start (iteration 0): measure the validation score of the initial configuration, collect preference pairs
for every optimized component on ``initial_examples`` training examples, and train the LRF on them.

Iteration t = 1..T:
1. pick a component: softmax over each component's running preference gap (mean best-minus-worst reward
   of its candidates, an EMA updated from every fresh collection) at ``selection_temperature``, excluding
   the ones picked in the last ``cooldown`` iterations;
2. collect fresh pairs for it on ``batch_size`` training examples (pairs of held-out examples are stored,
   never trained on);
3. adapt the LRF on the fresh pairs plus replay (optimizer state kept across iterations);
4. alignment monitor: every head's held-out pairwise accuracy and rank correlation with the measured
   reward; a head below ``alignment_threshold`` (accuracy) or ``min_spearman`` (rank correlation), with
   enough held-out pairs, logs a warning and is re-trained on its stored pairs;
5. optimize each of the component's variables against its head (prompt / choice / weights optimizer);
6. validation gate: each changed variable (in order of its LRF gain) is evaluated on the validation set on
   top of the changes accepted before it, and kept only if the score is **strictly higher** than the best so
   far. **Tie rule**: a tie keeps the incumbent (a change the validation set cannot tell apart from the
   current configuration is not worth the drift: on small validation sets most ties are changes to
   variables that the current configuration does not even use). With ``gate_confidence`` set, a higher
   score must also be likely to be real: in a paired bootstrap over the validation examples the change must
   beat the incumbent in at least that share of resamples (small validation sets make single-example
   gains common; a proposer that writes noise then gets it accepted). LRF updates are kept either way;
7. checkpoint the run state atomically (see ``state.py``).

Budgets: LM calls / tokens / $ are enforced by the LM layer's ledger (``BudgetExceeded`` before anything is
sent); metric calls (``budget.max_metric_calls``: scored runs of the system or of a downstream part, counted by
a ``MetricCounter`` in front of the working copy's metric, see ``budget.py``) the same way, before the metric
runs; wall time is checked at iteration boundaries. A budget hit inside an iteration abandons that
iteration: the system and LRF are restored from the last checkpoint (the usage stays counted) and the run
stops with ``stopped`` saying why. A budget hit during the initial phase saves the starting point (phase
"initial"); resuming runs the initial phase again, its earlier LM calls replayed from the cache. Everything
is deterministic given ``config.seed``.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimas_fast.lm.cache import default_cache_dir
from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.lm.usage import UsageLedger, set_default_ledger
from optimas_fast.optimize.budget import MetricCounter, attach, detach
from optimas_fast.optimize.config import OptimasConfig
from optimas_fast.optimize.state import load_run_state, save_run_state
from optimas_fast.optimizers import (
    ChoiceOptimizer,
    Optimizer,
    OptimizerBudget,
    PromptOptimizer,
    WeightsOptimizer,
)
from optimas_fast.preference import CollectResult, PairStore, collect_preferences, example_key
from optimas_fast.system import System

__all__ = ["Optimas", "OptimasResult", "select_component", "prob_better"]

log = logging.getLogger(__name__)


@dataclass
class OptimasResult:
    system: System  # the optimized system: a copy of the input with the accepted configuration (input unchanged)
    history: list[dict]  # one record per iteration (0 = initial training)
    initial_val: float  # validation score of the starting configuration
    best_val: float  # validation score of the returned configuration
    stopped: str | None  # None when all iterations ran, else why the run stopped (a budget)
    run_dir: str  # where run_state.json, the LRF checkpoint and the report are
    usage: dict = field(default_factory=dict)  # LM usage totals of the run (ledger state)
    metric_calls: int = 0  # scored runs the loop made (rollouts, validation passes), resumed sessions included


def select_component(
    gaps: Mapping[str, float], recent: Sequence[str], temperature: float, cooldown: int, rng: random.Random
) -> tuple[str, dict[str, float]]:
    """Softmax over preference gaps, components picked in the last ``cooldown`` iterations excluded (all
    eligible again if that would exclude everyone). Returns (pick, probabilities)."""
    names = sorted(gaps)
    if not names:
        raise ValueError("select_component: no components to choose from")
    blocked = set(recent[-cooldown:]) if cooldown > 0 else set()
    eligible = [n for n in names if n not in blocked] or names
    top = max(gaps[n] for n in eligible)
    w = [math.exp((gaps[n] - top) / temperature) for n in eligible]
    total = sum(w)
    probs = {n: wi / total for n, wi in zip(eligible, w)}
    u, acc = rng.random(), 0.0
    for n in eligible:
        acc += probs[n]
        if u < acc:
            return n, probs
    return eligible[-1], probs


class Optimas:
    """The loop; see the module docstring. ``reward_model`` is a ``optimas_fast.reward.RewardModel`` (heads
    for missing components are added), trained and adapted with its own settings (``rm.loops.config``, a
    ``TrainConfig``: learning rates, pairs per step, replay; ``reward.train:`` in a run's YAML): the loop decides
    when and on what the LRF trains (epochs, steps), never how; ``proposer`` is the LM that writes prompt
    candidates (only needed when a Prompt variable is optimized)."""

    def __init__(
        self, reward_model: Any, proposer: Any = None, config: OptimasConfig | None = None, progress: bool = False
    ):
        self.rm = reward_model
        self.proposer = proposer
        self.config = config or OptimasConfig()
        if not isinstance(self.config, OptimasConfig):
            raise TypeError(f"config must be an OptimasConfig, got {type(self.config).__name__}")
        self.config.validate()
        self.progress = progress
        self.optimizers: dict[str, Optimizer] = {
            "prompt": PromptOptimizer(proposer, self.config.prompt),
            "choice": ChoiceOptimizer(self.config.choice),
            "weights": WeightsOptimizer(self.config.weights),
        }

    # ------------------------------------------------------------------------------------------ helpers
    def _targets(self, system: System) -> list[str]:
        cfg = self.config
        with_vars = [n for n in system.order if system.components[n].variables()]
        if cfg.components is None:
            return with_vars
        for n in cfg.components:
            if n not in system.components:
                raise ValueError(f"config.components: no component {n!r}; allowed: {list(system.components)}")
            if n not in with_vars:
                raise ValueError(f"config.components: {n!r} has no variable to optimize; allowed: {with_vars}")
        return [n for n in system.order if n in cfg.components]

    def _evaluate(self, system: System, valset: Sequence[Mapping], overrides=None) -> tuple[float, list[float]]:
        """Validation mean and per-example scores (the gate's paired test needs them)."""
        res = system.evaluate(valset, workers=self.config.val_workers, overrides=overrides, seed=self.config.seed)
        return res.mean, list(res.scores)

    def _collect(self, system, name, trainset, idx, rng) -> CollectResult:
        prompt_opt = self.optimizers["prompt"]
        return collect_preferences(
            system,
            name,
            [trainset[i] for i in idx],
            rng,
            self.config.collect,
            self.store,
            prompt_pool=prompt_opt.pool(),
            keys=[example_key(trainset[i], i) for i in idx],
        )

    def _snapshot(self, system: System) -> dict:
        return {
            "system": system.state_dict(),
            "store": self.store.state_dict(),
            "gaps": dict(self.gaps),
            "recent": list(self.recent),
            "best_val": self.best_val,
            "initial_val": self.initial_val,
            "best_scores": self.best_scores,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "history": self.history,
            "usage": self.ledger.state_dict(),
            "elapsed": self._elapsed(),
            "metric_calls": self.metric_calls.used,
            "config": self.config.to_dict(),
            "stopped": self.stopped,
            # the LM completion cache lives outside the run (SQLite, shared across runs); a resumed run
            # replays identical LM calls from it when it points at the same place
            "lm_cache_dir": str(default_cache_dir()),
        }

    def _restore(self, system: System, state: dict, run_dir: Path) -> int:
        system.load_state_dict(state["system"])
        self.rm.load_state(run_dir / state["lrf_checkpoint"])
        self.store = PairStore.from_state(state["store"])
        self.gaps = dict(state["gaps"])
        self.recent = list(state["recent"])
        self.best_val, self.initial_val = state["best_val"], state["initial_val"]
        self.best_scores = state.get("best_scores")  # absent in states written before the paired gate
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"].get(k, {}))
        self.history = state["history"]
        self.ledger.load_state_dict(state["usage"])
        self.metric_calls.used = int(state.get("metric_calls", 0))  # absent in states written before the count
        self.elapsed, self.t_start = float(state["elapsed"]), time.perf_counter()
        self.stopped = state.get("stopped")
        return int(state["iteration"])

    def _alignment(self, targets: list[str]) -> tuple[dict, list[str]]:
        """Per-head held-out metrics, and the heads re-trained because they fell below the threshold."""
        cfg = self.config
        pairs = self.store.pairs(held_out=True)
        cands = [c for c in self.store.candidates(held_out=True) if c.component in targets]
        pairs = [p for p in pairs if p.component in targets]
        if not pairs and not cands:
            return {}, []
        metrics = self.rm.evaluate(pairs or None, cands) if pairs else {}
        per = metrics.get("per_component", {}) if metrics else {}
        retrained = []
        for comp in targets:
            m = per.get(comp)
            if not m or m["n_pairs"] < cfg.min_alignment_pairs:
                continue
            low_acc = m["accuracy"] < cfg.alignment_threshold
            # NaN alignment (no held-out group with two distinct rewards) is no evidence either way
            low_rho = cfg.min_spearman is not None and m["alignment"] < cfg.min_spearman
            if not (low_acc or low_rho):
                continue
            train_pairs = self.store.pairs(comp, held_out=False)
            log.warning(
                "alignment monitor: head %r held-out accuracy %.3f (threshold %.3f), alignment (Spearman) "
                "%.3f (threshold %s); re-training it on its %d stored pairs",
                comp,
                m["accuracy"],
                cfg.alignment_threshold,
                m["alignment"],
                cfg.min_spearman,
                len(train_pairs),
            )
            if train_pairs:
                self.rm.train(train_pairs, epochs=cfg.retrain_epochs)
                retrained.append(comp)
        clean = {
            c: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
            for c, m in per.items()
        }
        return clean, retrained

    def _elapsed(self) -> float:
        """Wall seconds of the run so far, earlier sessions of a resumed run included."""
        return self.elapsed + (time.perf_counter() - self.t_start)

    def _check_wall(self) -> str | None:
        limit = self.config.budget.max_seconds
        if limit is not None and self._elapsed() >= limit:
            return f"budget: max_seconds={limit:g} reached"
        return None

    # ------------------------------------------------------------------------------------------ the loop
    def optimize(
        self,
        system: System,
        trainset: Sequence[Mapping],
        valset: Sequence[Mapping],
        *,
        run_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
    ) -> OptimasResult:
        """Runs (or, with ``resume_from``, continues) the loop and returns an ``OptimasResult`` whose
        ``system`` is the optimized copy of ``system``; ``system`` itself is not changed."""
        cfg = self.config
        trainset, valset = list(trainset), list(valset)
        if not trainset or not valset:
            raise ValueError(f"optimize: trainset and valset must be non-empty (got {len(trainset)}, {len(valset)})")
        if resume_from is not None:
            run_dir = Path(resume_from)
        run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="optimas-run-"))
        targets = self._targets(system)
        system = system.copy()  # the caller's system stays as it was (DSPy's convention); we return the copy
        for name in targets:
            if name not in self.rm.encoder.components:
                self.rm.add_component(name, system.components[name].description or name)
        b = cfg.budget
        self.ledger = UsageLedger(b.lm_budget())
        # every scored run of the working copy is counted here (and stopped at max_metric_calls); the returned
        # system gets back the metric it came with
        self.metric_calls = MetricCounter(b.max_metric_calls)
        self._metrics = attach(system, self.metric_calls)
        self.store = PairStore(cfg.max_groups, cfg.holdout_fraction)
        self.gaps: dict[str, float] = {}
        self.recent: list[str] = []
        self.history: list[dict] = []
        self.best_val = self.initial_val = float("nan")
        self.best_scores: list[float] | None = None  # per-example validation scores of the incumbent
        self.elapsed = 0.0
        self.stopped: str | None = None
        previous_ledger = set_default_ledger(self.ledger)  # evaluate()'s worker threads see the default ledger
        self.t_start = time.perf_counter()
        try:
            start = 0
            if resume_from is not None:
                state = load_run_state(run_dir)
                start = self._restore(system, state, run_dir)
                # resuming is a request to go on: this config's budget applies (it may have been raised)
                self.ledger.budget, self.stopped = b.lm_budget(), None
                if state.get("phase") == "initial":
                    # a budget stopped the initial phase: run it again from the saved starting point; the
                    # calls it had made replay from the LM cache (free) when the cache is the same
                    log.info("resumed %s: the initial phase had not finished, running it again", run_dir)
                    if not self._initial(system, trainset, valset, targets, run_dir):
                        return self._finish(system, run_dir)
                else:
                    log.info("resumed %s at iteration %d (best val %.4f)", run_dir, start, self.best_val)
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                if not self._initial(system, trainset, valset, targets, run_dir):
                    return self._finish(system, run_dir)
            bar = _bar(self.progress, cfg.iterations, start, "optimas")
            for t in range(start + 1, cfg.iterations + 1):
                if self.stopped is not None:
                    break
                reason = self._check_wall()
                if reason:
                    self.stopped = reason
                    log.warning("stopping before iteration %d: %s", t, reason)
                    self._checkpoint(system, run_dir, t - 1)
                    break
                try:
                    self._iteration(system, trainset, valset, targets, t)
                except BudgetExceeded as exc:
                    log.warning("iteration %d stopped by the budget (%s): restoring iteration %d", t, exc, t - 1)
                    usage, elapsed, scored = self.ledger.state_dict(), self._elapsed(), self.metric_calls.used
                    self._restore(system, load_run_state(run_dir), run_dir)
                    self.ledger.load_state_dict(usage)  # what was spent stays spent
                    self.metric_calls.used = scored
                    self.elapsed, self.t_start = elapsed, time.perf_counter()
                    self.stopped = f"budget: {getattr(exc, 'limit', exc)} exhausted"
                    self._checkpoint(system, run_dir, t - 1)
                    break
                self._checkpoint(system, run_dir, t)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best=f"{self.best_val:.3f}", comp=self.history[-1]["component"])
            if bar is not None:
                bar.close()
            return self._finish(system, run_dir)
        finally:
            set_default_ledger(previous_ledger)

    def _checkpoint(self, system: System, run_dir: Path, iteration: int, phase: str = "loop") -> None:
        save_run_state(run_dir, dict(self._snapshot(system), phase=phase), self.rm, iteration)

    def _finish(self, system: System, run_dir: Path) -> OptimasResult:
        detach(system, self._metrics)
        system.save_state(run_dir / "system_state.json")
        usage = self.ledger.state_dict()
        return OptimasResult(
            system,
            self.history,
            self.initial_val,
            self.best_val,
            self.stopped,
            str(run_dir),
            usage,
            self.metric_calls.used,
        )

    def _initial(self, system, trainset, valset, targets, run_dir) -> bool:
        """Iteration 0. Returns False when a budget stopped it (nothing to resume from then)."""
        cfg = self.config
        t0 = time.perf_counter()
        rng = random.Random(f"{cfg.seed}:0")
        fresh_optimizer_states = {o.kind: o.state_dict() for o in self.optimizers.values()}
        bar = _bar(self.progress, 2 + len(targets), 0, "initial (val, pairs, LRF)")
        try:
            self.initial_val, self.best_scores = self._evaluate(system, valset)
            self.best_val = self.initial_val
            log.info("initial validation score %.4f", self.initial_val)
            if bar is not None:
                bar.update(1)
            n = min(cfg.initial_examples or len(trainset), len(trainset))
            self._seed_prompts(system, trainset, targets, rng)
            collected = {}
            pairs = []
            for name in targets:
                idx = sorted(rng.sample(range(len(trainset)), n))
                res = self._collect(system, name, trainset, idx, rng)
                self.gaps[name] = res.mean_gap
                pairs += res.train_pairs
                collected[name] = _collect_summary(res)
                if bar is not None:
                    bar.update(1)
            losses = []
            if pairs:
                hist = self.rm.train(pairs, epochs=cfg.initial_epochs)
                losses = [h["loss"] for h in hist]
            else:
                log.warning("initial collection produced no training pairs: the LRF starts untrained")
            alignment, retrained = self._alignment(targets)
            if bar is not None:
                bar.update(1)
                bar.close()
        except BudgetExceeded as exc:
            self.stopped = f"budget: {getattr(exc, 'limit', exc)} exhausted"
            log.warning(
                "the budget ran out during the initial phase (%s): nothing was optimized; `resume` with a "
                "larger budget runs the initial phase again",
                exc,
            )
            # save the starting point (the system is untouched: collection runs on overrides, and the LRF is
            # only trained after every LM call of the phase), with the usage spent, so the run can resume
            self.store = PairStore(cfg.max_groups, cfg.holdout_fraction)
            self.gaps, self.history = {}, []
            self.best_val = self.initial_val = float("nan")
            self.best_scores = None
            for o in self.optimizers.values():
                o.load_state_dict(fresh_optimizer_states[o.kind])
            self._checkpoint(system, run_dir, 0, phase="initial")
            return False
        self.history.append(
            {
                "iteration": 0,
                "component": None,
                "val_score": self.initial_val,
                "best_val": self.best_val,
                "accepted": None,
                "collect": collected,
                "train_loss_first": losses[0] if losses else None,
                "train_loss_last": losses[-1] if losses else None,
                "n_train_pairs": len(pairs),
                "alignment": alignment,
                "retrained": retrained,
                "gaps": dict(self.gaps),
                "proposals": [],
                "usage": self.ledger.state_dict()["total"],
                "metric_calls": self.metric_calls.used,
                "seconds": time.perf_counter() - t0,
            }
        )
        self._checkpoint(system, run_dir, 0)
        return True

    def _seed_prompts(self, system, trainset, targets, rng) -> None:
        """Unscored proposer rewrites of every optimized Prompt, so prompt components get candidates to compare."""
        if self.proposer is None:
            return
        prompt_opt = self.optimizers["prompt"]
        n = self.config.collect.num_candidates - 1
        for name in targets:
            comp = system.components[name]
            for address, var in comp.variables().items():
                if var.kind == "prompt" and not prompt_opt.pool().get(address):
                    example = {f: trainset[0].get(f, "") for f in comp.inputs}
                    texts = prompt_opt.seed_pool(comp, address, example, n, rng)
                    log.info("seeded %d prompt variants for %s", len(texts), address)

    def _iteration(self, system, trainset, valset, targets, t) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        rng = random.Random(f"{cfg.seed}:{t}")
        name, probs = select_component(self.gaps, self.recent, cfg.selection_temperature, cfg.cooldown, rng)
        self.recent.append(name)
        idx = sorted(rng.sample(range(len(trainset)), min(cfg.batch_size, len(trainset))))
        res = self._collect(system, name, trainset, idx, rng)
        if res.n_groups:
            self.gaps[name] = (1 - cfg.gap_ema) * self.gaps.get(name, 0.0) + cfg.gap_ema * res.mean_gap
        adapt_loss = None
        if res.train_pairs:
            hist = self.rm.adapt(res.train_pairs, steps=cfg.adapt_steps)
            adapt_loss = hist[-1]["loss"]
        alignment, retrained = self._alignment(targets)

        comp = system.components[name]
        inputs = self.store.inputs(name)[-4 * cfg.optimizer_inputs :]
        proposals = []
        # a head that has never seen a training pair scores at random: optimizing against it is noise that
        # the gate would reject at the price of a validation pass, so wait for its first pairs
        trained = bool(self.store.pairs(name))
        if not trained:
            log.info("iteration %d: %s's head has no training pairs yet; not optimizing it", t, name)
        if inputs and trained:
            for address, var in comp.variables().items():
                opt = self.optimizers[var.kind]
                proposals.append(
                    opt.optimize(
                        comp,
                        inputs,
                        self.rm,
                        OptimizerBudget(max_inputs=cfg.optimizer_inputs),
                        address=address,
                        rng=random.Random(f"{cfg.seed}:{t}:{address}"),
                    )
                )
        # validation gate, one variable at a time in order of LRF gain, each on top of those accepted before
        # it: a change that does not help on its own (e.g. the prompt of a policy that no longer calls the
        # LM) cannot ride along with one that does
        changed = sorted((p for p in proposals if p.changed), key=lambda p: -(p.score - p.incumbent_score))
        gate = []
        for p in changed:
            v, scores = self._evaluate(system, valset, {p.address: p.variable})
            ok = v > self.best_val  # tie rule: a tie keeps the incumbent (see the module docstring)
            entry = {"address": p.address, "val_score": v}
            if ok and cfg.gate_confidence is not None and self.best_scores is not None:
                entry["p_better"] = prob_better(scores, self.best_scores, random.Random(f"{cfg.seed}:{t}:gate"))
                ok = entry["p_better"] >= cfg.gate_confidence
            if ok:
                system.set_variable(p.address, p.variable)
                self.best_val, self.best_scores = v, scores
            gate.append({**entry, "accepted": ok})
        val = max((g["val_score"] for g in gate), default=None)
        accepted = any(g["accepted"] for g in gate)
        log.info(
            "iteration %d: %s, %d proposal(s) changed, val %s, best %.4f, %s",
            t,
            name,
            len(changed),
            "-" if val is None else f"{val:.4f}",
            self.best_val,
            "accepted" if accepted else ("rejected" if changed else "no change"),
        )
        self.history.append(
            {
                "iteration": t,
                "component": name,
                "probabilities": probs,
                "gaps": dict(self.gaps),
                "collect": _collect_summary(res),
                "adapt_loss": adapt_loss,
                "alignment": alignment,
                "retrained": retrained,
                "head_trained": trained,
                "proposals": [p.summary() for p in proposals],
                "val_score": val,
                "best_val": self.best_val,
                "accepted": accepted if changed else None,
                "gate": gate,
                "usage": self.ledger.state_dict()["total"],
                "metric_calls": self.metric_calls.used,
                "seconds": time.perf_counter() - t0,
            }
        )


def prob_better(new: Sequence[float], old: Sequence[float], rng: random.Random, n_boot: int = 2000) -> float:
    """Paired bootstrap: the share of resamples of the validation examples in which ``new`` scores a higher
    mean than ``old`` (ties count half). Per-example pairs keep the comparison on the same examples."""
    d = [a - b for a, b in zip(new, old)]
    if len(d) != len(old) or not d:
        raise ValueError(f"prob_better: {len(new)} and {len(old)} scores: the gate needs the same examples")
    n, wins = len(d), 0.0
    for _ in range(n_boot):
        total = sum(d[rng.randrange(n)] for _ in range(n))
        wins += 1.0 if total > 0 else (0.5 if total == 0 else 0.0)
    return wins / n_boot


def _collect_summary(res: CollectResult) -> dict:
    return {
        "examples": res.n_examples,
        "groups": res.n_groups,
        "skipped": res.n_skipped,
        "pairs": len(res.pairs),
        "train_pairs": len(res.train_pairs),
        "mean_gap": res.mean_gap,
        "mean_margin": res.mean_margin,
    }


def _bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)
