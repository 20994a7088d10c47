"""Run reports: ``report.json`` (everything a reader needs to audit a run) and ``report.png`` (two plots).

report.json: the config, the initial / best validation scores, why the run stopped, LM usage and cost,
wall time, and per iteration: the component picked (with the selection probabilities and gaps), the
preference collection, the LRF adaptation loss and per-head alignment metrics, the proposals (with LRF
scores of the best candidates and the incumbent), the validation score and whether it was accepted.
Extra sections (e.g. the CLI's test-set scores) are merged in with ``extra``.

report.png: (left) validation score per iteration with accepted changes marked and the best-so-far line;
(right) each head's held-out pairwise accuracy and Spearman alignment per iteration (the alignment monitor).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optimas_fast._io import atomic_write_text
from optimas_fast.optimize.state import load_run_state

__all__ = ["build_report", "write_report", "plot_report", "bootstrap_ci"]

log = logging.getLogger(__name__)


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (strict JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def build_report(state: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict:
    """The report dict from a run state (``run_state.json`` contents) plus ``extra`` sections."""
    history = state.get("history", [])
    report = {
        "config": state.get("config"),
        "iterations_done": state.get("iteration"),
        "stopped": state.get("stopped"),
        "initial_val": state.get("initial_val"),
        "best_val": state.get("best_val"),
        "accepted": sum(1 for h in history if h.get("accepted")),
        "rejected": sum(1 for h in history if h.get("accepted") is False),
        "usage": state.get("usage"),
        "wall_seconds": state.get("elapsed"),
        "iterations": history,
        "final_variables": {a: _describe(v) for a, v in state.get("system", {}).get("variables", {}).items()},
    }
    if extra:
        report.update(extra)
    return _clean(report)


def _describe(v: Mapping) -> Any:
    kind = v.get("kind")
    if kind == "prompt":
        return {"kind": kind, "text": v.get("text")}
    if kind == "choice":
        return {"kind": kind, "value": v.get("value")}
    return {"kind": kind, "module": v.get("module"), "path": v.get("path")}


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    its = report.get("iterations", [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [h["iteration"] for h in its]
    best = [h.get("best_val") for h in its]
    ax1.step(xs, best, where="post", label="best validation score", color="tab:blue")
    tried = [(h["iteration"], h["val_score"], h.get("accepted")) for h in its if h.get("val_score") is not None]
    acc = [(x, y) for x, y, a in tried if a or a is None]
    rej = [(x, y) for x, y, a in tried if a is False]
    if acc:
        ax1.scatter(*zip(*acc), marker="o", color="tab:green", label="accepted", zorder=3)
    if rej:
        ax1.scatter(*zip(*rej), marker="x", color="tab:red", label="rejected", zorder=3)
    for h in its:
        if h.get("component"):
            ax1.annotate(
                h["component"],
                (h["iteration"], h.get("best_val") or 0),
                fontsize=6,
                rotation=45,
                xytext=(0, 4),
                textcoords="offset points",
            )
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("global score (validation)")
    ax1.set_title("validation score per iteration")
    ax1.legend(fontsize=8)
    heads: dict[str, list] = {}
    for h in its:
        for comp, m in (h.get("alignment") or {}).items():
            heads.setdefault(comp, []).append((h["iteration"], m.get("accuracy"), m.get("alignment")))
    for i, (comp, pts) in enumerate(sorted(heads.items())):
        color = f"C{i % 10}"
        acc = [(x, a) for x, a, _ in pts if a is not None]
        rho = [(x, r) for x, _, r in pts if r is not None]
        if acc:
            ax2.plot(*zip(*acc), marker=".", color=color, label=f"{comp} accuracy")
        if rho:  # the monitor's second signal: rank correlation with the measured global reward
            ax2.plot(*zip(*rho), marker="x", linestyle="--", color=color, label=f"{comp} Spearman")
    ax2.set_ylim(-1.05, 1.05)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("held-out accuracy (solid) / Spearman (dashed)")
    ax2.set_title("per-head alignment (LRF monitor)")
    if heads:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    run_dir: str | os.PathLike,
    state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    png: bool = True,
) -> dict:
    """Writes ``report.json`` (and ``report.png``) into ``run_dir``; ``state`` defaults to its run_state.json."""
    run_dir = Path(run_dir)
    if state is None:
        state = load_run_state(run_dir)
    report = build_report(state, extra)
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=1, sort_keys=True))
    if png:
        try:
            plot_report(report, run_dir / "report.png")
        except ImportError as exc:  # matplotlib is optional for the library; the JSON is the record
            log.warning("report.png not written (%s)", exc)
    return report


def bootstrap_ci(scores: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap confidence interval of per-example scores."""
    x = np.asarray(list(scores), dtype=np.float64)
    if x.size == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    a = (1 - level) / 2
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "lo": float(np.quantile(means, a)),
        "hi": float(np.quantile(means, 1 - a)),
    }
