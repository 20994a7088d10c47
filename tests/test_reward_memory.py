"""Reward training's memory policy (issue 18 §4; benchmarks/RESULTS.md, "Where reward training's memory goes"):
what a training step holds beside its activations, and the knobs that bound the activations themselves, each
checked exact against the plain step on fresh random data. Tiny randomly initialised backbones over MiniLM's
tokenizer; the code paths are device-agnostic, so the CPU checks what CUDA runs."""
from __future__ import annotations

import random

import pytest
import torch

from optimas_fast.reward import PreferencePair
from test_reward import make_model, random_requests  # noqa: F401
from test_reward import tokenizer  # noqa: F401  (the fixture)


def _pairs(rng: random.Random, reqs) -> list[PreferencePair]:
    return [PreferencePair(c, i, o, reqs[(k + 1) % len(reqs)][2], rng.uniform(0.1, 1.0))
            for k, (c, i, o) in enumerate(reqs)]


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_step_holds_no_gradients_or_score_copy_during_its_forward(kind, tokenizer, seed):
    """Last step's gradients and the bf16 scoring copy are freed before a step's forward: neither sits beside the
    step's activations (the copy is stale after the step anyway and is re-made by the next score)."""
    rng = random.Random(seed)
    reqs = random_requests(rng, n_inputs=3, n_cands=3)
    rm = make_model(kind, tokenizer, seed, score_amp="bf16", score_weights="cast")
    seen = []

    def check(module, args, kwargs):
        if torch.is_grad_enabled():  # a training forward (scoring runs under inference_mode)
            seen.append((any(p.grad is not None for p in rm.net.parameters()), rm.encoder._cast_backbone is not None))

    handle = rm.net.backbone.register_forward_pre_hook(check, with_kwargs=True)
    try:
        for _ in range(2):
            rm.score(reqs)
            assert rm.encoder._cast_backbone is not None  # scoring made (or re-made) the copy
            rm.train(_pairs(rng, reqs), epochs=1, lr=1e-3, batch_pairs=4)
    finally:
        handle.remove()
    assert len(seen) >= 4 and seen == [(False, False)] * len(seen)
    assert any(p.grad is not None for p in rm.net.parameters())  # gradients still exist after a step (freed later)
