"""Acceptance runs of the Optimas loop: optimized vs unoptimized on each example system (held-out test split,
fixed seed, bootstrap CIs), and the ablation LRF-guided Optimas vs global-metric-only random search with the
same budget (wall time; LM calls reported for both).

    python benchmarks/run_examples.py --systems amazon pubmedqa hotpotqa --ablation amazon \
        --train 24 --val 12 --test 24 --iterations 4 --out /tmp/optimas-bench --write-results

Random search (the ablation's baseline) uses the same variables and candidate generators as the loop's
preference collection (Choice: a random configuration; Weights: Gaussian noise; Prompt: a proposer rewrite
without any score feedback), evaluates each sampled change on the validation set and keeps it when the
validation score is not lower (the loop's own gate and tie rule), until the Optimas run's wall time is spent.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
from _common import git_rev, machine

from optimas_fast.demo import DEMO_CONFIG
from optimas_fast.lm.usage import UsageLedger, set_default_ledger
from optimas_fast.optimize import Optimas
from optimas_fast.optimizers import PromptOptimizer
from optimas_fast.preference import sample_variants
from optimas_fast.report import bootstrap_ci, write_report
from optimas_fast.run import build, evaluate_with_bar, parse_config
from optimas_fast.system import Prompt

log = logging.getLogger("run_examples")

# per-system components to optimize (None: all) and what is skipped to fit the CPU budget, with why
TARGETS = {
    "amazon": ["candidate_scorer", "final_decider"],  # the summariser's prompt re-runs the slowest LM step
    "pubmedqa": None,
    "hotpotqa": None,
    "codegen": None,  # bench_best_of.py --systems codegen (run_codegen.py is its optimisation script)
}


def paired_diff_ci(before, after, seed=0, n_boot=2000):
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(1)
    return {"mean": float(d.mean()), "lo": float(np.quantile(means, 0.025)), "hi": float(np.quantile(means, 0.975))}


def config_for(system, args):
    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["system"] = system
    raw["data"] = {"seed": args.seed, "train": args.train, "val": args.val, "test": args.test}
    raw["loop"]["iterations"] = args.iterations
    raw["loop"]["seed"] = args.seed
    raw["loop"]["components"] = TARGETS[system]
    raw["loop"]["budget"] = {"max_seconds": args.max_seconds}
    if args.gate_confidence is not None:
        raw["loop"]["gate_confidence"] = args.gate_confidence
    return raw


def optimas_run(system_name, args, out):
    raw = config_for(system_name, args)
    cfg = parse_config(raw)
    system, split, rm, proposer = build(cfg)
    initial_state = system.state_dict()
    t0 = time.perf_counter()
    before = evaluate_with_bar(
        system, split.test, desc=f"{system_name} test before", workers=cfg.loop.val_workers, seed=cfg.loop.seed
    )
    t_eval = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = Optimas(rm, proposer, cfg.loop, progress=True).optimize(system, split.train, split.val, run_dir=out)
    loop_seconds = time.perf_counter() - t1
    after = evaluate_with_bar(
        res.system, split.test, desc=f"{system_name} test after", workers=cfg.loop.val_workers, seed=cfg.loop.seed
    )
    extra = {
        "test_before": bootstrap_ci(before, seed=args.seed),
        "test_after": bootstrap_ci(after, seed=args.seed),
        "test_diff": paired_diff_ci(before, after, seed=args.seed),
    }
    write_report(out, extra=extra)
    return {
        "system": system_name,
        "before": extra["test_before"],
        "after": extra["test_after"],
        "diff": extra["test_diff"],
        "val": [res.initial_val, res.best_val],
        "loop_seconds": loop_seconds,
        "test_eval_seconds": t_eval,
        "lm_calls": res.usage["total"]["calls"],
        "stopped": res.stopped,
        "iterations": len(res.history) - 1,
        "sizes": [len(split.train), len(split.val), len(split.test)],
        "accepted": sum(1 for h in res.history if h.get("accepted")),
    }, (system, split, cfg, initial_state, proposer, loop_seconds)


def random_search(system, split, cfg, initial_state, proposer, seconds, seed):
    """Global-metric-only random search over the same variables, for ``seconds`` of wall time."""
    system.load_state_dict(initial_state)
    ledger = UsageLedger()
    prev = set_default_ledger(ledger)
    try:
        rng = random.Random(f"{seed}:random-search")
        names = cfg.loop.components or [n for n in system.order if system.components[n].variables()]
        prompt_opt = PromptOptimizer(proposer, cfg.loop.prompt)
        best = system.evaluate(split.val, workers=cfg.loop.val_workers, seed=cfg.loop.seed).mean
        t0, tries, accepted = time.perf_counter(), 0, 0
        while time.perf_counter() - t0 < seconds:
            name = rng.choice(names)
            comp = system.components[name]
            overrides = {}
            for address, var in comp.variables().items():
                if isinstance(var, Prompt):
                    x = (
                        comp.format_inputs(split.train[0], 300)
                        if all(f in split.train[0] for f in comp.inputs)
                        else comp.description
                    )
                    props = prompt_opt.propose(comp, address, var.text, x, 1, rng)
                    if props:
                        overrides[address] = Prompt(props[0])
                else:
                    v = sample_variants(var, 1, rng, noise=cfg.loop.collect.weights_noise)
                    if v:
                        overrides[address] = v[0]
            if not overrides:
                continue
            tries += 1
            score = system.evaluate(
                split.val, workers=cfg.loop.val_workers, overrides=overrides, seed=cfg.loop.seed
            ).mean
            if score >= best:
                for a, v in overrides.items():
                    system.set_variable(a, v)
                best, accepted = score, accepted + 1
        after = system.evaluate(split.test, workers=cfg.loop.val_workers, seed=cfg.loop.seed).scores
        return {
            "tries": tries,
            "accepted": accepted,
            "val_best": best,
            "test": bootstrap_ci(after, seed=seed),
            "lm_calls": ledger.total.calls,
            "seconds": time.perf_counter() - t0,
        }, after
    finally:
        set_default_ledger(prev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="+", default=["amazon", "pubmedqa", "hotpotqa"])
    p.add_argument("--ablation", default="amazon", help="system for the random-search ablation ('' to skip)")
    p.add_argument("--train", type=int, default=24)
    p.add_argument("--val", type=int, default=12)
    p.add_argument("--test", type=int, default=24)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=900, help="wall budget of each Optimas loop")
    p.add_argument(
        "--gate-confidence",
        type=float,
        default=None,
        help="loop.gate_confidence (paired-bootstrap validation gate); default: off",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/optimas-bench")
    p.add_argument("--json", default=None, help="append one JSON line per result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.systems:
        t0 = time.perf_counter()
        row, ctx = optimas_run(name, args, Path(args.out) / name)
        row["total_seconds"] = time.perf_counter() - t0
        if name == args.ablation:
            system, split, cfg, init, proposer, loop_seconds = ctx
            rs, _ = random_search(system, split, cfg, init, proposer, loop_seconds, args.seed)
            row["random_search"] = rs
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"machine": machine(), "rev": git_rev(), **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
