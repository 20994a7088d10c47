"""The comparison harness (optimas_fast.compare, ``optimas-fast compare``) on examples/own_pipeline.py with its
scripted LM, and the metric-call budget it rests on (optimas_fast.optimize.budget, the loop's
``budget.max_metric_calls``).

Metric calls are counted here independently of the harness: the example's metric is replaced by a counting
one before the system is built, so every scored run anywhere (method, validation, test) is seen."""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from optimas_fast import cli
from optimas_fast.compare import METHODS, compare, harness
from optimas_fast.compare.gepa_method import SystemAdapter
from optimas_fast.compare.judge import lrf_vs_judge, parse_verdict
from optimas_fast.compare.mipro_method import NOT_A_PROGRAM
from optimas_fast.compare.report import summarize
from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.optimize import ConfigError, Optimas, OptimasConfig
from optimas_fast.optimize.budget import MetricBudgetExceeded, MetricCounter, attach, detach, unwrap
from optimas_fast.optimize.state import load_run_state
from optimas_fast.optimize.testing import SYNTHETIC_TRAIN, build_synthetic, synthetic_config, tiny_reward_model
from optimas_fast.reward import PreferencePair
from optimas_fast.system import Component, Prompt, System
from optimas_fast.system.testing import ScriptedLM

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "own_pipeline_data"
N_VAL, N_TEST = 5, 5  # examples/own_pipeline_data
BUDGET = 60  # small enough that every optimizing method runs into it on the 8-example training set
ALL = ["unoptimized", "optimas", "gepa", "global", "random", "mipro"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def counted(monkeypatch):
    """examples.own_pipeline's metric behind an independent counter: {"calls": n}."""
    monkeypatch.chdir(REPO)  # the config's factory is imported from the current directory
    monkeypatch.syspath_prepend(str(REPO))
    module = importlib.import_module("examples.own_pipeline")
    real = module.accuracy
    seen = {"calls": 0}
    lock = threading.Lock()

    def accuracy(example, prediction):
        with lock:
            seen["calls"] += 1
        return real(example, prediction)

    monkeypatch.setattr(module, "accuracy", accuracy)
    return seen


def own_config(tmp_path, name="own", **loop) -> Path:
    raw = yaml.safe_load((REPO / "examples" / "own_pipeline.yaml").read_text())
    raw["data"] = {k: str(DATA / f"{k}.jsonl") for k in ("train", "val", "test")}
    # half the examples' pairs held out, so the LRF-vs-judge section has pairs to judge
    raw["loop"].update(
        {"holdout_fraction": 0.5, "val_workers": 2, "collect": {"num_candidates": 3, "workers": 2}}, **loop
    )
    raw.pop("output", None)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------------- the harness
def test_every_method_runs_within_an_equal_budget_counted_independently(tmp_path, counted):
    config = own_config(tmp_path)
    cells = {}
    for method in ALL:  # one comparison per method, so the independent count belongs to that method alone
        before = counted["calls"]
        report = compare(config, methods=[method], budget=BUDGET, seeds=1, out=tmp_path / method)
        (cell,) = report["cells"]
        cells[method] = cell
        spent = counted["calls"] - before
        assert cell["budget"] == BUDGET
        if cell["status"] == "skipped":
            assert method == "mipro" and cell["reason"] == NOT_A_PROGRAM  # own_pipeline is no DSPy program
            assert spent == 0
            continue
        assert cell["status"] == "ok", cell
        # scored runs = the method's (charged) + the test split (not charged) + unoptimized's reference pass
        # + the judge study's pair collection on test examples (optimas only; not charged, counted apart)
        uncharged = N_TEST + (N_VAL if method == "unoptimized" else 0) + cell.get("judge_metric_calls", 0)
        assert spent - uncharged == cell["metric_calls"] <= BUDGET, (method, spent, cell["metric_calls"])
        assert len(cell["test_scores"]) == N_TEST
        assert all(x <= BUDGET for x, _ in cell["curve"])
        assert [y for _, y in cell["curve"]] == sorted(y for _, y in cell["curve"])  # best-so-far never drops
    assert cells["unoptimized"]["metric_calls"] == 0
    # GEPA reflected (its proposer reached the reflection LM) and measured candidates on the validation set
    assert cells["gepa"]["info"]["reflections"] > 0 and cells["gepa"]["info"]["val_evals"] >= 1
    # the budget binds: every optimizing method spent all of it and says it stopped there
    for method in ("optimas", "gepa", "global", "random"):
        assert cells[method]["metric_calls"] == BUDGET, method
        assert "max_metric_calls" in (cells[method]["stopped"] or ""), method
    # LM calls of a scripted LM (which bypasses the LM layer) are accounted too; the judge used the LM
    assert cells["optimas"]["usage"]["calls"] > 0 and cells["optimas"]["usage"]["prompt_tokens"] > 0
    judge = cells["optimas"]["lrf_vs_judge"]
    assert judge and all(r["n"] > 0 for r in judge.values())
    assert cells["optimas"]["judge_usage"]["calls"] == 2 * sum(r["n"] for r in judge.values())
    # the judge study also collected pairs on test examples (never trained on), outside the budget; the
    # scripted LM's calls for that are accounted apart from the judge's
    assert cells["optimas"]["judge_examples"] == harness.JUDGE_EXAMPLES
    assert cells["optimas"]["judge_metric_calls"] > 0 and cells["optimas"]["judge_pairs_usage"]["calls"] > 0
    assert sum(r["sources"]["test"] for r in judge.values()) > 0
    assert all(r["sources"]["loop_held_out"] + r["sources"]["test"] == r["n"] for r in judge.values())
    # the scripted router guesses without keywords: Optimas (and random search) find the "ticket+keywords" view
    assert cells["optimas"]["variables"]["route.context"] == "show='ticket+keywords'"
    assert sum(cells["optimas"]["test_scores"]) > sum(cells["unoptimized"]["test_scores"])


def test_outputs_resume_and_settings_mismatch(tmp_path, counted, monkeypatch):
    config = own_config(tmp_path)
    out = tmp_path / "cmp"
    methods = ["unoptimized", "optimas", "random", "mipro"]
    first = compare(config, methods=methods, budget=BUDGET, seeds=2, out=out)
    md = (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "compare.json").read_text())["format"] == "optimas_fast.compare/1"
    assert sorted(p.name for p in out.iterdir()) == ["cells", "compare.json", "compare.md", "compare.png"]
    for method in ("unoptimized", "optimas", "random"):
        assert f"| {method} | " in md
    assert f"| mipro | not run: {NOT_A_PROGRAM}" in md
    assert "Local reward functions vs an LLM judge" in md and "| own | " in md
    row = next(r for r in first["table"] if r["method"] == "optimas")
    assert row["seeds"] == 2 and row["test"]["n"] == 2 * N_TEST and row["vs_unoptimized"]["n"] == 2 * N_TEST

    # a killed comparison: one finished cell lost; the next start runs that cell only
    lost = out / "cells" / "own__random__seed1.json"
    lost.unlink()
    ran = []
    real = harness.run_cell
    monkeypatch.setattr(harness, "run_cell", lambda *a, **k: ran.append(a[3:5]) or real(*a, **k))
    second = compare(config, methods=methods, budget=BUDGET, seeds=2, out=out)
    assert ran == [("random", 1)]
    assert second["settings"]["cells_resumed"] == len(methods) * 2 - 1
    assert lost.is_file()
    strip = lambda cells: [{k: v for k, v in c.items() if "seconds" not in k} for c in cells]  # noqa: E731
    assert strip(second["cells"]) == strip(first["cells"])  # deterministic: the rerun cell is the same cell

    # report only: nothing runs, a method or seed never finished is reported as such, the rest as before
    ran.clear()
    third = compare(config, methods=[*methods, "global"], budget=BUDGET, seeds=3, out=out, report_only=True)
    assert ran == [] and third["settings"]["report_only"] is True
    rows = {r["method"]: r for r in third["table"]}
    assert rows["global"]["status"] == "missing" and rows["optimas"]["seeds"] == 2
    assert rows["optimas"]["test"] == row["test"]
    assert "| global | missing: missing |" in (out / "compare.md").read_text()
    with pytest.raises(ConfigError, match="out: no finished cells"):
        compare(config, methods=methods, budget=BUDGET, seeds=1, out=tmp_path / "empty", report_only=True)

    # the same folder with another budget is an error naming both, not a silent mix
    with pytest.raises(ConfigError, match="budget"):
        compare(config, methods=methods, budget=BUDGET + 1, seeds=2, out=out)


def test_judge_examples_zero_keeps_the_judge_study_on_the_loops_held_out_pairs(tmp_path, counted):
    config = own_config(tmp_path)
    before = counted["calls"]
    (cell,) = compare(config, methods=["optimas"], budget=BUDGET, seeds=1, out=tmp_path / "o", judge_examples=0)[
        "cells"
    ]
    assert cell["judge_examples"] == 0 and cell["judge_metric_calls"] == 0
    assert cell["judge_pairs_usage"]["calls"] == 0
    assert cell["lrf_vs_judge"] and all(r["sources"]["test"] == 0 for r in cell["lrf_vs_judge"].values())
    assert counted["calls"] - before == cell["metric_calls"] + N_TEST  # the method's and the test split's only


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": "optimas,nope"}, r"methods: unknown method \['nope'\]"),
        ({"methods": []}, "methods must be a non-empty list"),
        ({"methods": "optimas,optimas"}, "names a method twice"),
        ({"budget": 0}, "budget must be an int >= 1"),
        ({"budget": 2.5}, "budget must be an int >= 1"),
        ({"seeds": 0}, "seeds must be an int >= 1"),
        ({"judge_examples": -1}, "judge_examples must be an int >= 0"),
        ({"judge_examples": "4"}, "judge_examples must be an int >= 0"),
        ({"report_only": "yes"}, "report_only must be a bool"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, counted, kwargs, match):
    config = own_config(tmp_path)
    args = {"methods": ["unoptimized"], "budget": 10, "seeds": 1, "out": tmp_path / "o", **kwargs}
    with pytest.raises(ConfigError, match=match):
        compare(config, **args)
    assert counted["calls"] == 0  # nothing ran


def test_unreadable_configs_name_the_file(tmp_path, counted):
    with pytest.raises(ConfigError, match="config file .*missing.yaml not found"):
        compare(tmp_path / "missing.yaml", methods=["unoptimized"], budget=10, seeds=1, out=tmp_path / "o")
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        compare(bad, methods=["unoptimized"], budget=10, seeds=1, out=tmp_path / "o")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("system: own_pipeline\nlopp: {}\n")
    with pytest.raises(ConfigError, match="lopp"):
        compare(wrong, methods=["unoptimized"], budget=10, seeds=1, out=tmp_path / "o")


def test_cli_compare_runs_and_rejects_bad_arguments(tmp_path, counted, capsys):
    config = own_config(tmp_path)
    out = tmp_path / "cli"
    argv = ["compare", str(config), "--methods", "unoptimized,random", "--budget", "20", "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--seeds", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["method"] for r in printed["table"]] == ["unoptimized", "random"]
    assert printed["table"][1]["metric_calls"]["max"] <= 20
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()
    # --report-only rewrites the report from the finished cells and runs nothing (seed 1 was never run)
    (out / "compare.md").unlink()
    before = counted["calls"]
    assert cli.main([*argv, "--seeds", "2", "--report-only"]) == 0
    assert counted["calls"] == before and (out / "compare.md").is_file()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["seeds"] for r in printed["table"]] == [1, 1]
    for bad, word in (
        (["--methods", "optimas,bogus"], "methods"),
        (["--budget", "0"], "budget"),
        (["--seeds", "-1"], "seeds"),
        (["--judge-examples", "-2"], "judge_examples"),
    ):
        assert cli.main(["compare", str(config), "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err
    assert cli.main(["compare", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "bad")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- statistics
def _cell(method, seed, scores, status="ok"):
    return {
        "system": "s",
        "method": method,
        "seed": seed,
        "status": status,
        "budget": 10,
        "metric_calls": 10,
        "test_scores": scores,
        "curve": [[0, 0.5]],
        "best_val": 0.5,
        "seconds": 1.0,
        "usage": {"calls": 3, "prompt_tokens": 10, "completion_tokens": 5, "cache_hits": 1},
    }


def test_summary_pairs_differences_per_seed_and_example():
    cells = [
        _cell("unoptimized", 0, [0, 0, 1, 1]),
        _cell("unoptimized", 1, [1, 0, 1, 0]),
        _cell("optimas", 0, [1, 0, 1, 1]),
        _cell("optimas", 1, [1, 1, 1, 1]),
        _cell("random", 0, [0, 0, 1, 1]),
        _cell("global", 2, [1, 1, 1, 1]),
    ]
    methods = ["unoptimized", "optimas", "random", "global"]
    table = {r["method"]: r for r in summarize(cells, systems=["s"], methods=methods)["table"]}
    assert table["optimas"]["test"]["mean"] == pytest.approx(7 / 8)
    assert table["optimas"]["vs_unoptimized"]["mean"] == pytest.approx(3 / 8)  # (1 + 0 + 0 + 0 + 0 + 1 + 0 + 1) / 8
    assert table["optimas"]["vs_unoptimized"]["n"] == 8
    assert table["unoptimized"]["vs_unoptimized"] is None
    # random ran seed 0 only: paired with unoptimized's seed 0
    assert table["random"]["vs_unoptimized"] == {"n": 4, "mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert table["random"]["seeds"] == 1
    # global's seed 2 has no unoptimized cell to pair with: no difference rather than one over unequal seeds
    assert table["global"]["vs_unoptimized"] is None and table["global"]["test"]["mean"] == 1.0


# ------------------------------------------------------------------------------------------- the judge
class _LengthRM:
    """Scores an output by its length: right on pairs whose chosen output is the longer one."""

    def score(self, rows):
        return torch.tensor([float(len(y)) for _, _, y in rows])


def test_judge_accuracy_cancels_position_bias_and_lrf_accuracy_counts_right_pairs():
    pairs = [
        PreferencePair("c", "x", "long answer", "short"),
        PreferencePair("c", "x", "a", "bbb"),
        PreferencePair("d", "y", "yes!", "no"),
    ]
    always_a = ScriptedLM(lambda prompt, i: "A")
    res = lrf_vs_judge(pairs, _LengthRM(), always_a, {"c": "a step", "d": "another"})
    assert res["c"]["n"] == 2 and res["d"]["n"] == 1
    assert res["c"]["lrf"]["mean"] == pytest.approx(0.5) and res["d"]["lrf"]["mean"] == 1.0
    assert res["c"]["judge"]["mean"] == pytest.approx(0.5)  # a constant answer is right in one order of two
    assert len(always_a.calls) == 2 * 3

    def oracle(prompt, i):  # knows the chosen outputs
        a = prompt.split("Output A:\n")[1].split("\n\nOutput B")[0]
        return "A" if a in ("long answer", "a", "yes!") else "B"

    assert lrf_vs_judge(pairs, _LengthRM(), ScriptedLM(oracle), {})["c"]["judge"]["mean"] == 1.0
    silent = lrf_vs_judge(pairs, _LengthRM(), ScriptedLM(lambda p, i: "Both are fine."), {})
    assert silent["c"]["judge"]["mean"] == 0.0 and silent["c"]["judge_no_verdict"] == 4


@pytest.mark.parametrize(
    "text, verdict", [("A", "A"), ("B.", "B"), ("Output B is better", "B"), (" a", None), ("Both", None), ("", None)]
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


# ------------------------------------------------------------------------------------------- GEPA's adapter
def test_gepa_adapter_evaluates_candidates_and_builds_reflective_records():
    def writer(question, variable):
        return {"answer": f"{variable.text}: {question}"}

    comp = Component("writer", inputs=["question"], outputs=["answer"], variable=Prompt("Say"), fn=writer)
    system = System([comp], lambda ex, pred: float(pred["answer"].startswith("Shout")), ["answer"], inputs=["question"])
    val = [{"question": "q1", "gold": "g1"}, {"question": "q2", "gold": "g2"}]
    seen = []
    adapter = SystemAdapter(system, ["writer"], val, workers=1, seed=0, on_val=lambda c, m: seen.append((c, m)))
    batch = adapter.evaluate(val[:1], {"writer": "Shout"}, capture_traces=True)
    assert batch.scores == [1.0] and batch.outputs == [{"answer": "Shout: q1"}] and not seen
    full = adapter.evaluate(list(reversed(val)), {"writer": "Say"}, capture_traces=False)
    assert full.scores == [0.0, 0.0] and full.trajectories is None
    assert seen == [({"writer": "Say"}, 0.0)]  # a full validation pass, in any order, is recorded
    records = adapter.make_reflective_dataset({"writer": "Shout"}, batch, ["writer"])["writer"]
    assert records == [
        {
            "Inputs": {"question": "q1"},
            "Generated Outputs": {"answer": "Shout: q1"},
            "Feedback": "This run scored 1.000 (1 is best). The correct final answer: gold = g1.",
        }
    ]
    assert system.components["writer"].variable.text == "Say"  # candidates are run-scoped overrides


# ------------------------------------------------------------------------------------------- the budget
def test_metric_counter_refuses_the_call_past_the_limit_and_stacks():
    counter = MetricCounter(3)
    calls = []
    metric = counter.wrap(lambda ex, pred: calls.append(1) or 1.0)
    for _ in range(3):
        metric({}, {})
    with pytest.raises(MetricBudgetExceeded, match="max_metric_calls=3") as info:
        metric({}, {})
    assert isinstance(info.value, BudgetExceeded) and info.value.limit == "max_metric_calls"
    assert counter.used == 3 and len(calls) == 3 and counter.remaining == 0  # refused before the metric ran
    # threads: never more than the limit, whatever the interleaving
    counter = MetricCounter(50)
    metric = counter.wrap(lambda ex, pred: 1.0)
    refused = []

    def hammer():
        for _ in range(40):
            try:
                metric({}, {})
            except MetricBudgetExceeded:
                refused.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.used == 50 and len(refused) == 4 * 40 - 50
    with pytest.raises(ValueError, match="max_metric_calls"):
        MetricCounter(-1)


def test_a_metric_budget_stops_system_evaluate_instead_of_failing_examples():
    system, _, train, _ = build_synthetic(0)
    original = system.metric
    outer, inner = MetricCounter(), MetricCounter(4)
    first = attach(system, outer)
    second = attach(system, inner)
    assert system.evaluate(train[:4]).n_failed == 0
    with pytest.raises(MetricBudgetExceeded):
        system.evaluate(train[:4])
    assert inner.used == 4 and outer.used == 4  # the outer counter saw every call the inner one let through
    detach(system, second)
    system.evaluate(train[:2])
    assert inner.used == 4 and outer.used == 6
    detach(system, first)
    assert system.metric is original and unwrap(system.metric) is original


def test_the_loop_stops_at_max_metric_calls_and_resumes_counting(seed, tmp_path):
    system, _, train, val = build_synthetic(seed)
    seen = {"calls": 0}
    real = system.metric

    def metric(example, prediction):
        seen["calls"] += 1
        return real(example, prediction)

    system.metric = metric
    cfg = synthetic_config(seed, 50)
    cfg.budget.max_metric_calls = 300
    res = Optimas(
        tiny_reward_model({"pick_a": "picks a colour", "pick_b": "picks a shape"}, seed, train=SYNTHETIC_TRAIN),
        None,
        cfg,
    ).optimize(system, train, val, run_dir=tmp_path / "run")
    assert res.stopped == "budget: max_metric_calls exhausted"
    assert res.metric_calls == seen["calls"] <= 300
    state = load_run_state(tmp_path / "run")
    assert state["metric_calls"] == res.metric_calls
    counts = [h["metric_calls"] for h in res.history]
    assert counts == sorted(counts) and counts[-1] <= res.metric_calls
    # the returned system scores with the caller's metric again (a test evaluation is not charged)
    assert res.system.metric is metric
    # resuming with a larger budget goes on counting from what was spent
    cfg.budget.max_metric_calls = 400
    seen["calls"] = 0
    more = Optimas(
        tiny_reward_model({"pick_a": "picks a colour", "pick_b": "picks a shape"}, seed, train=SYNTHETIC_TRAIN),
        None,
        cfg,
    ).optimize(system, train, val, resume_from=tmp_path / "run")
    assert more.metric_calls == res.metric_calls + seen["calls"] <= 400


def test_max_metric_calls_is_validated():
    with pytest.raises(ConfigError, match="budget.max_metric_calls"):
        OptimasConfig.from_dict({"budget": {"max_metric_calls": 0}})
    with pytest.raises(ConfigError, match="budget.max_metric_calls"):
        OptimasConfig.from_dict({"budget": {"max_metric_calls": 1.5}})
    assert OptimasConfig.from_dict({"budget": {"max_metric_calls": 7}}).budget.max_metric_calls == 7


def test_every_method_is_registered():
    assert set(METHODS) == set(ALL)


# ------------------------------------------------------------------------------------------- MIPROv2 on a DSPy program
DSPY_MODULE = r'''
"""A two-predictor DSPy program, a scripted LM that speaks DSPy's reply format, and the factory the config names."""
import re

import dspy

from optimas_fast.dspy import DSPyLM
from optimas_fast.lm.base import LM, Completion, Usage
from optimas_fast.system.dspy_adapter import ProgramSystem

GOLD = {f"question {i}": f"answer {i}" for i in range(40)}


class QA(dspy.Module):
    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.answer = dspy.Predict("question, query -> answer")

    def forward(self, question):
        return self.answer(question=question, query=self.rewrite(question=question).query)


def field(text, name):
    m = re.search(r"\[\[ ## " + name + r" ## \]\]\n(.*?)(?:\n\n|\Z)", text, re.S)
    return m.group(1).strip() if m else ""


class FormatLM(LM):
    """Replies in DSPy's format to any signature (its output fields are read from the system message); the
    answerer is right only when its instructions say "exact"; MIPRO's proposer always proposes that."""

    name = "format-lm"

    def _generate(self, requests, params):
        out = []
        for r in requests:
            system, last = r.prompt[0]["content"], r.prompt[-1]["content"]
            fields = system.split("Your output fields are:")[-1].split("All interactions")[0]
            outputs = re.findall(r"\d+\. `(\w+)`", fields)
            objective = system.split("your objective is:")[-1]
            values = {"answer": GOLD.get(field(last, "question"), "no idea") if "exact" in objective else "no idea",
                      "query": field(last, "question"), "proposed_instruction": "Give the exact answer."}
            text = "".join(f"[[ ## {f} ## ]]\n{values.get(f, 'Some text.')}\n\n" for f in outputs)
            out.append(Completion(text + "[[ ## completed ## ]]", Usage(prompt_tokens=10, completion_tokens=5)))
        return out


def scripted_lm():
    return FormatLM()


class PlainLM(LM):
    """Ignores DSPy's format, as the embedded 135M model does."""

    name = "plain-lm"

    def _generate(self, requests, params):
        reply = "I think the answer is yes."
        return [Completion(reply, Usage(prompt_tokens=10, completion_tokens=7)) for _ in requests]


def plain_lm():
    return PlainLM()


def metric(example, prediction, trace=None):
    return float(prediction.answer.strip() == example["answer"])


def build(lm):
    return ProgramSystem(QA(), metric, lm=DSPyLM(lm), name="qa")
'''


BUDGET_MIPRO = 60


def test_mipro_runs_on_a_dspy_program_within_the_budget(tmp_path, monkeypatch):
    (tmp_path / "dspyqa.py").write_text(DSPY_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for split, ids in (("train", range(0, 16)), ("val", range(16, 24)), ("test", range(24, 32))):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"question": f"question {i}", "answer": f"answer {i}"}) + "\n" for i in ids)
        )
    config = tmp_path / "qa.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "system": "dspyqa:build",
                "lm": {"factory": "dspyqa:scripted_lm"},
                "reward": {"backbone": "tiny-random"},
                "data": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
                "loop": {"val_workers": 1, "prompt": {"num_proposals": 2}},
            }
        )
    )
    report = compare(config, methods=["unoptimized", "mipro"], budget=BUDGET_MIPRO, seeds=1, out=tmp_path / "out")
    cells = {c["method"]: c for c in report["cells"]}
    assert cells["mipro"]["status"] == "ok", cells["mipro"]
    assert 0 < cells["mipro"]["metric_calls"] <= BUDGET_MIPRO and cells["mipro"]["stopped"] is None
    # the probe (2), the demo bootstrap (one set over the 16 training examples), the default program's pass (8),
    # then one full pass (8) per trial: the validation set is no larger than MIPROv2's minibatch here
    assert cells["mipro"]["info"]["trials"] == (BUDGET_MIPRO - 2 - 16 - 8) // 8
    assert sum(cells["unoptimized"]["test_scores"]) == 0  # "no idea" until an instruction says "exact"
    assert "exact" in cells["mipro"]["variables"]["answer"]
    assert sum(cells["mipro"]["test_scores"]) == 8
    # an LM that does not follow DSPy's reply format: not run, and the report says why
    raw = yaml.safe_load(config.read_text())
    raw["lm"] = {"factory": "dspyqa:plain_lm"}
    config.write_text(yaml.safe_dump(raw))
    (cell,) = compare(config, methods=["mipro"], budget=BUDGET_MIPRO, seeds=1, out=tmp_path / "plain")["cells"]
    assert cell["status"] == "skipped" and "does not follow DSPy's reply format" in cell["reason"], cell
    assert "not run: the LM does not follow DSPy's reply format" in (tmp_path / "plain" / "compare.md").read_text()
