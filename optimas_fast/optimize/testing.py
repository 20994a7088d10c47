"""A tiny synthetic system with a known optimum, a tiny reward model, and a driver for subprocess tests.

The system: ``pick_a`` (Choice level 0..L-1) writes a colour word, ``pick_b`` (Choice level 0..L-1, reads
``a``) writes a shape word; the metric is 1 - (|level_a - a*| + |level_b - b*|) / (2 (L - 1)), deterministic,
so the optimum (a*, b*) is known. No LM is involved: the loop's own machinery is what is tested.

Driver (used by the resume-after-SIGKILL test):

    python -m optimas_fast.optimize.testing RUN_DIR --seed S --iterations N [--resume] [--digest OUT.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from typing import Any

import torch

from optimas_fast.backbones import minilm_path
from optimas_fast.reward.trainer import TrainConfig
from optimas_fast.system import Choice, Component, System

__all__ = [
    "COLOURS",
    "SHAPES",
    "SYNTHETIC_TRAIN",
    "build_synthetic",
    "tiny_reward_model",
    "run_digest",
    "synthetic_config",
]

COLOURS = ("red", "blue", "green", "black", "white", "yellow")
SHAPES = ("circle", "square", "triangle", "star", "line", "box")
# the tiny random LRF's training settings for the synthetic system's loop tests: a randomly initialised 2-layer
# backbone needs a far larger learning rate than the engine's default (5e-5, for pretrained backbones) to learn the
# synthetic preferences within the tests' few epochs
SYNTHETIC_TRAIN = TrainConfig(lr=1e-3, head_lr=1e-2, batch_pairs=32)


def build_synthetic(seed: int, levels: int = 6) -> tuple[System, dict, list, list]:
    """(system, optimum {"pick_a": a*, "pick_b": b*}, trainset, valset); the optimum is never level 0."""
    rng = random.Random(f"synthetic:{seed}")
    a_star, b_star = rng.randrange(1, levels), rng.randrange(1, levels)
    colours, shapes = COLOURS[:levels], SHAPES[:levels]

    def fa(x, variable):
        return {"a": colours[variable["level"]]}

    def fb(x, a, variable):
        return {"b": shapes[variable["level"]]}

    def metric(example, pred):
        la, lb = colours.index(pred["a"]), shapes.index(pred["b"])
        return 1.0 - (abs(la - a_star) + abs(lb - b_star)) / (2 * (levels - 1))

    comps = [
        Component(
            "pick_a",
            inputs=["x"],
            outputs=["a"],
            description="picks a colour",
            variable=Choice(level=list(range(levels))),
            fn=fa,
        ),
        Component(
            "pick_b",
            inputs=["x", "a"],
            outputs=["b"],
            description="picks a shape",
            variable=Choice(level=list(range(levels))),
            fn=fb,
        ),
    ]
    system = System(comps, metric, ["a", "b"], inputs=["x"], name="synthetic")
    examples = [{"id": i, "x": f"item {rng.randrange(1000)}"} for i in range(40)]
    return system, {"pick_a": a_star, "pick_b": b_star}, examples[:30], examples[30:]


def _tokenizer():
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def tiny_reward_model(components: dict, seed: int, hidden: int = 32, train: TrainConfig | None = None):
    """A RewardModel on a randomly initialised 2-layer BERT (MiniLM's tokenizer); the global RNG is untouched.
    ``train``: its training settings (None: the engine's defaults; the synthetic loop tests use SYNTHETIC_TRAIN)."""
    from transformers import BertConfig, BertModel

    from optimas_fast.reward import RewardModel, RewardModelConfig

    tok = _tokenizer()
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = BertModel(cfg)
    return RewardModel(
        backbone, components, tokenizer=tok, config=RewardModelConfig(seed=seed), device="cpu", train_config=train
    )


def run_digest(result_system: System, history: list, rm: Any) -> dict:
    """What must match between an uninterrupted run and a killed-and-resumed one (wall times excluded)."""
    from optimas_fast.reward.checkpoint import stable_parameters

    h = hashlib.sha256()
    # stable names (component names, not the head keys, which a checkpoint load renumbers)
    for k, v in sorted(stable_parameters(rm).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())

    def strip(x):  # wall times differ between runs by nature
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "seconds"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    hist = strip(history)
    return {
        "variables": result_system.state_dict()["variables"],
        "history": hist,
        "lrf_sha256": h.hexdigest(),
        "lrf_step": rm.trainer.global_step,
    }


def synthetic_config(seed: int, iterations: int):
    from optimas_fast.optimize.config import OptimasConfig

    return OptimasConfig.from_dict(
        {
            "seed": seed,
            "iterations": iterations,
            "batch_size": 8,
            "initial_examples": 16,
            "initial_epochs": 6,
            "adapt_steps": 8,
            "cooldown": 1,
            "optimizer_inputs": 4,
            "selection_temperature": 0.1,
            "holdout_fraction": 0.2,
            "val_workers": 1,
            "collect": {"num_candidates": 4, "workers": 1},
        }
    )


def main(argv: list[str] | None = None) -> int:
    from optimas_fast.optimize.loop import Optimas

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--digest", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # bit-identical floats between the processes being compared
    system, _, train, val = build_synthetic(args.seed)
    rm = tiny_reward_model({"pick_a": "picks a colour", "pick_b": "picks a shape"}, args.seed, train=SYNTHETIC_TRAIN)
    loop = Optimas(rm, None, synthetic_config(args.seed, args.iterations))
    res = loop.optimize(
        system,
        train,
        val,
        run_dir=None if args.resume else args.run_dir,
        resume_from=args.run_dir if args.resume else None,
    )
    if args.digest:
        with open(args.digest, "w") as f:
            json.dump(run_digest(res.system, res.history, rm), f, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
