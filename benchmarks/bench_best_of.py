"""Reward-guided best-of-N at inference: each example system's test split at N = 1, 2, 4 (every optimizable
LM component samples N outputs, the run's LRF picks one), with bootstrap intervals, the paired difference
to N=1, LM calls and wall seconds.

    # full size (the lead's idle machine; uses run_examples.py's runs when --runs has them, else trains
    # the LRF with the initial phase of a loop run: --iterations 0)
    python benchmarks/bench_best_of.py --systems amazon pubmedqa hotpotqa --runs /tmp/optimas-bench \
        --train 24 --val 12 --test 24 --n 1 2 4 --out /tmp/optimas-best-of --json benchmarks/_out/best_of.jsonl
    # any run config, e.g. your own pipeline (scripted LM: a smoke test of seconds)
    python benchmarks/bench_best_of.py --config examples/own_pipeline.yaml --n 1 2 4

Every N is evaluated with the LM completion cache off (a fresh embedded LM per N), so the LM calls and
seconds are what N costs, not replays of an earlier N's plain outputs. Candidates 2..N sample at
``--temperature``; candidate 1 is the plain (greedy) output, so N=1 is the plain evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from _common import git_rev, machine
from run_examples import config_for, paired_diff_ci

from optimas_fast.best_of import BestOfN, parse_best_of
from optimas_fast.optimize import Optimas, load_run_state
from optimas_fast.optimize.state import RUN_STATE
from optimas_fast.report import bootstrap_ci
from optimas_fast.run import build, evaluate_with_bar, parse_config

log = logging.getLogger("bench_best_of")


def uncached(raw: dict) -> dict:
    """The config with its LM's completion cache off (built-in backends given as a name or a dict)."""
    lm = raw.get("lm", "embedded")
    if lm == "embedded":
        lm = {"backend": "embedded"}
    if isinstance(lm, dict) and "backend" in lm:
        return dict(raw, lm=dict(lm, cache=False))
    return raw  # a factory LM (e.g. scripted) caches nothing anyway


def ensure_run(raw: dict, run_dir: Path, base_dir) -> Path:
    """A run directory with a trained LRF: ``run_dir`` when it holds one, else the loop is run there."""
    if (run_dir / RUN_STATE).is_file() and (run_dir / "system_state.json").is_file():
        log.info("using the run in %s", run_dir)
        return run_dir
    cfg = parse_config(raw, base_dir=base_dir)
    system, split, rm, proposer = build(cfg)
    t0 = time.perf_counter()
    Optimas(rm, proposer, cfg.loop, progress=False).optimize(system, split.train, split.val, run_dir=run_dir)
    log.info("trained the LRF in %s (%.0f s)", run_dir, time.perf_counter() - t0)
    return run_dir


def bench(name: str, raw: dict, run_dir: Path, ns: list[int], temperature: float, base_dir, seed: int) -> list[dict]:
    run_dir = ensure_run(raw, run_dir, base_dir)
    rows, plain = [], None
    for n in ns:
        cfg = parse_config(uncached(raw), base_dir=base_dir)
        system, split, rm, _ = build(cfg)
        system.load_state(run_dir / "system_state.json")
        rm.load_state(run_dir / load_run_state(run_dir)["lrf_checkpoint"])
        best_of = parse_best_of([str(n)], system, cfg.loop.components)
        stats: dict = {}
        scores = evaluate_with_bar(
            BestOfN(system, rm, best_of, temperature=temperature),
            split.test,
            desc=f"{name} best-of-{n}",
            workers=cfg.loop.val_workers,
            seed=cfg.loop.seed,
            progress=True,
            stats=stats,
        )
        if plain is None:
            plain = scores
        row = {
            "system": name,
            "n": n,
            "components": sorted(best_of),
            "test": bootstrap_ci(scores, seed=seed),
            "diff_vs_n1": paired_diff_ci(plain, scores, seed=seed),
            **stats,
            "lm_calls_per_example": stats["lm_calls"] / max(1, len(scores)),
            "temperature": temperature,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", nargs="*", default=None, help="built-in example systems (default: all three)")
    p.add_argument("--config", default=None, help="a run config YAML instead of --systems (e.g. your own pipeline)")
    p.add_argument("--runs", default=None, help="folder of run_examples.py runs (<runs>/<system>/) to reuse")
    p.add_argument("--train", type=int, default=24)
    p.add_argument("--val", type=int, default=12)
    p.add_argument("--test", type=int, default=24)
    p.add_argument(
        "--iterations",
        type=int,
        default=0,
        help="loop iterations when a run must be made (0: the "
        "initial phase only, which trains the LRF and leaves the system as it is)",
    )
    p.add_argument("--max-seconds", type=float, default=900)
    p.add_argument("--gate-confidence", type=float, default=None)
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/optimas-best-of")
    p.add_argument("--json", default=None, help="append one JSON line per result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.n[0] != 1:
        p.error("--n must start with 1 (the plain evaluation the others are compared with)")
    jobs = []
    if args.config:
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text())
        name = raw["system"] if isinstance(raw.get("system"), str) else "config"
        jobs.append((name, raw, Path(args.out) / "config", Path(args.config).resolve().parent))
    for name in (
        args.systems if args.systems is not None else ([] if args.config else ["amazon", "pubmedqa", "hotpotqa"])
    ):
        raw = config_for(name, args)
        run_dir = Path(args.runs) / name if args.runs else Path(args.out) / name
        jobs.append((name, raw, run_dir, None))
    for name, raw, run_dir, base_dir in jobs:
        rows = bench(name, raw, run_dir, args.n, args.temperature, base_dir, args.seed)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "a") as f:
                for row in rows:
                    f.write(json.dumps({"machine": machine(), "rev": git_rev(), **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
