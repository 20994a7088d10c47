"""Reward training details: bf16 training on CPU against fp32, the one pair_weights, the overlong policy and
the train report. Tiny randomly initialised backbones over MiniLM's tokenizer."""

from __future__ import annotations

import math
import random

import pytest
import test_reward
import torch
from test_reward import make_model, separable_pairs, words

from optimas_fast.preference import pair_weights as preference_pair_weights
from optimas_fast.reward import (
    PreferencePair,
    RewardModel,
    RewardModelConfig,
    TemplateConfig,
    TrainReport,
    pair_weights,
)

tokenizer = test_reward.tokenizer  # MiniLM's tokenizer: test_reward's module-scoped fixture


# ------------------------------------------------------------------------------------------------ bf16
# bf16 autocast vs fp32 on the first step (identical weights), separable_pairs(rng, 12) in one batch, tiny random
# backbones, seeds 0-5 measured (AMD EPYC, native bf16): |loss diff| <= 3.4e-5 (decoder; encoder 3.6e-7),
# ||g_bf16 - g_fp32|| / ||g_fp32|| over all parameters <= 2.2e-3 (decoder; encoder 2.2e-4). Bounds ~5x above:
BF16_LOSS_ATOL = 2e-4
BF16_GRAD_REL = 1e-2


def _linear_dtypes(rm):
    """Records the dtype of every Linear output inside the backbone (bf16 when autocast really runs)."""
    seen = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in rm.encoder.net.backbone.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return seen, hooks


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_bf16_training_on_cpu_matches_fp32_and_learns(kind, tokenizer, seed):
    rng = random.Random(seed)
    pairs = separable_pairs(rng, 12)
    first = {}
    for amp in ("none", "bf16"):
        rm = make_model(kind, tokenizer, seed, components=("a", "b"), amp=amp)
        seen, hooks = _linear_dtypes(rm)
        loss = rm.train(pairs, epochs=1, lr=2e-3, batch_pairs=len(pairs))[0]["loss"]  # one step, one batch
        for h in hooks:
            h.remove()
        grads = [p.grad for p in rm.encoder.net.parameters() if p.grad is not None]  # that step's gradients
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        first[amp] = (loss, torch.cat([g.flatten() for g in grads]), seen, rm)
    (l32, g32, seen32, _), (l16, g16, seen16, rm16) = first["none"], first["bf16"]
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}  # the bf16 run multiplied in bf16
    assert rm16.uses_bf16(inference=False) and next(rm16.encoder.net.parameters()).dtype == torch.float32
    assert abs(l16 - l32) <= BF16_LOSS_ATOL
    assert float((g16 - g32).norm() / g32.norm()) <= BF16_GRAD_REL
    # and bf16 training goes on to learn: finite losses that fall
    hist = rm16.train(pairs, epochs=3, lr=2e-3, batch_pairs=6)
    losses = [h["loss"] for h in hist]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 < l16


# ------------------------------------------------------------------------------------------------ weights
def test_pair_weights_is_one_function_with_one_meaning(seed):
    assert preference_pair_weights is pair_weights  # the preference layer re-exports the reward engine's
    rng = random.Random(seed)
    ms = [rng.uniform(0, 2) for _ in range(rng.randint(2, 30))] + [0.0]
    mean = sum(ms) / len(ms)
    floor = rng.uniform(0.01, 0.5)
    assert pair_weights(ms, floor) == pytest.approx([max(m / mean, floor) for m in ms])
    ref = rng.uniform(0.1, 3.0)  # a fixed reference (the whole training set's mean margin)
    assert pair_weights(ms, floor, ref) == pytest.approx([max(m / ref, floor) for m in ms])
    w = pair_weights(ms, floor)
    assert min(w) == pytest.approx(floor) and all(x > 0 and math.isfinite(x) for x in w)
    assert pair_weights([0.3] * 5) == [1.0] * 5 and pair_weights([0.0, 0.0]) == [1.0, 1.0]
    assert pair_weights([0.0, 0.0], 0.1, reference=0.0) == [1.0, 1.0] and pair_weights([]) == []
    with pytest.raises(ValueError, match="floor must be > 0"):
        pair_weights([0.1], floor=0)
    with pytest.raises(ValueError, match=r"margins\[1\] must be finite and >= 0"):
        pair_weights([0.1, -0.1])
    with pytest.raises(ValueError, match=r"margins\[0\]"):
        pair_weights([float("nan")])
    with pytest.raises(ValueError, match="reference must be finite"):
        pair_weights([0.1], reference=float("inf"))


def test_trainer_weights_pairs_with_pair_weights(tokenizer, seed):
    """The loss the trainer reports is the pair_weights-weighted mean of the per-pair BT losses."""
    rng = random.Random(seed)
    pairs = [
        PreferencePair(
            "a",
            f"q {i} " + words(rng, 2, 6),
            words(rng, 1, 4) + " yes",
            words(rng, 1, 4) + " no",
            rng.uniform(0.01, 2.0),
        )
        for i in range(6)
    ]
    rm = make_model("encoder", tokenizer, seed, components=("a",))
    s = rm.score(
        [(p.component, p.inputs, p.chosen) for p in pairs] + [(p.component, p.inputs, p.rejected) for p in pairs]
    )
    nll = -torch.nn.functional.logsigmoid(s[:6] - s[6:]).double()  # (B,)
    w = torch.tensor(pair_weights([p.margin for p in pairs], 0.05), dtype=torch.float64)
    loss = rm.train(pairs, epochs=1, lr=1e-3, batch_pairs=6, group_by_input=False)[0]["loss"]
    assert loss == pytest.approx(float((w * nll).sum() / w.sum()), abs=1e-6)
    assert loss != pytest.approx(float(nll.mean()), abs=1e-7)  # weighting changed it: the check can fail


# ------------------------------------------------------------------------------------------------ overlong
def _overlong_pairs(rng, n_ok: int, n_long: int):
    ok = [
        PreferencePair("a", f"short {i}", "good " + words(rng, 1, 3), "bad " + words(rng, 1, 3), 1.0)
        for i in range(n_ok)
    ]
    long = [PreferencePair("a", f"long {i} " + words(rng, 60, 80), "good", "bad", 1.0) for i in range(n_long)]
    pairs = ok + long
    rng.shuffle(pairs)
    return pairs, {i for i, p in enumerate(pairs) if p.inputs.startswith("long")}


def test_overlong_policies_and_the_train_report(tokenizer, seed):
    rng = random.Random(seed)
    n_ok, n_long = rng.randint(3, 6), rng.randint(1, 3)
    pairs, long_idx = _overlong_pairs(rng, n_ok, n_long)
    tmpl = TemplateConfig(max_length=40)
    rm = make_model("encoder", tokenizer, seed, components=("a",), template=tmpl)
    assert rm.last_train_report is None
    hist = rm.train(pairs, epochs=2, lr=1e-3, batch_pairs=4)  # default: truncate_prefix (the old behaviour)
    rep = rm.last_train_report
    assert isinstance(rep, TrainReport) and rep.overlong == "truncate_prefix"
    assert (rep.pairs_used, rep.pairs_dropped, rep.pairs_truncated) == (n_ok + n_long, 0, n_long)
    assert rep.steps == len(hist) and rep.final_loss == hist[-1]["loss"] and rep.seconds > 0
    assert rep.pairs_per_s == pytest.approx(2 * (n_ok + n_long) / rep.seconds)
    rm = make_model("encoder", tokenizer, seed, components=("a",), template=tmpl)
    hist = rm.train(pairs, epochs=1, lr=1e-3, batch_pairs=64, overlong="drop")
    rep = rm.last_train_report
    assert (rep.pairs_used, rep.pairs_dropped, rep.pairs_truncated) == (n_ok, n_long, 0)
    assert hist[0]["pairs"] == n_ok and all(
        not p.inputs.startswith("long") for buf in rm.loops.replay.values() for p in buf
    )
    first = min(long_idx)
    with pytest.raises(
        ValueError,
        match=rf"pairs\[{first}\] is longer than max_length=40 with overlong='error': "
        r"chosen row \d+ tokens, rejected row \d+ tokens",
    ):
        make_model("encoder", tokenizer, seed, components=("a",), template=tmpl).train(pairs, overlong="error")
    ok_only = [p for i, p in enumerate(pairs) if i not in long_idx]
    rm.train(ok_only, overlong="error")  # nothing over-long: trains
    assert rm.last_train_report.pairs_used == n_ok
    with pytest.raises(ValueError, match="overlong must be one of"):
        rm.train(ok_only, overlong="cut")
    with pytest.raises(ValueError, match="left none to train on"):
        rm.train([p for i, p in enumerate(pairs) if i in long_idx], overlong="drop")
    # an outputs text that cannot fit even with no inputs: no policy can truncate it
    huge = [PreferencePair("a", "q", words(rng, 60, 70), "bad", 1.0)]
    with pytest.raises(ValueError, match=r"pairs\[0\]\.chosen: the outputs text is \d+ tokens"):
        rm.train(huge)
    rm.train(ok_only + huge, overlong="drop")
    assert rm.last_train_report.pairs_dropped == 1


# ------------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_batches_equal_padded_scores_and_gradients(pooling, tokenizer, seed):
    rng = random.Random(seed)
    reqs = [(c, i, o) for c, i, o in random_requests_mixed(rng)]
    padded = make_model("encoder", tokenizer, seed, components=("a", "b"), pooling=pooling)
    packed = make_model(
        "encoder",
        tokenizer,
        seed,
        components=("a", "b"),
        pooling=pooling,
        packing=True,
        pack_tokens=rng.choice([64, 128, 4096]),
    )
    s_pad, rep_pad = padded.score_with_report(reqs)
    s_pack, rep_pack = packed.score_with_report(reqs)
    torch.testing.assert_close(s_pack, s_pad, atol=2e-5, rtol=1e-4)
    unique_tokens = sum(len(t.prefix) + len(t.suffix) for t in (packed.tokenise(*r) for r in set(reqs)))
    assert rep_pack.tokens_encoded == unique_tokens < rep_pad.tokens_encoded  # no padding through the backbone
    pairs = separable_pairs(rng, 4)
    l_pad = padded.train(pairs, epochs=1, lr=1e-3, batch_pairs=len(pairs))[0]["loss"]
    l_pack = packed.train(pairs, epochs=1, lr=1e-3, batch_pairs=len(pairs))[0]["loss"]
    assert l_pack == pytest.approx(l_pad, abs=1e-5)
    for (n, a), (_, b) in zip(
        padded.encoder.net.named_parameters(), packed.encoder.net.named_parameters(), strict=True
    ):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-3, msg=n)


def random_requests_mixed(rng):
    """Rows of very different lengths (padding would waste much), duplicates included."""
    reqs = [(rng.choice("ab"), f"in {i} " + words(rng, 1, 40), words(rng, 1, 8)) for i in range(14)]
    return reqs + reqs[:3]


def test_packing_needs_a_supported_backbone(tokenizer, seed):
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=512))
    cfg = RewardModelConfig(seed=seed, packing=True, architecture="decoder")
    with pytest.raises(
        ValueError, match=r"config.packing=True needs a backbone of model_type .*got 'gpt2' \(decoder\)"
    ):
        RewardModel(gpt2, ["a"], tokenizer=tokenizer, config=cfg)
    with pytest.raises(ValueError, match="pack_tokens"):
        make_model("encoder", tokenizer, seed, packing=True, pack_tokens=0)


@pytest.mark.parametrize("prefix_sharing,by_positions", [(True, False), (False, False), (True, True)])
def test_decoder_packed_batches_equal_padded_scores_and_gradients(
    prefix_sharing, by_positions, tokenizer, seed, monkeypatch
):
    """Llama-type decoder, packs of several prefix groups (a prefix once per group, its suffixes after it) and
    of lone rows, an empty output among them: the same scores, loss and every gradient as padded batches, and
    only the distinct prefix and suffix tokens through the backbone. ``by_positions``: the path a flash-attention
    kernel takes (no mask, rows found from the position ids; no sharing), here through transformers' SDPA mask."""
    if by_positions:
        from optimas_fast.reward.encoder import Encoder

        monkeypatch.setattr(Encoder, "packs_by_positions", lambda self: True)
        prefix_sharing_in_pack = False
    else:
        prefix_sharing_in_pack = prefix_sharing
    rng = random.Random(seed)
    reqs = random_requests_mixed(rng)
    reqs += [(c, i, words(rng, 1, 8)) for c, i, _ in reqs[:6]]  # prefix groups of 2+ rows
    reqs += [(reqs[0][0], reqs[0][1], "")]  # an empty output: scored at its prefix's last token
    kw = dict(components=("a", "b"), prefix_sharing=prefix_sharing)
    padded = make_model("decoder", tokenizer, seed, **kw)
    packed = make_model("decoder", tokenizer, seed, packing=True, pack_tokens=rng.choice([128, 256, 4096]), **kw)
    s_pad, rep_pad = padded.score_with_report(reqs)
    s_pack, rep_pack = packed.score_with_report(reqs)
    torch.testing.assert_close(s_pack, s_pad, atol=2e-5, rtol=1e-4)
    toks = [packed.tokenise(*r) for r in dict.fromkeys(reqs)]
    if prefix_sharing_in_pack:  # each prefix of a group once per pack: at most, and here below, the rows' tokens
        lower = sum(len(t.suffix) for t in toks) + sum(len(p) for p in {t.prefix for t in toks})
        assert lower <= rep_pack.tokens_encoded < sum(len(t.prefix) + len(t.suffix) for t in toks)
    else:
        assert rep_pack.tokens_encoded == sum(len(t.prefix) + len(t.suffix) for t in toks)
    pairs = separable_pairs(rng, 4)
    l_pad = padded.train(pairs, epochs=1, lr=1e-3, batch_pairs=len(pairs))[0]["loss"]
    l_pack = packed.train(pairs, epochs=1, lr=1e-3, batch_pairs=len(pairs))[0]["loss"]
    assert l_pack == pytest.approx(l_pad, abs=1e-5)
    n_grads = 0
    for (n, a), (_, b) in zip(
        padded.encoder.net.named_parameters(), packed.encoder.net.named_parameters(), strict=True
    ):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-3, msg=n)
            n_grads += 1
    assert n_grads > 5
