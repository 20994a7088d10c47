"""The comparison harness: every (system, method, seed) cell at the same metric-call budget.

    summary = compare(["amazon.yaml", "pubmedqa.yaml"], methods=["unoptimized", "optimas", "gepa"],
                      budget=200, seeds=3, out="cmp")
    # cmp/compare.json, cmp/compare.md, cmp/compare.png; cmp/cells/<system>__<method>__seed<k>.json

One cell:

1. build the run from the config (``optimas_fast.run.build``) with ``loop.seed`` = the cell's seed: a fresh
   system, data split, reward model and proposer (LMs are shared per process and their completion cache is
   shared by every cell, so repeated calls are free and reported as cache hits);
2. put a ``MetricCounter`` with limit = budget in front of the system's metric (``optimize.budget.attach``):
   every method's scored runs go through it and none can make call budget + 1;
3. run the method with a fresh LM usage ledger as the process default (LM calls, tokens, cache hits; the
   Optimas loop keeps its own ledger, which is added) and time it;
4. take the counter off and evaluate the returned system on the test split (not counted, its LM usage
   reported apart);
5. Optimas cells also measure the LRF against an LLM judge (``judge.py``) on pairs from examples it never
   trained on: the run's held-out pairs and pairs collected on the first ``judge_examples`` test examples
   (after the test evaluation; their scored runs and LM calls are reported apart, outside the budget);
6. write the cell atomically to ``cells/``. A comparison started again with the same ``out`` skips the cells
   already there (same budget and config required: anything else is an error, not a silent mix), so a killed
   comparison resumes where it stopped; a cell killed half-way runs again from its start.

A method that cannot run on a system (GEPA without Prompt variables, MIPROv2 on a plain System, ...) gives a
``skipped`` cell with the reason, which the report prints instead of a number. A method that raises is
logged and reported as ``failed`` (not written, so the next start retries it); the other cells go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from optimas_fast._io import atomic_write_text
from optimas_fast._validate import check_bool, check_int
from optimas_fast.compare.gepa_method import run_gepa
from optimas_fast.compare.judge import lrf_vs_judge, unseen_pairs
from optimas_fast.compare.methods import METHOD_FUNCTIONS, Cell, MethodResult, MethodSkipped
from optimas_fast.compare.mipro_method import run_mipro
from optimas_fast.compare.report import plot_curves, render_markdown, summarize
from optimas_fast.lm.base import LM
from optimas_fast.lm.types import Usage
from optimas_fast.lm.usage import UsageLedger, current_ledger, set_default_ledger
from optimas_fast.optimize.budget import MetricCounter, attach, detach
from optimas_fast.optimize.config import ConfigError
from optimas_fast.run import RunConfig, build, load_config

__all__ = ["METHODS", "DEFAULT_METHODS", "FORMAT", "compare", "check_methods"]

log = logging.getLogger(__name__)

METHODS: dict[str, Callable[[Cell], MethodResult]] = {**METHOD_FUNCTIONS, "gepa": run_gepa, "mipro": run_mipro}
DEFAULT_METHODS = ("unoptimized", "optimas", "gepa", "global", "random")
FORMAT = "optimas_fast.compare/1"
CELL_FORMAT = "optimas_fast.compare.cell/1"


# ------------------------------------------------------------------------------------------- LM accounting
class _Accounted(LM):
    """An LM whose class overrides ``generate`` bypasses the LM layer's ledger (scripted test LMs do); this
    wrapper records what it returns in the current ledger, so every LM shows up in the per-method usage."""

    def __init__(self, inner: LM):
        self.inner = inner
        self.name = inner.name
        self.model = getattr(inner, "model", "")

    def generate(self, prompts, **kwargs):
        out = self.inner.generate(prompts, **kwargs)
        total = Usage()
        for row in out:
            for c in row:
                total += c.usage
        current_ledger().record(total, model=self.name)
        return out

    def __getattr__(self, item: str) -> Any:  # everything else is the wrapped LM's
        return getattr(self.inner, item)


def _accounted(lm: Any, memo: dict) -> Any:
    if not isinstance(lm, LM) or isinstance(lm, _Accounted) or type(lm).generate is LM.generate:
        return lm
    return memo.setdefault(id(lm), _Accounted(lm))


def _account_lms(system: Any, proposer: Any) -> Any:
    """Wraps the bypassing LMs of every LM component (``lms``) and the proposer; returns the proposer."""
    memo: dict = {}
    for c in system.components.values():
        lms = getattr(c, "lms", None)
        if isinstance(lms, dict):
            c.lms = {k: _accounted(v, memo) for k, v in lms.items()}
    return _accounted(proposer, memo)


def _usage(u: Usage | Mapping) -> dict:
    d = dataclasses.asdict(u) if isinstance(u, Usage) else dict(u)
    return {k: d.get(k, 0) for k in ("calls", "prompt_tokens", "completion_tokens", "cache_hits", "cost_usd")}


def _add(a: dict, b: Mapping) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a}


# ------------------------------------------------------------------------------------------- arguments
def check_methods(methods: Any) -> list[str]:
    """The list of method names (a comma-separated string is split); ConfigError naming ``methods``."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not isinstance(methods, (list, tuple)) or not methods or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"methods must be a non-empty list of method names from {list(METHODS)}, got {methods!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(
            f"methods: unknown method{'s' if len(unknown) > 1 else ''} {unknown}; choose from {list(METHODS)}"
        )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods: {methods} names a method twice")
    return list(methods)


def _configs(configs: Any) -> list[tuple[str, RunConfig, str]]:
    """(label, config, digest) per config file; labels are the file names without extension."""
    if isinstance(configs, (str, os.PathLike)):
        configs = [configs]
    if not isinstance(configs, (list, tuple)) or not configs:
        raise ConfigError(f"configs must be one or more YAML config paths, got {configs!r}")
    out, labels = [], set()
    for path in configs:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"configs: expected a YAML config path, got {path!r}")
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} not found (or not a file)")
        cfg = load_config(path)
        label = Path(path).stem
        if label in labels:
            raise ConfigError(f"configs: two configs are named {label!r} (labels are the file names); rename one")
        labels.add(label)
        digest = hashlib.sha256(json.dumps(cfg.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
        out.append((label, cfg, digest))
    return out


# ------------------------------------------------------------------------------------------- one cell
@contextlib.contextmanager
def _process_ledger(ledger: UsageLedger):
    """``ledger`` as the process-wide default for the block: LM calls from every thread (the system's workers,
    a batching backend's) are counted in it, not only those of this context."""
    previous = set_default_ledger(ledger)
    try:
        yield ledger
    finally:
        set_default_ledger(previous)


JUDGE_EXAMPLES = 16  # test examples per component the judge study collects pairs on (after the run)


def _judge_study(loop, system, rm, judge, test, cfg: RunConfig, seed: int, n_examples: int) -> dict:
    """The LRF against an LLM judge (judge.py) on pairs from examples the LRF never trained on: the loop's
    held-out pairs, then pairs collected on the first ``n_examples`` test examples for every component the
    loop collected for. The system's metric must be detached: the collection's scored runs are counted apart
    (``judge_metric_calls``), outside the method's budget, and so are the LM calls of collecting
    (``judge_pairs_usage``) and judging (``judge_usage``)."""
    descriptions = {n: c.description or n for n, c in system.components.items()}
    held = loop.store.pairs(held_out=True)
    components = [n for n in system.order if n in set(loop.store.components())]
    prompt = loop.optimizers.get("prompt")
    counter = MetricCounter()
    pairs_ledger, judge_ledger = UsageLedger(), UsageLedger()
    t0 = time.perf_counter()
    unseen: list = []
    if n_examples > 0 and test:
        metrics = attach(system, counter)
        try:
            with _process_ledger(pairs_ledger):
                unseen = unseen_pairs(
                    system,
                    components,
                    test[:n_examples],
                    cfg.loop.collect,
                    seed=seed,
                    prompt_pool=prompt.pool() if prompt is not None else None,
                )
        finally:
            detach(system, metrics)
    with _process_ledger(judge_ledger):
        study = lrf_vs_judge(held + unseen, rm, judge, descriptions, seed=seed)
    for comp, r in study.items():  # lrf_vs_judge keeps each component's first MAX_PAIRS: held-out ones first
        n_held = min(sum(p.component == comp for p in held), r["n"])
        r["sources"] = {"loop_held_out": n_held, "test": r["n"] - n_held}
    return {
        "lrf_vs_judge": study,
        "judge_examples": n_examples,
        "judge_metric_calls": counter.used,
        "judge_pairs_usage": _usage(pairs_ledger.total),
        "judge_usage": _usage(judge_ledger.total),
        "judge_seconds": time.perf_counter() - t0,
    }


def _cell_name(label: str, method: str, seed: int) -> str:
    return f"{label}__{method}__seed{seed}"


def run_cell(
    label: str,
    cfg: RunConfig,
    digest: str,
    method: str,
    seed: int,
    budget: int,
    out: Path,
    judge_examples: int = JUDGE_EXAMPLES,
) -> dict:
    """Runs one cell (module docstring) and returns its JSON-safe record."""
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=seed))
    system, split, rm, proposer = build(cfg)
    if not split.train or not split.val:
        raise ConfigError(
            f"{label}: the train and val splits must not be empty (got {len(split.train)} and "
            f"{len(split.val)} examples)"
        )
    proposer = _account_lms(system, proposer)
    counter = MetricCounter(budget)
    metrics = attach(system, counter)
    work = out / "work" / _cell_name(label, method, seed)
    shutil.rmtree(work, ignore_errors=True)  # what a killed run of this cell left: it starts over
    work.mkdir(parents=True)
    cell = Cell(system, list(split.train), list(split.val), rm, proposer, cfg, seed, budget, counter, work)
    record: dict[str, Any] = {
        "format": CELL_FORMAT,
        "system": label,
        "method": method,
        "seed": seed,
        "budget": budget,
        "config_sha": digest,
        "split_sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
    }
    ledger = UsageLedger()
    t0 = time.perf_counter()
    try:
        with _process_ledger(ledger):
            result = METHODS[method](cell)
    except MethodSkipped as exc:
        log.info("%s %s seed %d: not run: %s", label, method, seed, exc)
        shutil.rmtree(work, ignore_errors=True)
        return dict(
            record,
            status="skipped",
            reason=str(exc),
            metric_calls=counter.used,
            curve=[],
            usage=_usage(ledger.total),
            seconds=time.perf_counter() - t0,
        )
    seconds = time.perf_counter() - t0
    usage = _usage(ledger.total)
    loop = result.extra
    if loop is not None and hasattr(loop, "ledger"):  # the Optimas loop counted its calls in its own ledger
        usage = _add(usage, _usage(loop.ledger.state_dict()["total"]))
    if counter.used > budget:  # cannot happen (the counter refuses call budget + 1); a broken counter must not pass
        raise RuntimeError(f"{label} {method} seed {seed}: {counter.used} metric calls > budget {budget}")
    record.update(
        status="ok",
        reason=None,
        stopped=result.stopped,
        metric_calls=counter.used,
        curve=[[int(x), float(y)] for x, y in cell.curve],
        best_val=float(result.best_val),
        usage=usage,
        seconds=seconds,
        info=result.info,
        variables={a: v.describe() for a, v in result.system.variables().items()},
    )
    detach(result.system, metrics)  # the test evaluation is not part of the budget
    test_ledger = UsageLedger()
    t1 = time.perf_counter()
    with _process_ledger(test_ledger):
        res = result.system.evaluate(split.test, workers=cfg.loop.val_workers, seed=seed) if split.test else None
    record.update(
        test_scores=list(res.scores) if res is not None else [],
        test_seconds=time.perf_counter() - t1,
        test_usage=_usage(test_ledger.total),
    )
    if loop is not None and hasattr(loop, "store"):
        record.update(_judge_study(loop, result.system, rm, proposer, split.test, cfg, seed, judge_examples))
    shutil.rmtree(work, ignore_errors=True)  # the loop's run directory, LRF checkpoints: large, not needed after
    return record


# ------------------------------------------------------------------------------------------- the comparison
def compare(
    configs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    methods: Any = DEFAULT_METHODS,
    budget: int = 200,
    seeds: int = 3,
    out: str | os.PathLike = "compare-out",
    judge_examples: int = JUDGE_EXAMPLES,
    report_only: bool = False,
) -> dict:
    """Runs (or resumes) the comparison and writes ``out``/compare.json, compare.md and compare.png; returns
    the compare.json content. ``configs``: one or more ``optimas-fast run`` YAML configs (one system each,
    labelled by file name); ``methods``: names from ``METHODS`` (or "a,b,c"); ``budget``: metric calls per
    method and seed; ``seeds``: seeds 0..seeds-1; ``judge_examples``: test examples per component for the
    LRF-vs-judge pairs (0: the loop's held-out pairs only); ``report_only``: run nothing, report the cells
    already finished in ``out`` (a method's row says how many seeds it has). Bad arguments raise
    ``ConfigError`` naming the argument."""
    methods = check_methods(methods)
    check_int(budget, "budget", min=1, error=ConfigError, what="an int >= 1 (metric calls per method and seed)")
    check_int(seeds, "seeds", min=1, error=ConfigError, what="an int >= 1 (how many seeds per method)")
    check_int(
        judge_examples,
        "judge_examples",
        min=0,
        error=ConfigError,
        what="an int >= 0 (test examples per component for the LRF-vs-judge pairs)",
    )
    check_bool(report_only, "report_only", error=ConfigError)
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ConfigError(f"out must be a directory path, got {out!r}")
    systems = _configs(configs)
    out = Path(out)
    if report_only and not any((out / "cells").glob("*.json")):
        raise ConfigError(f"out: no finished cells in {out / 'cells'} to report (report_only=True runs nothing)")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells: list[dict] = []
    t0 = time.perf_counter()
    resumed = 0
    for label, cfg, digest in systems:
        for seed in range(seeds):
            for method in methods:
                path = out / "cells" / f"{_cell_name(label, method, seed)}.json"
                if path.is_file():
                    cell = json.loads(path.read_text(encoding="utf-8"))
                    if cell.get("budget") != budget or cell.get("config_sha") != digest:
                        raise ConfigError(
                            f"{path} was written with budget {cell.get('budget')} and config "
                            f"{cell.get('config_sha')}, this comparison has budget {budget} and "
                            f"config {digest}: use another --out (or delete the folder)"
                        )
                    log.info("%s: finished earlier, skipped", path.name)
                    cells.append(cell)
                    resumed += 1
                    continue
                if report_only:
                    log.info("%s: not finished, not run (report only)", path.name)
                    continue
                log.info("cell %s %s seed %d (budget %d metric calls)", label, method, seed, budget)
                try:
                    cell = run_cell(label, cfg, digest, method, seed, budget, out, judge_examples)
                except ConfigError:
                    raise
                except Exception as exc:  # noqa: BLE001 — one broken method must not lose hours of other cells
                    log.error("%s %s seed %d failed: %s\n%s", label, method, seed, exc, traceback.format_exc())
                    cells.append(
                        {
                            "system": label,
                            "method": method,
                            "seed": seed,
                            "budget": budget,
                            "status": "failed",
                            "reason": f"{type(exc).__name__}: {exc}",
                        }
                    )
                    continue
                atomic_write_text(path, json.dumps(cell, indent=1, sort_keys=True))
                cells.append(cell)
    with contextlib.suppress(OSError):  # an empty work folder: every cell finished (a failed one keeps its files)
        (out / "work").rmdir()
    labels = [label for label, _, _ in systems]
    summary = summarize(cells, systems=labels, methods=methods)
    done = [c for c in cells if c.get("status") == "ok"]
    settings = {
        "configs": {label: str(cfg.raw.get("system")) for label, cfg, _ in systems},
        "methods": methods,
        "budget": budget,
        "seeds": seeds,
        "judge_examples": judge_examples,
        "report_only": report_only,
        "cells": len(cells),
        "cells_resumed": resumed,
        "lm_calls": sum(c["usage"]["calls"] for c in done),
        "cache_hits": sum(c["usage"]["cache_hits"] for c in done),
        "wall_seconds_this_session": time.perf_counter() - t0,
    }
    report = {"format": FORMAT, "settings": settings, **summary, "cells": cells}
    atomic_write_text(out / "compare.json", json.dumps(report, indent=1, sort_keys=True, default=str))
    atomic_write_text(out / "compare.md", render_markdown(summary, settings))
    plot_curves(cells, labels, methods, budget, out / "compare.png")
    return report
