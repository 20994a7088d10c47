"""The one training step (reward/trainer.py: Trainer.step -> StepReport) under every loop: its report against
quantities computed by hand, its arguments checked, and loops that never change each other's settings (a TRL-style
run followed by adapt() and train() on the same model uses their own replay, grouping, weights and optimizer
settings). Tiny randomly initialised backbones over MiniLM's tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest
import test_reward
import torch
from test_reward import make_model, separable_pairs

from optimas_fast import ops
from optimas_fast.reward import PreferencePair, TrainConfig, pair_weights
from optimas_fast.reward import trainer as trainer_mod
from optimas_fast.reward.encode import encode_planned
from optimas_fast.reward.metrics import pair_metrics
from optimas_fast.reward.sharded import score_rows
from optimas_fast.reward.trainer import PairBatch, StepReport, pair_rows
from optimas_fast.trl import RewardConfig, RewardTrainer

tokenizer = test_reward.tokenizer  # MiniLM's tokenizer: test_reward's module-scoped fixture


def _pairs(rng, n_inputs, comps=("a", "b")):
    """separable_pairs plus one fixed pair per component: never empty (an input whose three candidates tie gives
    no pair; with few inputs that happens for some seeds)."""
    fixed = [PreferencePair(c, f"question 99 {c}", "excellent excellent", "poor poor", 0.7) for c in comps]
    return separable_pairs(rng, n_inputs, comps=comps) + fixed


def _batch(rm, pairs, rng, margins=True, center=0.0):
    rows = pair_rows(rm.encoder, pairs)
    weights = [rng.uniform(0.2, 2.0) for _ in pairs]
    mu = [rng.uniform(0.0, 0.5) for _ in pairs] if margins else None
    return PairBatch(rows, weights, mu, center)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_step_report_equals_hand_computation(kind, tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model(kind, tokenizer, seed, components=("a", "b"))
    pairs = _pairs(rng, 4)
    rng.shuffle(pairs)
    pairs = pairs[: rng.randint(3, len(pairs))]  # an odd batch size, often
    batch = _batch(rm, pairs, rng, center=rng.choice([0.0, 0.05]))
    n = len(pairs)
    # by hand, before the step: scores of every row, the loss through ops' reference, the accuracy definition
    s = score_rows(rm.encoder, batch.rows)[0]  # (2B,) fp32 scoring of the same rows
    rc, rr = s[:n], s[n:]
    w, mu = torch.tensor(batch.weights), torch.tensor(batch.margins)
    want_loss = float(ops.bt_loss(rc, rr, weight=w, margin=mu, center=batch.center, backend="torch"))
    blocks = pair_metrics(rc, rr, [p.component for p in pairs])["per_component"]
    want_acc = {c: m["accuracy"] for c, m in blocks.items()}
    before = {k: v.detach().clone() for k, v in rm.encoder.net.named_parameters()}
    rep = rm.trainer.step(batch, 1e-3, head_lr=2e-2, weight_decay=0.1, max_grad_norm=None)
    assert isinstance(rep, StepReport) and rep.pairs == n and rep.lr == 1e-3 and rm.trainer.global_step == 1
    assert rep.loss == pytest.approx(want_loss, rel=1e-4, abs=1e-5)
    assert rep.accuracy.keys() == want_acc.keys()
    for c in want_acc:
        assert rep.accuracy[c] == pytest.approx(want_acc[c], abs=1e-9), c
    # no clipping asked: the gradients are the step's own, and grad_norm is their global norm
    grads = [p.grad.flatten() for p in rm.encoder.net.parameters() if p.grad is not None]
    assert rep.grad_norm == pytest.approx(float(torch.cat(grads).norm()), rel=1e-5)
    with torch.no_grad():  # the tokens the planned encoding of these rows pushes through the backbone
        want_tokens = encode_planned(rm.encoder, batch.rows, rm.encoder.plan(batch.rows), inference=False)[1]
    assert rep.tokens == want_tokens > 0
    opt = rm.trainer.optimizer
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # heads are never decayed
    moved = [k for k, v in rm.encoder.net.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("head_") for k in moved) and any(k.startswith("backbone") for k in moved)


def test_step_clips_to_max_grad_norm_and_reports_the_norm_before(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed, components=("a", "b"))
    batch = _batch(rm, _pairs(rng, 3), rng)
    rep = rm.trainer.step(batch, 1e-3, max_grad_norm=1e-3)
    grads = torch.cat([p.grad.flatten() for p in rm.encoder.net.parameters() if p.grad is not None])
    assert rep.grad_norm > 1e-3 and float(grads.norm()) == pytest.approx(1e-3, rel=1e-3)
    # lr 0 is a real step (a warm-up's first): Adam's moments move, the weights do not
    rm2 = make_model("decoder", tokenizer, seed, components=("a", "b"))
    before = {k: v.detach().clone() for k, v in rm2.encoder.net.named_parameters()}
    rm2.trainer.step(batch, 0.0)
    assert all(torch.equal(v, before[k]) for k, v in rm2.encoder.net.named_parameters())
    assert all(float(s["step"]) == 1 for s in rm2.trainer.optimizer.state.values())


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"head_lr": -1.0}, "head_lr"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ],
)
def test_step_arguments_are_checked(kw, name, tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("encoder", tokenizer, seed, components=("a", "b"))
    batch = _batch(rm, _pairs(rng, 2), rng)
    args = {"lr": 1e-3, **kw}
    with pytest.raises(ValueError, match=f"Trainer.step: {name} must be"):
        rm.trainer.step(batch, args.pop("lr"), **args)
    bad = PairBatch(batch.rows, list(batch.weights)[:-1], None)
    with pytest.raises(ValueError, match="weights"):
        rm.trainer.step(bad, 1e-3)
    assert rm.trainer.global_step == 0 and rm.trainer.optimizer is None  # refused before touching anything


def test_trl_run_then_adapt_and_train_use_their_own_settings(tokenizer, tmp_path, seed, monkeypatch):
    """The TRL face's per-step settings (uniform weights, subtracted margins, its lr / decay / clipping, no
    grouping, no replay) stay in its loop: a later adapt() on the same model uses adapt's replay and the model's
    weighting and optimizer settings, and train() groups pairs by input."""
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed, components=("a", "b"))
    trl_pairs = _pairs(rng, 6, comps=("a",))
    rows = [
        {"prompt": p.inputs, "chosen": p.chosen, "rejected": p.rejected, "margin": p.margin, "component": "a"}
        for p in trl_pairs
    ]
    import datasets

    args = RewardConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        weight_decay=0.3,
        max_grad_norm=0.5,
        save_strategy="no",
        disable_tqdm=True,
    )
    calls = []
    real_step = rm.trainer.step

    def spy(batch, lr, **kw):
        calls.append({"weights": list(batch.weights), "margins": batch.margins, "center": batch.center, "lr": lr, **kw})
        return real_step(batch, lr, **kw)

    monkeypatch.setattr(rm.trainer, "step", spy)
    tr = RewardTrainer(model=rm, args=args, train_dataset=datasets.Dataset.from_list(rows))
    assert tr.model is rm
    tr.train()
    # TRL's uniform weights and subtracted margins on every step (a step holds at most 4 pairs: how many pairs an
    # input gives depends on the seed, so an epoch's last batch may be short)
    assert len(calls) == 3 and all(
        1 <= len(c["weights"]) <= 4
        and c["weights"] == [1.0] * len(c["weights"])
        and c["margins"] is not None
        and len(c["margins"]) == len(c["weights"])
        for c in calls
    )
    assert len(calls[0]["weights"]) == 4
    assert all(c["weight_decay"] == 0.3 and c["max_grad_norm"] == 0.5 and c["head_lr"] == c["lr"] for c in calls)
    assert rm.loops.config == TrainConfig() and rm.loops.replay == {}  # the TRL run left the engine loops alone
    # adapt(): the model's settings (margin weights, no subtracted margin, heads at 20x, clip 1.0, no decay)
    calls.clear()
    fresh = [
        PreferencePair("b", f"question {i}", "excellent " * (1 + i % 2), "poor", m)
        for i, m in enumerate([0.1, 0.4, 0.9])
    ]  # distinct margins: margin weights are not uniform
    h1 = rm.adapt(fresh, steps=2, lr=2e-4, batch_pairs=4)
    h2 = rm.adapt(fresh, steps=2, lr=2e-4, batch_pairs=4)
    assert all(h["replay"] == 0 for h in h1)  # nothing remembered before the first adapt (TRL keeps no replay)
    assert all(h["replay"] == 2 and h["fresh"] == 2 for h in h2)  # adapt's replay: replay_fraction 0.5 of 4
    assert len(rm.loops.replay["b"]) == 2 * len(fresh)  # each adapt() remembers its fresh pairs
    for c in calls:
        assert c["margins"] is None and c["center"] == 0.0 and c["lr"] == 2e-4
        assert c["head_lr"] == pytest.approx(20 * 2e-4) and c["weight_decay"] == 0.0 and c["max_grad_norm"] == 1.0
    # margin weights against each call's reference margin (fresh + replay pool): never TRL's uniform 1.0s
    first = pair_weights([p.margin for p in fresh], 0.05, float(np.mean([p.margin for p in fresh])))
    assert all(any(w == pytest.approx(x) for x in first) for c in calls[:2] for w in c["weights"])
    assert all(len(c["weights"]) == 3 for c in calls[:2]) and all(len(c["weights"]) == 4 for c in calls[2:])
    assert any(w != 1.0 for c in calls for w in c["weights"])
    # train(): grouping by input, as the model's TrainConfig says (the TRL face shuffled without it)
    seen = []
    real_batches = trainer_mod.make_batches
    monkeypatch.setattr(trainer_mod, "make_batches", lambda *a, **k: seen.append(a[2]) or real_batches(*a, **k))
    rm.train(trl_pairs, epochs=1, lr=1e-4)
    assert seen == [True]
    assert rm.loops.config == TrainConfig()  # and no call changed the model's defaults


def test_checkpoint_keeps_the_model_defaults_not_a_calls_overrides(tokenizer, tmp_path, seed):
    """Overrides are per call, also across save / load; the model's own defaults (loops.config) round-trip."""
    rng = random.Random(seed)
    rm = make_model("encoder", tokenizer, seed, components=("a", "b"))
    rm.loops.config = TrainConfig(lr=2e-3, batch_pairs=4, replay_size=7)
    fixed = PreferencePair("a", "question 99 alpha", "excellent excellent", "poor poor", 0.7)  # never an empty set
    rm.train(separable_pairs(rng, 3) + [fixed], epochs=1, lr=5e-4, weight_decay=0.2, center=0.1)
    rm.save(tmp_path / "ck")
    back = type(rm).load(tmp_path / "ck", device="cpu")
    assert back.loops.config == TrainConfig(lr=2e-3, batch_pairs=4, replay_size=7)
    assert back.trainer.global_step == rm.trainer.global_step
    assert {c: len(b) for c, b in back.loops.replay.items()} == {c: len(b) for c, b in rm.loops.replay.items()}
    assert all(len(b) <= 7 for b in back.loops.replay.values())
    h = back.adapt([fixed], steps=1)
    assert h[0]["lr"] == 2e-3  # the model's default, not the train() call's 5e-4
