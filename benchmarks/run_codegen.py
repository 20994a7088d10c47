"""The HumanEval code-generation system: unoptimised pass rate on a slice of the test split, and optionally the
Optimas loop at a small size with the pass rate after it (same slice, same seed).

    python benchmarks/run_codegen.py --test 10                                  # unoptimised only
    python benchmarks/run_codegen.py --test 33 --train 24 --val 12 --iterations 4 --out /tmp/optimas-codegen
    python benchmarks/run_codegen.py --lm openai:<model>@<url> --test 33 ...   # an OpenAI-compatible endpoint

Prints one JSON line: pass rates with bootstrap intervals, LM calls, seconds, and the accepted configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from _common import git_rev, machine

from optimas_fast.examples import load_example
from optimas_fast.lm import make_lm
from optimas_fast.lm.usage import UsageLedger, set_default_ledger
from optimas_fast.optimize import Optimas, OptimasConfig
from optimas_fast.report import bootstrap_ci

log = logging.getLogger("run_codegen")


def loop_config(args) -> OptimasConfig:
    """The demo's loop settings, shrunk to the sizes given (CPU budget)."""
    return OptimasConfig.from_dict(
        {
            "seed": args.seed,
            "iterations": args.iterations,
            "batch_size": min(5, args.train),
            "initial_examples": min(8, args.train),
            "initial_epochs": 2,
            "adapt_steps": 4,
            "cooldown": 1,
            "optimizer_inputs": min(6, args.train),
            "val_workers": args.workers,
            "components": args.components or None,
            "collect": {"num_candidates": 3, "rollouts": 1, "workers": args.workers},
            "prompt": {"num_proposals": 2, "max_tokens": 64, "max_inputs": 4},
            "budget": {"max_seconds": args.max_seconds},
        }
    )


def evaluate(system, examples, workers, seed):
    ledger = UsageLedger()
    prev = set_default_ledger(ledger)
    try:
        t0 = time.perf_counter()
        res = system.evaluate(examples, workers=workers, seed=seed)
        return res, time.perf_counter() - t0, ledger.total.calls
    finally:
        set_default_ledger(prev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", default="embedded", help="make_lm spec (default: the embedded SmolLM2-135M)")
    p.add_argument("--test", type=int, default=10, help="problems of the test split to score")
    p.add_argument("--train", type=int, default=24)
    p.add_argument("--val", type=int, default=12)
    p.add_argument("--iterations", type=int, default=0, help="Optimas iterations (0: unoptimised only)")
    p.add_argument("--components", nargs="*", default=None, help="components to optimize (default: all)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=1800, help="wall budget of the Optimas loop")
    p.add_argument("--reward", default="minilm", help="LRF backbone: minilm or tiny-random (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/optimas-codegen")
    p.add_argument("--json", default=None, help="append the result line here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    lm = make_lm(args.lm)
    system, split = load_example("codegen", lm, seed=args.seed)
    test, train, val = split.test[: args.test], split.train[: args.train], split.val[: args.val]
    before, sec, calls = evaluate(system, test, args.workers, args.seed)
    row = {
        "system": "codegen",
        "lm": args.lm,
        "test_n": len(test),
        "before": bootstrap_ci(before.scores, seed=args.seed),
        "before_seconds": round(sec, 1),
        "before_lm_calls": calls,
        "before_errors": sum(e is not None for e in before.errors),
        "tests_per_problem": sum(len(t.fields.get("tests", [])) for t in before.traces) / max(1, len(test)),
    }
    print(f"unoptimised: pass rate {row['before']['mean']:.3f} on {len(test)} problems in {sec:.0f}s", file=sys.stderr)
    if args.iterations > 0:
        from optimas_fast.reward import RewardModel, RewardModelConfig, TemplateConfig

        comps = {n: system.components[n].description for n in system.order if system.components[n].variables()}
        if args.reward == "tiny-random":
            from optimas_fast.optimize.testing import tiny_reward_model

            rm = tiny_reward_model(comps, args.seed)
        else:
            rm = RewardModel(
                args.reward, comps, config=RewardModelConfig(seed=args.seed, template=TemplateConfig(max_length=256))
            )
        ledger = UsageLedger()
        prev = set_default_ledger(ledger)
        t0 = time.perf_counter()
        try:
            res = Optimas(rm, lm, loop_config(args), progress=True).optimize(system, train, val, run_dir=Path(args.out))
        finally:
            set_default_ledger(prev)
        after, sec_after, _ = evaluate(res.system, test, args.workers, args.seed)
        row.update(
            {
                "after": bootstrap_ci(after.scores, seed=args.seed),
                "val": [res.initial_val, res.best_val],
                "loop_seconds": round(time.perf_counter() - t0, 1),
                "loop_lm_calls": ledger.total.calls,
                "iterations": len(res.history) - 1,
                "accepted": sum(1 for h in res.history if h.get("accepted")),
                "stopped": res.stopped,
                "sizes": [len(train), len(val), len(test)],
                "config": {a: v.describe()[:120] for a, v in res.system.variables().items()},
            }
        )
        print(
            f"optimised: pass rate {row['after']['mean']:.3f} (val {res.initial_val:.3f} -> {res.best_val:.3f})",
            file=sys.stderr,
        )
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"machine": machine(), "rev": git_rev(), **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
