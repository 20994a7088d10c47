"""`optimas-fast demo`: the Optimas loop on the Amazon next-item example, offline, on this machine's CPU.

What it runs: the embedded SmolLM2-135M-Instruct for the LM components, the MiniLM-L6 LRF (all heads on one
backbone), a small seeded split (train 20 / val 10 / test 20 by default), and a few loop iterations over the
two components downstream of the summariser (``candidate_scorer``: Weights + Choice; ``final_decider``:
Prompt + Choice). The summariser's prompt is left alone: changing it would re-run the slowest LM step for
every candidate, which does not fit the 15-minute target on two cores.

Sizes were chosen from measurements on the 2-core CI box (embedded LM ~10 tokens/s batched under load;
the summariser's 48 tokens per example dominate the first pass, later passes hit the LM cache). It prints
the test score before and after, with 95% bootstrap intervals, and where the output went.
"""

from __future__ import annotations

import time

DEMO_CONFIG = {
    "system": "amazon",
    "data": {"seed": 0, "train": 20, "val": 10, "test": 20},
    "lm": "embedded",
    "reward": {"backbone": "minilm", "max_length": 256},
    "loop": {
        "seed": 0,
        "iterations": 4,
        "batch_size": 5,
        "initial_examples": 8,
        "initial_epochs": 2,
        "adapt_steps": 4,
        "cooldown": 1,
        "optimizer_inputs": 6,
        "val_workers": 10,
        "components": ["candidate_scorer", "final_decider"],
        "collect": {"num_candidates": 3, "rollouts": 1, "workers": 10},
        "prompt": {"num_proposals": 2, "max_tokens": 48, "max_inputs": 4},
        "weights": {"population": 4, "steps": 2, "max_inputs": 6},
        "budget": {"max_seconds": 600},
    },
}

QUICK = {
    "data": {"seed": 0, "train": 8, "val": 6, "test": 8},
    "loop": {
        "iterations": 2,
        "batch_size": 4,
        "initial_examples": 6,
        "optimizer_inputs": 3,
        "budget": {"max_seconds": 240},
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def demo_config(out: str | None = None, quick: bool = False) -> dict:
    """The demo's run config (see ``optimas_fast.cli`` for the format); ``quick`` shrinks it to a smoke test."""
    raw = _merge(DEMO_CONFIG, QUICK) if quick else DEMO_CONFIG
    return dict(raw, output=out or f"optimas-demo-{time.strftime('%Y%m%d-%H%M%S')}")


def banner(raw: dict) -> str:
    return (
        "optimas-fast demo: Amazon next-item system, embedded SmolLM2-135M, MiniLM LRF, "
        f"split train {raw['data']['train']} / val {raw['data']['val']} / test {raw['data']['test']}, "
        f"{raw['loop']['iterations']} iterations (a first run converts the embedded model: ~20 s)"
    )
