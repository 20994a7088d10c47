"""CLI: --help on every command, strict config errors (key + allowed values: optimas_fast.run.parse_config), run /
eval / resume end to end on the synthetic system with a tiny random LRF, and the report files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import yaml

from optimas_fast import cli, run
from optimas_fast.optimize import ConfigError
from optimas_fast.reward import LoraSettings, RewardModelConfig, TemplateConfig, TrainConfig


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("command", [[], ["demo"], ["run"], ["eval"], ["resume"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(command + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: optimas-fast" in out
    if command == ["run"]:
        assert "system:" in out and "loop:" in out  # the config format is documented in --help


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        (
            {"system": "amazn"},
            "system must be one of ['pubmedqa', 'hotpotqa', 'amazon', ",
            "'synthetic'] or 'package.module:factory'",
        ),
        ({"system": "synthetic", "sytem": 1}, "'sytem'", "'system'"),
        ({"system": "synthetic", "data": {"trian": 3}}, "'data.trian'", "'train'"),
        ({"system": "synthetic", "data": {"train": 0}}, "data.train", ">= 1"),
        ({"system": "synthetic", "reward": {"backbone": "bert-huge"}}, "reward.backbone", "'minilm', 'tiny-random'"),
        ({"system": "synthetic", "reward": {"max_len": 3}}, "'reward.max_len'", "'max_length'"),
        (
            {"system": "synthetic", "reward": {"template": {"max_lenght": 3}}},
            "'reward.template.max_lenght'",
            "'truncation_side'",
        ),
        (
            {"system": "synthetic", "reward": {"amp": "fp8"}},
            "reward.amp must be one of ['auto', 'bf16', 'none']",
            "'fp8'",
        ),
        ({"system": "synthetic", "reward": {"max_length": 2}}, "reward.max_length must be an int >= 4", "got 2"),
        ({"system": "synthetic", "reward": {"max_length": "x"}}, "reward.max_length must be of type int", "'x'"),
        ({"system": "synthetic", "reward": {"template": {"max_length": 2}}}, "reward.template.max_length must", ">= 4"),
        (
            {"system": "synthetic", "reward": {"template": {"truncation_side": "up"}}},
            "reward.template.truncation_side must be one of ['left', 'right']",
            "'up'",
        ),
        ({"system": "synthetic", "reward": {"lora": {"r": 0}}}, "reward.lora.r must be an int >= 1", "got 0"),
        ({"system": "synthetic", "reward": {"lora": {"dropout": 1}}}, "reward.lora.dropout must be", "[0, 1)"),
        ({"system": "synthetic", "reward": {"packing": 1}}, "reward.packing must be of type bool", "got 1"),
        ({"system": "synthetic", "reward": {"lora": {"rank": 4}}}, "'reward.lora.rank'", "'alpha'"),
        ({"system": "synthetic", "reward": {"seed": 4}}, "reward.seed: the reward model's seed is loop.seed", ""),
        (
            {"system": "synthetic", "reward": {"max_length": 64, "template": {"max_length": 32}}},
            "reward.max_length",
            "give one of them",
        ),
        ({"system": "synthetic", "loop": {"iterations": -1}}, "loop.iterations", ">= 0"),
        ({"system": "synthetic", "loop": {"collect": {"num_candidates": 1}}}, "loop.collect.num_candidates", ">= 2"),
        ({"system": "synthetic", "reward": {"train": {"lr": -1}}}, "reward.train.lr must be", "> 0, got -1"),
        ({"system": "synthetic", "reward": {"train": {"lr": "fast"}}}, "reward.train.lr must be of type", "'fast'"),
        ({"system": "synthetic", "reward": {"train": {"shedule": "x"}}}, "'reward.train.shedule'", "'schedule'"),
        ({"system": "synthetic", "reward": {"train": {"schedule": "x"}}}, "reward.train.schedule", "'cosine'"),
        ({"system": "synthetic", "reward": {"train": {"replay_fraction": 1}}}, "reward.train.replay_fraction", "1)"),
        ({"system": "synthetic", "reward": {"train": {"group_by_input": 1}}}, "reward.train.group_by_input", "bool"),
        ({"system": "synthetic", "reward": {"train": [1]}}, "reward.train must be a mapping", "list"),
        ({"system": "synthetic", "reward": {"train": {"seed": 1}}}, "reward.train.seed", "loop.seed"),
        ({"system": "synthetic", "loop": {"lr": 1e-3}}, "loop.lr moved to reward.train.lr", "TrainConfig"),
        ({"system": "synthetic", "loop": {"head_lr": 1e-3}}, "loop.head_lr moved to reward.train.head_lr", ""),
        ({"system": "synthetic", "loop": {"batch_pairs": 4}}, "loop.batch_pairs moved to reward.train.batch_pairs", ""),
        ({"system": "synthetic", "loop": {"collect": {"strategy": "x"}}}, "collect.strategy", "'variables'"),
        ({"system": "synthetic", "loop": {"budget": {"max_usd": -2}}}, "budget.max_usd", ">= 0"),
        ({"system": "amazon", "system_config": {"max_itemz": 4}}, "'system_config.max_itemz'", "'max_items'"),
        ({"system": "pubmedqa", "system_config": {"analyst_max_tokens": "x"}}, "system_config.analyst_max_tokens", "x"),
        ({"system": "synthetic", "system_config": {}}, "system_config: only the built-in examples", "'synthetic'"),
        ({"system": "synthetic", "lms": []}, "lms", "mapping"),
        ({"system": "synthetic", "lm": 3}, "lm", "'embedded'"),
        (["system", "amazon"], "must be a mapping", ""),
    ],
)
def test_parse_config_errors(raw, key, allowed):
    with pytest.raises(ConfigError) as exc:
        run.parse_config(raw)
    assert key in str(exc.value) and allowed in str(exc.value), str(exc.value)


# a value other than the default for every field of the reward engine's config (a new field fails the test below
# until it is given one here, so nothing the engine takes is out of the YAML's reach)
REWARD_VALUES = {
    "architecture": "encoder",
    "pooling": "mean",
    "prefix_sharing": False,
    "shared_prefix_kernel": False,
    "token_budget": 2048,
    "max_rows": 64,
    "amp": "bf16",
    "score_amp": "none",
    "score_weights": "autocast",
    "token_cache_size": 1000,
    "attn_implementation": "eager",
    "packing": True,
    "pack_tokens": 512,
    "train_chunk_tokens": 4096,
    "padding_bucket": 8,
    "gradient_checkpointing": True,
    "lean_activations": "all",
    "head_init_std": 0.05,
    "disable_dropout": False,
    "template": {
        "max_length": 77,
        "prefix_format": "{inputs}",
        "truncation_side": "right",
        "min_prefix_tokens": 2,
        "append_eos": True,
    },
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query"]},
}


def test_every_reward_model_setting_is_reachable_from_the_yaml():
    names = {f.name for f in dataclasses.fields(RewardModelConfig)} - {"seed"}
    assert names <= set(REWARD_VALUES), f"give REWARD_VALUES a value for {sorted(names - set(REWARD_VALUES))}"
    values = {k: v for k, v in REWARD_VALUES.items() if k in names}  # a field being added elsewhere may not be in yet
    cfg = run.parse_config({"system": "synthetic", "reward": values, "loop": {"seed": 11}})
    got = dataclasses.asdict(cfg.reward)
    for name, value in values.items():
        assert got[name] == value and value != dataclasses.asdict(RewardModelConfig())[name], name
    assert isinstance(cfg.reward.template, TemplateConfig) and isinstance(cfg.reward.lora, LoraSettings)
    assert cfg.reward.seed == 11  # one seed: the reward model's is loop.seed
    # max_length is short for template.max_length; unset, the engine's one default applies
    assert run.parse_config({"system": "synthetic", "reward": {"max_length": 64}}).reward.template.max_length == 64
    assert run.parse_config({"system": "synthetic"}).reward.template.max_length == TemplateConfig().max_length


def test_every_example_systems_settings_are_reachable_from_the_yaml(monkeypatch):
    """system_config: is the built-in example's own settings class (the one its builder takes), handed to
    load_example; every example has one."""
    import typing

    from optimas_fast.examples import EXAMPLES

    assert set(run.EXAMPLE_CONFIGS) == set(EXAMPLES)
    for name, (_, builder, _) in EXAMPLES.items():
        assert run.EXAMPLE_CONFIGS[name] in typing.get_args(typing.get_type_hints(builder)["config"]), name
    cfg = run.parse_config({"system": "amazon", "system_config": {"max_items": 4, "init_scale": 5}})
    assert cfg.system_config == run.EXAMPLE_CONFIGS["amazon"](max_items=4, init_scale=5)
    # a YAML list becomes the tuple a tuple field holds
    pub = run.parse_config({"system": "pubmedqa", "system_config": {"temperatures": [0.0, 0.3, 1.0]}})
    assert pub.system_config.temperatures == (0.0, 0.3, 1.0)
    assert run.parse_config({"system": "amazon"}).system_config is None  # the example's own defaults
    seen = {}

    def fake_load_example(name, lms, **kwargs):
        seen.update(kwargs, name=name)
        raise RuntimeError("stop here")  # what matters is what build passed

    monkeypatch.setattr(run, "load_example", fake_load_example)
    monkeypatch.setattr(run, "make_lm_spec", lambda spec, where: object())
    with pytest.raises(RuntimeError, match="stop here"):
        run.build(cfg)
    assert seen["name"] == "amazon" and seen["config"] == cfg.system_config and seen["config"] is not cfg.system_config


def test_one_seed_drives_the_split_and_the_reward_model():
    cfg = run.parse_config({"system": "synthetic", "loop": {"seed": 5}})
    assert cfg.data["seed"] == 5 and cfg.reward.seed == 5 and cfg.loop.seed == 5
    cfg = run.parse_config({"system": "synthetic", "data": {"seed": 2}, "loop": {"seed": 5}})
    assert cfg.data["seed"] == 2 and cfg.reward.seed == 5  # an explicit split seed stays


# a value other than the default for every field of the reward model's training settings (a new TrainConfig field
# fails the test below until it is given one here)
TRAIN_VALUES = {
    "lr": 1e-4,
    "head_lr": 2e-3,
    "weight_decay": 0.01,
    "warmup_steps": 3,
    "schedule": "cosine",
    "min_lr_ratio": 0.0,
    "batch_pairs": 8,
    "weighting": "uniform",
    "margin_floor": 0.1,
    "subtract_margin": True,
    "margin_scale": 0.5,
    "center": 0.01,
    "grad_clip": None,
    "group_by_input": False,
    "replay_size": 16,
    "replay_fraction": 0.25,
}


def test_every_training_setting_is_reachable_from_the_yaml():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names == set(TRAIN_VALUES), f"TRAIN_VALUES and TrainConfig differ: {sorted(names ^ set(TRAIN_VALUES))}"
    cfg = run.parse_config({"system": "synthetic", "reward": {"train": TRAIN_VALUES}})
    assert isinstance(cfg.train, TrainConfig)
    for name, value in TRAIN_VALUES.items():
        assert getattr(cfg.train, name) == value != getattr(TrainConfig(), name), name
    assert run.parse_config({"system": "synthetic"}).train == TrainConfig()  # unset: the engine's one default


def test_the_run_trains_its_reward_model_with_reward_train(tmp_path):
    """``reward.train`` from a YAML file reaches the built model's training settings (the ones the loop trains it
    with: the loop has no learning rate of its own), for a backbone directory and for tiny-random alike."""
    from transformers import BertConfig, BertModel

    from optimas_fast.optimize.testing import _tokenizer

    backbone = tmp_path / "tiny-bert"  # a local model directory, loaded as a user's backbone is
    BertModel(
        BertConfig(
            vocab_size=_tokenizer().vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(backbone)
    _tokenizer().save_pretrained(backbone)
    for name in ("tiny-random", str(backbone)):
        path = tmp_path / "run.yaml"
        path.write_text(
            f"system: synthetic\nreward:\n  backbone: {name}\n"
            "  train: {lr: 1e-4, schedule: cosine, replay_size: 16}\nloop: {seed: 4}\n"
        )
        cfg = run.load_config(path)
        _, _, rm, _ = run.build(cfg)
        assert rm.loops.config == TrainConfig(lr=1e-4, schedule="cosine", replay_size=16), name
        assert rm.loops.config is not cfg.train  # the parsed config stays as parsed
        assert rm.encoder.config.seed == 4  # one seed: the model's data order and replay follow loop.seed
    for gone in ("lr", "head_lr", "batch_pairs"):  # one home per knob
        assert gone not in {f.name for f in dataclasses.fields(run.OptimasConfig)}
    with pytest.raises(TypeError):
        run.OptimasConfig(lr=1e-3)


def test_the_loop_trains_with_the_models_settings(monkeypatch):
    """The loop passes no training settings of its own: every rm.train / rm.adapt call runs on rm.loops.config."""
    from optimas_fast.optimize import Optimas
    from optimas_fast.optimize.testing import build_synthetic, tiny_reward_model

    system, _, train, val = build_synthetic(3)
    rm = tiny_reward_model({"pick_a": "a", "pick_b": "b"}, 3, train=TrainConfig(lr=2e-3, batch_pairs=4))
    seen = []
    for name in ("train", "adapt"):
        real = getattr(rm.loops, name)

        def spy(pairs, *args, _real=real, _name=name, **kwargs):
            seen.append((_name, {k: v for k, v in kwargs.items() if k not in ("epochs", "steps", "overlong")}))
            return _real(pairs, *args, **kwargs)

        monkeypatch.setattr(rm.loops, name, spy)
    cfg = run.OptimasConfig.from_dict(
        {"seed": 3, "iterations": 1, "initial_examples": 6, "initial_epochs": 1, "adapt_steps": 1, "val_workers": 1}
    )
    Optimas(rm, None, cfg).optimize(system, train[:10], val[:4])
    assert {n for n, _ in seen} == {"train", "adapt"}
    assert all(kw in ({}, {"lr": None}) for _, kw in seen), seen  # no override: the model's settings rule
    assert rm.loops.config.lr == 2e-3 and rm.loops.config.batch_pairs == 4


def test_build_hands_the_reward_settings_to_the_model():
    cfg = run.parse_config(
        {
            "system": "synthetic",
            "reward": {"max_length": 64, "score_amp": "none", "template": {"truncation_side": "right"}},
            "loop": {"seed": 3},
        }
    )
    _, _, rm, _ = run.build(cfg)
    assert rm.encoder.config.template.max_length == 64 and rm.encoder.config.template.truncation_side == "right"
    assert rm.encoder.config.score_amp == "none" and rm.encoder.config.seed == 3
    assert rm.encoder.config is not cfg.reward  # the parsed config stays as parsed
    # one seed: another loop.seed (what a comparison's cells do) re-seeds the model too
    _, _, rm, _ = run.build(dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, seed=9)))
    assert rm.encoder.config.seed == 9


def test_invalid_config_file_exits_2_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: synthetic\nloop: {batch_sise: 3}\n")
    assert cli.main(["run", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "loop.batch_sise" in err and "batch_size" in err
    (tmp_path / "broken.yaml").write_text("system: [unclosed\n")
    assert cli.main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(["resume", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_run_eval_resume_synthetic(tmp_path, seed, capsys):
    cfg = {
        "system": "synthetic",
        "data": {"seed": seed % 1000},
        "reward": {"backbone": "tiny-random", "train": {"lr": 1e-3, "head_lr": 1e-2, "batch_pairs": 32}},
        "loop": {
            "seed": seed % 1000,
            "iterations": 2,
            "batch_size": 8,
            "initial_examples": 16,
            "initial_epochs": 6,
            "adapt_steps": 8,
            "val_workers": 1,
            "collect": {"workers": 1},
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert cli.main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test score before" in printed and "test score after" in printed and str(out) in printed
    report = json.loads((out / "report.json").read_text())
    for key in (
        "config",
        "iterations",
        "best_val",
        "initial_val",
        "usage",
        "wall_seconds",
        "test_before",
        "test_after",
        "final_variables",
    ):
        assert key in report, key
    assert [h["iteration"] for h in report["iterations"]] == [0, 1, 2]
    assert report["test_after"]["lo"] <= report["test_after"]["mean"] <= report["test_after"]["hi"]
    assert (out / "report.png").stat().st_size > 1000
    assert (out / "system_state.json").is_file() and (out / "config.yaml").is_file()
    assert cli.main(["eval", str(out), "--split", "val", "--no-progress", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["mean"] == pytest.approx(report["best_val"])
    # resume of a finished run: nothing new, same result
    assert cli.main(["resume", str(out), "--no-progress"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["iterations"] == report["iterations"]


def test_bootstrap_ci_and_report_cleaning(seed, tmp_path):
    import random

    from optimas_fast.report import bootstrap_ci, build_report, plot_report

    rng = random.Random(seed)
    scores = [float(rng.random() < 0.6) for _ in range(rng.randint(5, 60))]
    ci = bootstrap_ci(scores, seed=seed)
    assert ci["n"] == len(scores) and ci["lo"] <= ci["mean"] <= ci["hi"]
    assert ci["mean"] == pytest.approx(sum(scores) / len(scores))
    assert bootstrap_ci([1.0] * 7) == {"n": 7, "mean": 1.0, "lo": 1.0, "hi": 1.0}
    assert bootstrap_ci([])["mean"] is None
    state = {
        "history": [
            {
                "iteration": 0,
                "component": None,
                "val_score": float("nan"),
                "best_val": 0.2,
                "accepted": None,
                "alignment": {"a": {"accuracy": float("nan")}},
            },
            {
                "iteration": 1,
                "component": "a",
                "val_score": 0.1,
                "best_val": 0.2,
                "accepted": False,
                "alignment": {"a": {"accuracy": 0.7}},
            },
        ],
        "system": {"variables": {"a": {"kind": "choice", "value": {"k": 1}, "space": {"k": [1]}}}},
    }
    report = build_report(state, {"test_after": {"mean": float("inf")}})
    text = json.dumps(report, allow_nan=False)  # strict JSON: NaN/inf became null
    assert report["rejected"] == 1 and report["final_variables"]["a"]["value"] == {"k": 1}
    assert '"test_after": {"mean": null}' in text
    plot_report(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------- slow, end to end
def _strip(x):
    """A run's record without what differs between processes by nature (wall times, replayed LM usage)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in ("seconds", "usage", "elapsed")}
    return [_strip(v) for v in x] if isinstance(x, list) else x


def _lrf_digest(run_dir):
    from optimas_fast.optimize import load_run_state
    from optimas_fast.optimize.testing import tiny_reward_model
    from optimas_fast.reward.checkpoint import stable_parameters

    rm = tiny_reward_model({"extract": "x", "route": "y"}, 12345)  # overwritten by the checkpoint
    rm.load_state(run_dir / load_run_state(run_dir)["lrf_checkpoint"])
    return {k: v.detach().clone() for k, v in stable_parameters(rm).items()}


@pytest.mark.slow
def test_sigkilled_cli_run_of_an_example_resumes_to_the_same_final_state(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "examples" / "own_pipeline.yaml").read_text())
    raw["loop"]["iterations"] = 4
    raw["data"] = {k: str(repo / "examples" / "own_pipeline_data" / f"{k}.jsonl") for k in ("train", "val", "test")}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def cli_cmd(*args):
        return [sys.executable, "-m", "optimas_fast.cli", *args, "--no-progress"]

    full = subprocess.Popen(
        cli_cmd("run", str(config), "--out", str(tmp_path / "full")), env=env, cwd=repo, stdout=subprocess.DEVNULL
    )
    victim = subprocess.Popen(
        cli_cmd("run", str(config), "--out", str(tmp_path / "killed")), env=env, cwd=repo, stdout=subprocess.DEVNULL
    )
    state_file = tmp_path / "killed" / "run_state.json"
    deadline, killed_at = time.time() + 240, None
    while time.time() < deadline and victim.poll() is None:
        if state_file.exists():
            it = json.loads(state_file.read_text())["iteration"]  # replaced atomically: always whole
            if it >= 2:
                victim.send_signal(signal.SIGKILL)
                killed_at = it
                break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert killed_at is not None, "the run finished or stalled before it could be killed"
    assert victim.returncode == -signal.SIGKILL
    assert json.loads(state_file.read_text())["iteration"] < 4 and not (tmp_path / "killed" / "report.json").exists()
    subprocess.run(
        cli_cmd("resume", str(tmp_path / "killed")),
        env=env,
        cwd=repo,
        check=True,
        timeout=300,
        stdout=subprocess.DEVNULL,
    )
    assert full.wait(timeout=300) == 0
    a, b = (json.loads((tmp_path / d / "run_state.json").read_text()) for d in ("full", "killed"))
    assert a["iteration"] == b["iteration"] == 4
    assert _strip(a["history"]) == _strip(b["history"]) and a["best_val"] == b["best_val"]
    assert a["system"] == b["system"]
    sa, sb = (json.loads((tmp_path / d / "system_state.json").read_text()) for d in ("full", "killed"))
    assert sa == sb
    la, lb = _lrf_digest(tmp_path / "full"), _lrf_digest(tmp_path / "killed")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "killed"))
    assert ra["test_before"] == rb["test_before"] and ra["test_after"] == rb["test_after"]


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path):
    """`optimas-fast demo --quick` exactly as a newcomer runs it (embedded SmolLM2, MiniLM LRF, offline): it exits 0,
    prints the test accuracy before and after, and leaves the report and the optimized system."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "optimas_fast.cli", "demo", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy:" in proc.stdout and "->" in proc.stdout, proc.stdout[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["initial_val"] is not None and report["iterations_done"] is not None, report
    assert (out / "system_state.json").is_file()
