"""Checkpoints written before the reward/ package split (tests/fixtures/reward_ckpt_v1, made by
tests/fixtures/make_reward_ckpt_v1.py at the commit named in expected.json) load with today's code, score the
same rows as that code did, and training continues where it left off (same losses, same scores after)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from optimas_fast.reward import PreferencePair, RewardModel

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "reward_ckpt_v1")
with open(os.path.join(FIXTURE, "expected.json")) as _f:
    EXPECTED = json.load(_f)

# fp32 throughout: the same weights and the same math, only summation order may differ between versions
ATOL, RTOL = 2e-5, 1e-4


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_v1_checkpoint_loads_scores_and_trains_on(kind):
    exp = EXPECTED["checkpoints"][kind]
    rows = [tuple(r) for r in EXPECTED["rows"]]
    rm = RewardModel.load(os.path.join(FIXTURE, kind), device="cpu")
    assert rm.components == ["first", "second"] and rm.is_encoder == (kind == "bert")
    assert rm.trainer is not None and rm.trainer.step == 2
    torch.testing.assert_close(rm.score(rows), torch.tensor(exp["scores"]), atol=ATOL, rtol=RTOL)
    hist = rm.adapt([PreferencePair(*p) for p in EXPECTED["more_pairs"]], steps=2, batch_pairs=4)
    torch.testing.assert_close(torch.tensor([h["loss"] for h in hist]), torch.tensor(exp["adapt_losses"]),
                               atol=ATOL, rtol=RTOL)
    assert rm.trainer.step == exp["step_after_adapt"]
    torch.testing.assert_close(rm.score(rows), torch.tensor(exp["scores_after_adapt"]), atol=ATOL, rtol=RTOL)
    # the continued training moved the scores (the comparison above could fail)
    assert not torch.allclose(torch.tensor(exp["scores"]), torch.tensor(exp["scores_after_adapt"]), atol=1e-3)
