"""Command line: ``optimas-fast demo | run CONFIG.yaml | eval RUN_DIR_OR_CONFIG | resume RUN_DIR`` and
``optimas-fast reward ...`` (optimas_fast/cli_reward.py). Argument parsing only: the run itself (the config
format, building the system, the loop) is ``optimas_fast.run``, whose docstring the ``run`` help prints.

Results go to stdout, progress to stderr; a bad config or argument exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from optimas_fast import demo, run
from optimas_fast.best_of import BestOfN, parse_best_of
from optimas_fast.cli_compare import add_compare_parser
from optimas_fast.cli_reward import add_reward_parser
from optimas_fast.optimize.config import ConfigError
from optimas_fast.optimize.state import RUN_STATE, load_run_state
from optimas_fast.report import bootstrap_ci
from optimas_fast.run import CONFIG_NAME, build, evaluate_with_bar, format_ci, load_config, parse_config, run_config
from optimas_fast.system import System

log = logging.getLogger("optimas_fast.cli")


def _echo(line: str) -> None:
    print(line, flush=True)


def _config_help() -> str:
    """The run config's reference: the part of ``optimas_fast.run``'s docstring from "A run config" on."""
    return run.__doc__[run.__doc__.index("A run config") :]


# ----------------------------------------------------------------------------------------------- commands
def _cmd_run(args) -> int:
    cfg = load_config(args.config)
    run_config(cfg, args.out, progress=not args.no_progress, echo=_echo)
    return 0


def _cmd_resume(args) -> int:
    d = Path(args.run_dir)
    if not (d / CONFIG_NAME).is_file():
        raise ConfigError(f"{d} has no {CONFIG_NAME}: not a directory written by 'optimas-fast run' or 'demo'")
    cfg = load_config(d / CONFIG_NAME)
    run_config(cfg, str(d), resume=True, progress=not args.no_progress, echo=_echo)
    return 0


def _cmd_eval(args) -> int:
    target = Path(args.target)
    state = None
    if target.is_dir():
        cfg = load_config(target / CONFIG_NAME)
        state = target / "system_state.json"
        if not state.is_file():
            raise ConfigError(f"{target} has no system_state.json yet (the run has not finished)")
    else:
        cfg = load_config(target)
    if args.best_of and not (target.is_dir() and (target / RUN_STATE).is_file()):
        raise ConfigError(
            f"--best-of scores candidates with the run's trained LRF: give a run directory "
            f"(with {RUN_STATE}), not {target}"
        )
    system, split, rm, _ = build(cfg)
    if args.state:
        state = Path(args.state)
    if state is not None:
        system.load_state(state)
    best_of = parse_best_of(args.best_of, system, cfg.loop.components)
    evaluated: System | BestOfN = system
    if best_of:
        run_state = load_run_state(target)
        rm.load_state(target / run_state["lrf_checkpoint"])  # the LRF as the run left it
        try:
            evaluated = BestOfN(system, rm, best_of, temperature=args.best_of_temperature)
        except ValueError as exc:  # e.g. the temperature: one line naming the option, exit 2
            raise ConfigError(f"--best-of-temperature {args.best_of_temperature}: {exc}") from None
    examples = getattr(split, args.split)
    stats: dict = {}
    scores = evaluate_with_bar(
        evaluated,
        examples,
        desc=f"eval ({args.split})",
        workers=cfg.loop.val_workers,
        seed=cfg.loop.seed,
        progress=not args.no_progress,
        stats=stats,
    )
    ci = bootstrap_ci(scores, seed=cfg.loop.seed)
    how = " (optimized)" if state else " (unoptimized)"
    if best_of:
        how += " best-of " + ", ".join(f"{n}={k}" for n, k in best_of.items())
    print(
        f"{cfg.system} {args.split} score{how}: {format_ci(ci)}; {stats['lm_calls']} LM calls, {stats['seconds']:.1f} s"
    )
    if args.json:
        print(json.dumps(dict(ci, best_of=best_of, **stats)))
    return 0


def _cmd_demo(args) -> int:
    raw = demo.demo_config(args.out, args.quick)
    print(demo.banner(raw), flush=True)
    t0 = time.perf_counter()
    extra = run_config(parse_config(raw), raw["output"], progress=not args.no_progress, echo=_echo)
    before, after = extra.get("test_before"), extra.get("test_after")
    if before and after:
        print(
            f"test accuracy: {before['mean']:.3f} -> {after['mean']:.3f} ({after['mean'] - before['mean']:+.3f}); "
            f"total {time.perf_counter() - t0:.0f} s"
        )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimas-fast",
        description="Optimas: optimize compound AI systems with local reward functions.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="offline demo: optimize the Amazon example with the embedded LM (<= 15 min, CPU)")
    p.add_argument("--out", default=None, help="output directory (default: ./optimas-demo-<time>)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test of a few minutes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "run",
        help="run the loop from a YAML config",
        description=run.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config file (see above)")
    p.add_argument("--out", default=None, help="run directory (overrides the config's 'output')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("eval", help="evaluate a finished run directory (optimized) or a config (unoptimized)")
    p.add_argument("target", help="a run directory (uses its system_state.json) or a YAML config")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="which split (default test)")
    p.add_argument("--state", default=None, help="a system_state.json to load instead")
    p.add_argument(
        "--best-of",
        action="append",
        metavar="N|COMPONENT=N",
        default=None,
        help="reward-guided best-of-N with the run's LRF: N for every optimizable LM component, or "
        "COMPONENT=N (repeatable)",
    )
    p.add_argument(
        "--best-of-temperature",
        type=float,
        default=0.7,
        help="sampling temperature of best-of-N candidates 2..N (default 0.7)",
    )
    p.add_argument("--json", action="store_true", help="also print the score and CI as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("resume", help="continue a killed or stopped run from its last checkpoint")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_resume)
    add_reward_parser(sub)  # reward train | eval | score | export (optimas_fast/cli_reward.py)
    add_compare_parser(sub)  # compare CONFIG... --methods --budget --seeds --out (optimas_fast/cli_compare.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"optimas-fast {args.command}: invalid config: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"optimas-fast {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
