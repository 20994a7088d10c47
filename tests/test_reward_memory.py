"""Reward training's memory policy (issue 18 §4; benchmarks/RESULTS.md, "Where reward training's memory goes"):
what a training step holds beside its activations, and the knobs that bound the activations themselves, each
checked exact against the plain step on fresh random data. Tiny randomly initialised backbones over MiniLM's
tokenizer; the code paths are device-agnostic, so the CPU checks what CUDA runs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import test_reward
import torch
from test_reward import make_model, random_requests, separable_pairs

from optimas_fast.reward import PreferencePair, RewardModelConfig, attention
from optimas_fast.reward.trainer import PairBatch, pair_chunks, pair_rows

tokenizer = test_reward.tokenizer  # the module-scoped fixture (a tiny model's tokenizer: MiniLM's)


def _pairs(rng: random.Random, reqs) -> list[PreferencePair]:
    return [
        PreferencePair(c, i, o, reqs[(k + 1) % len(reqs)][2], rng.uniform(0.1, 1.0)) for k, (c, i, o) in enumerate(reqs)
    ]


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
            copy_alive = rm.encoder.precision.cast_copy is not None
            seen.append((any(p.grad is not None for p in rm.encoder.net.parameters()), copy_alive))

    handle = rm.encoder.net.backbone.register_forward_pre_hook(check, with_kwargs=True)
    try:
        for _ in range(2):
            rm.score(reqs)
            assert rm.encoder.precision.cast_copy is not None  # scoring made (or re-made) the copy
            rm.train(_pairs(rng, reqs), epochs=1, lr=1e-3, batch_pairs=4)
    finally:
        handle.remove()
    assert len(seen) >= 4 and seen == [(False, False)] * len(seen)
    # gradients still exist after a step (freed by the next one)
    assert any(p.grad is not None for p in rm.encoder.net.parameters())


def _step_once(rm, pairs, weights, margins, center, lr):
    batch = PairBatch(pair_rows(rm.encoder, pairs), weights, margins, center)
    report = rm.trainer.step(batch, lr)
    grads = {n: p.grad.clone() for n, p in rm.encoder.net.named_parameters() if p.grad is not None}
    return report, grads


@pytest.mark.parametrize("kind,sharing", [("decoder", True), ("decoder", False), ("encoder", False)])
def test_chunked_step_equals_the_whole_batch(kind, sharing, tokenizer, seed):
    """train_chunk_tokens: the step's loss, accuracy and gradients equal the unchunked step's (fp32), for budgets
    from one input a chunk up to the whole batch, with random pair weights, margins and centering."""
    rng = random.Random(seed)
    pairs = separable_pairs(rng, 5)
    rng.shuffle(pairs)
    pairs = pairs[: rng.randint(5, len(pairs))]
    weights = [rng.uniform(0.2, 2.0) for _ in pairs]
    margins = [rng.uniform(0.0, 0.5) for _ in pairs] if rng.random() < 0.5 else None
    center = rng.choice([0.0, 0.05])
    whole = make_model(kind, tokenizer, seed, components=("a", "b"), prefix_sharing=sharing, train_chunk_tokens=None)
    ref, ref_grads = _step_once(whole, pairs, weights, margins, center, 1e-3)
    for budget in (1, rng.randint(20, 80), 10**6):
        rm = make_model(kind, tokenizer, seed, components=("a", "b"), prefix_sharing=sharing, train_chunk_tokens=budget)
        n_chunks = len(pair_chunks(pair_rows(rm.encoder, pairs), budget, rm.encoder.shares_prefix))
        assert n_chunks > 1 if budget == 1 else n_chunks >= 1  # budget 1: one input a chunk (5+ pairs: 2+ inputs)
        assert n_chunks == 1 or budget < 10**6
        rep, grads = _step_once(rm, pairs, weights, margins, center, 1e-3)
        assert rep.loss == pytest.approx(ref.loss, rel=1e-5, abs=1e-6)
        assert rep.accuracy == ref.accuracy and rep.pairs == ref.pairs
        assert rep.tokens >= 1  # chunks pad differently: tokens pushed may differ, never the math
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        # (the weights after AdamW are not compared: for a gradient near 0, g / (sqrt(v) + eps) turns fp32
        # summation-order noise into a full +-lr step; equal gradients are the statement)


def test_pair_chunks_cover_every_pair_once_and_keep_inputs_together(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed, components=("a", "b"))
    pairs = separable_pairs(rng, 6)
    rng.shuffle(pairs)
    rows = pair_rows(rm.encoder, pairs)
    n = len(pairs)
    assert [c.tolist() for c in pair_chunks(rows, None, True)] == [list(range(n))]
    for budget in (1, 40, 120, 10**6):
        for share in (True, False):
            chunks = pair_chunks(rows, budget, share)
            assert sorted(np.concatenate(chunks).tolist()) == list(range(n))  # every pair once
            chunk_of = {int(i): k for k, c in enumerate(chunks) for i in c}
            for i in range(n):
                for j in range(n):
                    if rows.prefix_of[i] == rows.prefix_of[j]:
                        assert chunk_of[i] == chunk_of[j]  # one input's pairs in one chunk
            if budget == 1:
                assert len(chunks) == len(set(rows.prefix_of[:n].tolist()))  # one input a chunk
            if budget == 10**6:
                assert len(chunks) == 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_train_chunk_tokens_is_checked(bad):
    with pytest.raises(ValueError, match="config.train_chunk_tokens"):
        RewardModelConfig(train_chunk_tokens=bad).validate()


def _saved_bytes(rm, pairs, weights):
    """Bytes autograd saves during one training step (each storage once), and the step's gradients."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, grads = _step_once(rm, pairs, weights, None, 0.0, 1e-3)
    return sum(seen.values()), grads


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_gradient_checkpointing_is_exact_and_saves_less(kind, tokenizer, seed):
    """config.gradient_checkpointing: the same gradients as the plain step, far fewer bytes kept for backward;
    read live (turned off again, the step keeps everything again)."""
    rng = random.Random(seed)
    pairs = separable_pairs(rng, 4)
    weights = [rng.uniform(0.2, 2.0) for _ in pairs]
    plain = make_model(kind, tokenizer, seed, components=("a", "b"), prefix_sharing=False)
    ref_bytes, ref_grads = _saved_bytes(plain, pairs, weights)
    rm = make_model(kind, tokenizer, seed, components=("a", "b"), prefix_sharing=False, gradient_checkpointing=True)
    ck_bytes, grads = _saved_bytes(rm, pairs, weights)
    assert rm.encoder.net.backbone.is_activation_checkpointing
    assert ck_bytes < 0.7 * ref_bytes
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    rm.encoder.config.gradient_checkpointing = False
    _saved_bytes(rm, pairs, weights)
    assert not rm.encoder.net.backbone.is_activation_checkpointing


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_gradient_checkpointing_with_prefix_sharing_is_exact_and_saves_less(amp, tokenizer, seed):
    """Checkpointing with prefix sharing on a decoder (the shared-prefix kernel: the prefix's keys/values taken as
    the prefix call makes them, each suffix layer recomputed in its shared-prefix context): the same loss and
    gradients as the plain shared-prefix step, fewer bytes kept for the backward, and the kernel ran in the
    recompute too."""
    rng = random.Random(seed)
    pairs = separable_pairs(rng, 4)
    weights = [rng.uniform(0.2, 2.0) for _ in pairs]
    cfg = dict(components=("a", "b"), amp=amp, train_chunk_tokens=None)
    plain = make_model("decoder", tokenizer, seed, **cfg)
    assert plain.encoder.shares_prefix and plain.encoder._shared_prefix_kernel()
    ref_bytes, ref_grads = _saved_bytes(plain, pairs, weights)
    rm = make_model("decoder", tokenizer, seed, gradient_checkpointing=True, **cfg)
    calls = []
    real = attention._shared_forward
    attention._shared_forward = lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k)
    try:
        ck_bytes, grads = _saved_bytes(rm, pairs, weights)
    finally:
        attention._shared_forward = real
    n_layers = rm.encoder.hf_config.num_hidden_layers
    assert len(calls) == 2 * n_layers  # each suffix layer: its forward, then its recompute in the backward
    assert rm.encoder.net.backbone.is_activation_checkpointing
    assert ck_bytes < 0.7 * ref_bytes, (ck_bytes, ref_bytes)
    assert grads.keys() == ref_grads.keys()
    tol = (1e-4, 1e-6) if amp == "none" else (0, 0)  # the recompute repeats the forward's ops exactly
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=tol[0], atol=tol[1], msg=name)


def test_gradient_checkpointing_refuses_prefix_sharing_without_the_kernel(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model(
        "decoder", tokenizer, seed, components=("a", "b"), gradient_checkpointing=True, shared_prefix_kernel=False
    )
    with pytest.raises(ValueError, match="config.gradient_checkpointing.*prefix sharing.*shared_prefix_kernel"):
        rm.train(separable_pairs(rng, 2), epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="config.gradient_checkpointing"):
        RewardModelConfig(gradient_checkpointing="yes").validate()
