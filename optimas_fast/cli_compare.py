"""``optimas-fast compare CONFIG [CONFIG ...]``: Optimas against its peers at equal metric-call budgets.

    optimas-fast compare examples/own_pipeline.yaml --methods unoptimized,optimas,gepa,global,random \\
        --budget 200 --seeds 3 --out cmp

Each CONFIG is an ``optimas-fast run`` YAML config (one system, its data, LM, proposer and reward model; the
file name labels the system). Writes ``--out``/compare.json, compare.md and compare.png and one file per
finished (system, method, seed) cell under ``--out``/cells/; running the same command again resumes, skipping
finished cells. Progress goes to stderr; the summary table is printed as JSON on stdout. A bad argument exits
with status 2 and one line naming it. Argument parsing only: the work is ``optimas_fast.compare.compare``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from optimas_fast.compare import DEFAULT_METHODS, JUDGE_EXAMPLES, METHODS, compare
from optimas_fast.optimize.config import ConfigError

__all__ = ["add_compare_parser"]


def _cmd_compare(args) -> int:
    if not args.quiet:
        logging.getLogger("optimas_fast.compare").setLevel(logging.INFO)  # one line per cell on stderr
    try:
        report = compare(
            args.configs,
            methods=args.methods,
            budget=args.budget,
            seeds=args.seeds,
            out=args.out,
            judge_examples=args.judge_examples,
            report_only=args.report_only,
        )
    except ConfigError as exc:
        print(f"optimas-fast compare: {exc}", file=sys.stderr)
        return 2
    keep = (
        "system",
        "method",
        "status",
        "reason",
        "seeds",
        "test",
        "vs_unoptimized",
        "vs_optimas",
        "metric_calls",
        "lm_calls",
        "seconds",
    )
    print(json.dumps({"out": args.out, "table": [{k: r.get(k) for k in keep} for r in report["table"]]}))
    return 0


def add_compare_parser(sub) -> argparse.ArgumentParser:
    """Register ``compare`` on the main CLI's sub-parsers."""
    p = sub.add_parser(
        "compare",
        help="Optimas vs GEPA, global-metric search, random search, MIPROv2 at equal metric-call budgets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="run config YAML file(s), one system each")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {','.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--budget", type=int, default=200, help="metric calls per method and seed (default 200)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method: 0..N-1 (default 3)")
    p.add_argument(
        "--judge-examples",
        type=int,
        default=JUDGE_EXAMPLES,
        help="test examples per component on which Optimas cells collect extra held-out pairs for the "
        "LRF-vs-LLM-judge accuracies, outside the budget (0: the loop's held-out pairs only; "
        f"default {JUDGE_EXAMPLES})",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run no cell: rewrite compare.json / .md / .png from the cells already finished in --out",
    )
    p.add_argument("--out", default="compare-out", help="output folder; an existing one resumes (default compare-out)")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress lines on stderr")
    p.set_defaults(func=_cmd_compare)
    return p
