"""Unoptimised scores of the three example systems on their fixed seeded test split.

    python benchmarks/eval_examples.py                          # embedded SmolLM2 + MiniLM, 30 test examples each
    python benchmarks/eval_examples.py --n 0 --workers 16       # the whole test split (100 / 20 / 24 examples)
    python benchmarks/eval_examples.py --lm openai:gpt-4o-mini  # any make_lm spec

The split is ``split_examples(examples, seed)`` (60/20/20); ``--n`` takes the first n test examples.
Prints one JSON line per system (score, failures, time, LM usage) and a summary table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from optimas_fast.examples import EXAMPLES, load_example
from optimas_fast.lm import make_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="pubmedqa,hotpotqa,amazon", help="comma-separated example names")
    ap.add_argument("--n", type=int, default=30, help="first n test examples (0 = the whole test split)")
    ap.add_argument("--seed", type=int, default=0, help="split seed")
    ap.add_argument("--workers", type=int, default=16, help="threads; the embedded LM batches their requests")
    ap.add_argument("--lm", default="embedded", help="make_lm spec")
    ap.add_argument(
        "--data-dir", default=None, help="data folder (default: $OPTIMAS_FAST_DATA or the package's own copy)"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    lm = make_lm(args.lm)
    rows = []
    for name in args.examples.split(","):
        if name not in EXAMPLES:
            raise SystemExit(f"unknown example {name!r}; choose from {sorted(EXAMPLES)}")
        system, split = load_example(name, lm, data_dir=args.data_dir, seed=args.seed)
        test = split.test if args.n <= 0 else split.test[: args.n]
        t0 = time.perf_counter()
        result = system.evaluate(test, workers=args.workers)
        row = {
            "system": name,
            "lm": lm.name,
            "split_seed": args.seed,
            "n_test": len(test),
            **result.summary(),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'system':<10} {'n':>4} {'score':>7} {'failed':>6} {'seconds':>8} {'LM calls':>8} {'gen tokens':>10}")
    for r in rows:
        print(
            f"{r['system']:<10} {r['n']:>4} {r['mean']:>7.3f} {r['failed']:>6} {r['wall_s']:>8.1f} "
            f"{r['lm_calls']:>8} {r['completion_tokens']:>10}"
        )


if __name__ == "__main__":
    main()
