"""The comparison's outputs: the summary table (compare.json), its Markdown (compare.md) and the anytime plot
(compare.png), all computed from the finished cells.

Statistics: the test score of a (system, method) pools the per-example test scores of all its seeds and takes
a 95% percentile bootstrap over those pooled scores; the paired difference vs ``unoptimized`` (and vs
``optimas``) subtracts, per seed and test example, the other method's score on the same example, and
bootstraps the pooled differences the same way (pairing removes the between-example spread that both
methods share, so the interval is of the difference itself).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optimas_fast.report import bootstrap_ci

__all__ = ["summarize", "render_markdown", "plot_curves"]


def _cells_for(cells: Sequence[Mapping], system: str, method: str) -> list[Mapping]:
    return [c for c in cells if c["system"] == system and c["method"] == method]


def _paired(mine: Sequence[Mapping], theirs: Sequence[Mapping]) -> list[float] | None:
    """Per (seed, test example) differences; None when the other method has no finished cell for a seed."""
    by_seed = {c["seed"]: c for c in theirs if c["status"] == "ok"}
    diffs: list[float] = []
    for c in mine:
        other = by_seed.get(c["seed"])
        if other is None or len(other["test_scores"]) != len(c["test_scores"]):
            return None
        diffs += [a - b for a, b in zip(c["test_scores"], other["test_scores"], strict=True)]
    return diffs


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(sum(xs) / len(xs)) if xs else None


def summarize(cells: Sequence[Mapping], *, systems: Sequence[str], methods: Sequence[str], seed: int = 0) -> dict:
    """The ``table`` (one row per system x method) and the pooled ``lrf_vs_judge`` section."""
    table = []
    for system in systems:
        for method in methods:
            group = _cells_for(cells, system, method)
            ok = [c for c in group if c["status"] == "ok"]
            row: dict[str, Any] = {
                "system": system,
                "method": method,
                "seeds": len(ok),
                "status": "ok" if ok else (group[0]["status"] if group else "missing"),
                "reason": None if ok else (group[0].get("reason") if group else None),
            }
            if ok:
                pooled = [s for c in ok for s in c["test_scores"]]
                row["test"] = bootstrap_ci(pooled, seed=seed)
                for ref in ("unoptimized", "optimas"):
                    d = None if method == ref else _paired(ok, _cells_for(cells, system, ref))
                    row[f"vs_{ref}"] = bootstrap_ci(d, seed=seed) if d else None
                row["metric_calls"] = {
                    "mean": _mean([c["metric_calls"] for c in ok]),
                    "max": max(c["metric_calls"] for c in ok),
                    "budget": ok[0]["budget"],
                }
                for k in ("calls", "prompt_tokens", "completion_tokens", "cache_hits"):
                    row[f"lm_{k}"] = _mean([c["usage"][k] for c in ok])
                row["seconds"] = _mean([c["seconds"] for c in ok])
                row["best_val"] = _mean([c["best_val"] for c in ok])
            table.append(row)
    judge: dict[str, dict] = {}
    for system in systems:
        per: dict[str, dict[str, list]] = {}
        for c in _cells_for(cells, system, "optimas"):
            for comp, r in (c.get("lrf_vs_judge") or {}).items():
                acc = per.setdefault(comp, {"lrf": [], "judge": [], "no_verdict": 0, "test": 0})
                acc["test"] += (r.get("sources") or {}).get("test", 0)  # cells before judge_examples: none
                acc["lrf"] += r["lrf_per_pair"]
                acc["judge"] += r["judge_per_pair"]
                acc["no_verdict"] += r["judge_no_verdict"]
        if per:
            judge[system] = {
                comp: {
                    "n": len(a["lrf"]),
                    "n_test": a["test"],
                    "lrf": bootstrap_ci(a["lrf"], seed=seed),
                    "judge": bootstrap_ci(a["judge"], seed=seed) if a["judge"] else None,
                    "judge_no_verdict": a["no_verdict"],
                }
                for comp, a in sorted(per.items())
            }
    return {"table": table, "lrf_vs_judge": judge}


def _ci(ci: Mapping | None, signed: bool = False) -> str:
    if not ci or ci.get("mean") is None:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(ci['mean'])} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"


def _num(x: Any, fmt: str = "{:.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def render_markdown(summary: Mapping, settings: Mapping) -> str:
    lines = [
        "# Optimas against its peers at equal budgets",
        "",
        f"Budget: **{settings['budget']} metric calls** per method and seed (a metric call = one run of the "
        f"system, or of the part downstream of a component, on one example, scored by the metric; test "
        f"evaluation not counted). Seeds: {settings['seeds']}. Methods: {', '.join(settings['methods'])}.",
        f"LM cache: {settings.get('cache_hits', 0)} of {settings.get('cache_hits', 0) + settings.get('lm_calls', 0)}"
        f" LM requests of the optimization phases were served from the cache (shared across cells).",
        "",
        "Test score: mean with a 95% bootstrap interval over the test examples pooled across seeds; Δ: paired "
        "difference per (seed, test example) over the seeds both methods finished, same interval. Metric calls, "
        "LM calls, tokens and seconds: mean per seed, optimization phase only (seconds are wall time: they depend "
        "on the machine's load). Seeds: the finished cells behind the row.",
        "",
    ]
    for system in dict.fromkeys(r["system"] for r in summary["table"]):
        lines += [
            f"## {system}",
            "",
            "| method | test score [95% CI] | Δ vs unoptimized | Δ vs optimas | metric calls (max) | LM calls "
            "| tokens in / out | cache hits | seconds | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in summary["table"] if r["system"] == system):
            if r["status"] != "ok":
                why = " ".join(str(r.get("reason") or r["status"]).split()).replace("|", "/")  # one table cell
                status = "not run" if r["status"] == "skipped" else r["status"]
                lines.append(f"| {r['method']} | {status}: {why} | | | | | | | | |")
                continue
            mc = r["metric_calls"]
            lines.append(
                f"| {r['method']} | {_ci(r['test'])} | {_ci(r.get('vs_unoptimized'), True)} | "
                f"{_ci(r.get('vs_optimas'), True)} | {_num(mc['mean'])} ({mc['max']}/{mc['budget']}) | "
                f"{_num(r['lm_calls'])} | {_num(r['lm_prompt_tokens'])} / {_num(r['lm_completion_tokens'])} | "
                f"{_num(r['lm_cache_hits'])} | {_num(r['seconds'], '{:.1f}')} | {r['seeds']} |"
            )
        lines.append("")
    judge = summary.get("lrf_vs_judge") or {}
    lines += [
        "## Local reward functions vs an LLM judge",
        "",
        "Pairwise accuracy on preference pairs from examples the LRF never trained on (the loop's held-out "
        "pairs, then pairs collected after the run on test examples, outside the budget; pooled across "
        "the optimas cells' seeds), 95% bootstrap intervals. The judge is the config's LM asked which of two "
        "outputs is better for the final goal, in both orders (position bias cancels: a constant answer "
        "scores 0.5).",
        "",
    ]
    if not judge:
        lines += [
            "(no held-out pairs: run the `optimas` method, with a non-zero `loop.holdout_fraction` or "
            "`judge_examples`)",
            "",
        ]
    else:
        lines += [
            "| system | component | pairs (from test examples) | LRF accuracy | LLM judge accuracy | "
            "judge replies without a verdict |",
            "|---|---|---|---|---|---|",
        ]
        for system, comps in judge.items():
            for comp, r in comps.items():
                lines.append(
                    f"| {system} | {comp} | {r['n']} ({r.get('n_test', 0)}) | {_ci(r['lrf'])} | "
                    f"{_ci(r['judge'])} | {r['judge_no_verdict']} |"
                )
        lines.append("")
    return "\n".join(lines)


def _step(curve: Sequence[Sequence[float]], grid: np.ndarray) -> np.ndarray:
    """Best validation score after x metric calls (NaN before the method's first measurement)."""
    out = np.full(grid.shape, np.nan)
    pts = sorted((float(x), float(y)) for x, y in curve)
    for x, y in pts:
        out[grid >= x] = y
    return out


def plot_curves(
    cells: Sequence[Mapping], systems: Sequence[str], methods: Sequence[str], budget: int, path: str | os.PathLike
) -> None:
    """compare.png: best validation score vs metric calls, one line per method (mean over seeds), one panel per
    system; ``unoptimized`` is the flat reference line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    grid = np.linspace(0, budget, 201)
    fig, axes = plt.subplots(1, len(systems), figsize=(5.5 * len(systems), 4), squeeze=False)
    for ax, system in zip(axes[0], systems, strict=True):
        for method in methods:
            ok = [c for c in _cells_for(cells, system, method) if c["status"] == "ok" and c["curve"]]
            if not ok:
                continue
            ys = np.vstack(
                [
                    _step(c["curve"], grid) if method != "unoptimized" else np.full(grid.shape, c["curve"][0][1])
                    for c in ok
                ]
            )
            with warnings.catch_warnings():  # all-NaN columns (before a method's first measurement) stay NaN
                warnings.simplefilter("ignore", category=RuntimeWarning)
                y = np.nanmean(ys, axis=0)
            ax.plot(grid, y, label=method, linestyle="--" if method == "unoptimized" else "-")
        ax.set_title(system)
        ax.set_xlabel("metric calls spent")
        ax.set_ylabel("best validation score")
        ax.set_xlim(0, budget)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{os.fspath(path)}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a killed comparison never leaves half a picture
