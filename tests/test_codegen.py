"""The HumanEval code-generation system: data, reply parsing, the executor and metric in the sandbox, and
end-to-end runs with a scripted LM that writes the canonical solution for some problems and garbage for
others."""

import json
import os
import random

import pytest

import optimas_fast.examples.codegen as codegen
from optimas_fast.examples import load_example
from optimas_fast.examples.codegen import (
    CODE_PROMPT,
    REVISE_PROMPT,
    TESTS_PROMPT,
    CodegenConfig,
    assemble_program,
    build_codegen_system,
    codegen_metric,
    docstring_tests,
    extract_code,
    load_humaneval,
    parse_tests,
    run_tests,
)
from optimas_fast.examples.common import clip
from optimas_fast.examples.data import split_examples
from optimas_fast.system.testing import ScriptedLM

PROBLEMS = load_humaneval()
BY_ID = {p["id"]: p for p in PROBLEMS}


def problem_of(text):
    """The problem a prompt is about: the one whose (clipped) problem text it quotes. Not the entry point alone:
    two HumanEval problems (133 and 142) share the entry point ``sum_squares``."""
    limit = CodegenConfig().max_prompt_chars
    hits = [p for p in PROBLEMS if clip(p["prompt"], limit) in text]
    assert hits, "prompt quotes no HumanEval problem"
    return max(hits, key=lambda p: len(p["prompt"]))


def test_problem_of_tells_every_problem_apart():
    for p in PROBLEMS:  # the test's own helper: a wrong pick would make the end-to-end checks below misfire
        assert problem_of(f"Write it.\n```python\n{clip(p['prompt'], CodegenConfig().max_prompt_chars)}\n```") is p


def fence(code):
    return f"Here you go:\n```python\n{code}\n```\nThis works."


class Script:
    """Replies per component: canonical code for ``good`` problems, garbage for the rest; the reviser writes
    the canonical code for ``fixable`` ones. Records which component asked about which problem."""

    def __init__(self, good, fixable=()):
        self.good, self.fixable = set(good), set(fixable)
        self.asked = []

    def __call__(self, text, i):
        p = problem_of(text)
        full = p["prompt"] + p["canonical_solution"]
        if text.startswith(CODE_PROMPT):
            self.asked.append(("code", p["id"]))
            if p["id"] in self.good:
                return fence(full)
            return "I think you should return None.\n```python\ndef helper(:\n```"  # garbage: no usable code
        if text.startswith(TESTS_PROMPT):
            self.asked.append(("tests", p["id"]))
            e = p["entry_point"]  # two asserts that hold for any defined function (the call is never made)
            return f"assert {e} is not None or {e}(0)\nassert callable({e}) or {e}(1)\nnot a test\nassert True"
        if text.startswith(REVISE_PROMPT):
            self.asked.append(("revise", p["id"]))
            return fence(full) if p["id"] in self.fixable else "Sorry, I cannot fix it."
        raise AssertionError(f"unexpected prompt: {text[:80]!r}")


# --------------------------------------------------------------------------------------------------
# data
def test_humaneval_loads_and_splits_deterministically(seed):
    assert len(PROBLEMS) == 164 and len(BY_ID) == 164
    for p in PROBLEMS:
        assert f"def {p['entry_point']}" in p["prompt"] and "def check(" in p["test"]
    system, split = load_example("codegen", ScriptedLM(["x"]), seed=seed % 1000)
    assert (len(split.train), len(split.val), len(split.test)) == (98, 33, 33)
    ids = [e["id"] for part in (split.train, split.val, split.test) for e in part]
    assert sorted(ids) == sorted(BY_ID)
    again = split_examples(load_humaneval(), seed % 1000)
    assert [e["id"] for e in again.test] == [e["id"] for e in split.test]
    assert system.order == ["code_generator", "test_generator", "executor", "final_code_generator"]
    assert set(system.variables()) == {
        "code_generator",
        "test_generator.prompt",
        "test_generator.policy",
        "final_code_generator.prompt",
        "final_code_generator.policy",
    }
    with pytest.raises(ValueError, match="embedder"):
        load_example("codegen", ScriptedLM(["x"]), embedder=object())


def test_malformed_humaneval_rows(tmp_path):
    good = dict(PROBLEMS[0])
    row = {"task_id": good["id"], **{k: good[k] for k in ("prompt", "entry_point", "canonical_solution", "test")}}
    cases = [
        ({**row, "entry_point": "not an identifier"}, "entry_point"),
        ({k: v for k, v in row.items() if k != "test"}, "missing field 'test'"),
        ({**row, "prompt": 5}, "'prompt' must be str"),
        ("{not json", "not valid JSON"),
    ]
    for bad, message in cases:
        text = json.dumps(row) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n"
        (tmp_path / "HumanEval.jsonl").write_text(text)
        with pytest.raises(ValueError, match=f"HumanEval.jsonl:2: .*{message}"):
            load_humaneval(tmp_path)
        assert [p["id"] for p in load_humaneval(tmp_path, strict=False)] == [good["id"]]
    assert codegen.humaneval_file(tmp_path / "nowhere").name == "HumanEval.jsonl.gz"  # the package's copy


def test_bad_config_is_a_clear_error():
    lm = ScriptedLM(["x"])
    with pytest.raises(ValueError, match="num_tests"):
        build_codegen_system(lm, CodegenConfig(num_tests=(0,)))
    with pytest.raises(ValueError, match="test_sources"):
        build_codegen_system(lm, CodegenConfig(test_sources=("oracle",)))
    with pytest.raises(ValueError, match="revise"):
        build_codegen_system(lm, CodegenConfig(revise=()))


# --------------------------------------------------------------------------------------------------
# parsing (no generated code runs in this process)
def test_extract_and_assemble_code():
    p = BY_ID["HumanEval/10"]  # its prompt defines a helper (is_palindrome) that the solution calls
    full = p["prompt"] + p["canonical_solution"]
    code = extract_code("```python\ndef other():\n    pass\n```\ntext\n" + fence(full), p["entry_point"])
    assert code.strip() == full.strip()
    program = assemble_program(p["prompt"], code, p["entry_point"])
    assert program.count("def is_palindrome") == 1 and program.count(f"def {p['entry_point']}") == 1
    assert extract_code("```python\ndef f(x):\n    return x", "f") == "def f(x):\n    return x"  # unterminated
    assert extract_code("    return x + 1\n") == "    return x + 1"  # no fence: the reply as it is
    assert extract_code(None) == ""
    body = assemble_program('def f(x):\n    """Add one."""\n', "return x + 1", "f")
    assert body == 'def f(x):\n    """Add one."""\n    return x + 1\n'  # an unindented body gets indented
    assert assemble_program("def f(x):\n", "", "f").endswith("    pass\n")


def test_parse_tests_keeps_valid_distinct_asserts():
    reply = "assert f(1) == 2\nassert f(1) == 2\n  assert f(2) == 3;\nassert g(1) == 1\nassert f(( == 1\nf(3) == 4\n"
    assert parse_tests(reply, "f") == ["assert f(1) == 2", "assert f(2) == 3"]
    assert parse_tests(None, "f") == []


def test_docstring_tests_pass_on_the_canonical_solution():
    p = BY_ID["HumanEval/0"]
    assert docstring_tests(p["prompt"], p["entry_point"]) == [
        "assert has_close_elements([1.0, 2.0, 3.0], 0.5) == False",
        "assert has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3) == True",
    ]
    arrow = 'def add(x, y):\n    """\n    add(2, 3) ==> 5\n    add(5, 7) => 12\n    """\n'
    assert docstring_tests(arrow, "add") == ["assert add(2, 3) == 5", "assert add(5, 7) == 12"]
    p = BY_ID["HumanEval/2"]
    tests = docstring_tests(p["prompt"], p["entry_point"])
    report = run_tests(p["prompt"] + p["canonical_solution"], tests, CodegenConfig())
    assert tests and report == {"passed": len(tests), "total": len(tests), "errors": []}


# --------------------------------------------------------------------------------------------------
# executor and metric in the sandbox
def test_canonical_scores_one_and_wrong_code_scores_zero(seed):
    rng = random.Random(seed)
    for p in rng.sample(PROBLEMS, 3):
        right = p["prompt"] + p["canonical_solution"]
        assert codegen_metric(p, {"final_code": right}) == 1.0, p["id"]
        assert codegen_metric(p, {"final_code": p["prompt"] + "    return None\n"}) == 0.0, p["id"]
    p = rng.choice(PROBLEMS)
    cfg = CodegenConfig(run_timeout_s=2.0)
    assert codegen_metric(p, {"final_code": p["prompt"] + "    while True:\n        pass\n"}, cfg) == 0.0
    assert codegen_metric(p, {"final_code": ""}) == 0.0


def test_executor_reports_per_test_results_and_contains_hostile_code():
    cfg = CodegenConfig(test_timeout_s=1.0)
    code = "def f(x):\n    print('noise')\n    if x == 3:\n        while True:\n            pass\n    return x * 2\n"
    report = run_tests(code, ["assert f(1) == 2", "assert f(2) == 5", "assert f(3) == 6", "assert g(1)"], cfg)
    assert report["passed"] == 1 and report["total"] == 4
    assert [e.split("  # ")[1].split(":")[0] for e in report["errors"]] == ["failed", "TimeoutError", "NameError"]
    target = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pwned-by-codegen.txt")
    hostile = f"open({target!r}, 'w').write('x')\ndef f(x):\n    return x\n"
    report = run_tests(hostile, ["assert f(1) == 1"], cfg)
    assert report["passed"] == 0 and "does not run" in report["errors"][0] and not os.path.exists(target)
    forged = "import sys\nsys.__stdout__.write('@@optimas-result-0@@{\"passed\": 9}\\n')\ndef f(x):\n    return 0\n"
    assert run_tests(forged, ["assert f(1) == 1"], cfg)["passed"] == 0  # the result marker cannot be guessed


# --------------------------------------------------------------------------------------------------
# the system, end to end
def test_system_end_to_end_with_a_scripted_lm(seed, monkeypatch):
    rng = random.Random(seed)
    problems = rng.sample(PROBLEMS, 4)
    good, fixable = {problems[0]["id"], problems[1]["id"]}, {problems[2]["id"]}
    script = Script(good, fixable)
    lm = ScriptedLM(script)
    system = build_codegen_system(lm)
    sandbox_calls = []
    real = codegen.run_python
    monkeypatch.setattr(codegen, "run_python", lambda code, **kw: sandbox_calls.append(code) or real(code, **kw))

    result = system.evaluate(problems, workers=2)
    assert result.errors == [None] * 4
    # revise on failure: good problems pass their tests and stay; the fixable one is revised to the right code
    assert result.scores == [1.0, 1.0, 1.0, 0.0]
    assert len(sandbox_calls) == 8  # executor + metric per problem, every one in the sandbox
    assert {kw["stop"][0] for _, kw in lm.calls} == {"\n```\n"}  # replies end with their first code block
    assert {kw["temperature"] for _, kw in lm.calls} == {0.0}
    for p, trace in zip(problems, result.traces):
        steps = {s.component: s for s in trace.steps}
        assert [s.component for s in trace.steps] == system.order
        report = steps["executor"].outputs["test_report"]
        assert report["total"] == 2  # the two valid asserts of the scripted reply (num_tests=3 keeps both)
        assert report["passed"] == (2 if p["id"] in good else 0)
        revised = ("revise", p["id"]) in script.asked
        assert revised == (p["id"] not in good)
        if p["id"] not in good | fixable:  # an unusable revision keeps the initial code
            assert trace.prediction["final_code"] == steps["code_generator"].outputs["code"]

    # never revise: the fixable problem keeps its garbage and fails; no revision prompt is sent
    script.asked.clear()
    never = system.evaluate(problems, overrides={"final_code_generator.policy": {"revise": "never"}})
    assert never.scores == [1.0, 1.0, 0.0, 0.0] and not any(kind == "revise" for kind, _ in script.asked)
    # docstring tests: no LM call for tests at all
    script.asked.clear()
    doc = system.evaluate(problems[:1], overrides={"test_generator.policy": {"source": "docstring", "num_tests": 5}})
    assert not any(kind == "tests" for kind, _ in script.asked)
    tests = doc.traces[0].fields["tests"]
    assert tests == docstring_tests(problems[0]["prompt"], problems[0]["entry_point"])[:5]


def test_state_round_trips():
    system = build_codegen_system(ScriptedLM(Script(set())))
    system.set_variable("test_generator.policy", {"num_tests": 5, "source": "both"})
    system.set_variable("final_code_generator.policy", {"revise": "never"})
    system.set_variable("code_generator", "Write the function. Use a ```python block.")
    state = json.loads(json.dumps(system.state_dict()))
    other = build_codegen_system(ScriptedLM(Script(set())))
    assert other.state_dict() != state
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.components["test_generator"].variable["policy"].value == {"num_tests": 5, "source": "both"}
    with pytest.raises(ValueError, match="space"):
        bad = json.loads(json.dumps(state))
        bad["variables"]["final_code_generator.policy"]["space"]["revise"] = ["never"]
        bad["variables"]["final_code_generator.policy"]["value"]["revise"] = "never"
        other.load_state_dict(bad)


@pytest.mark.slow
def test_optimas_loop_runs_on_the_codegen_system(seed, tmp_path):
    """Two iterations of the loop on a few problems with a scripted LM and a tiny random LRF: it runs end to
    end, never accepts a worse validation score, and leaves the input system as it was. Here the LM's tests are
    wrong and its revisions break the code, so the starting configuration (revise on failure) scores 0 and the
    discrete knobs (revise never, docstring tests) are what can repair it."""
    from optimas_fast.optimize import Optimas, OptimasConfig
    from optimas_fast.optimize.testing import tiny_reward_model
    from optimas_fast.reward import TrainConfig

    def reply(text, i):
        if text.startswith(TESTS_PROMPT):
            e = problem_of(text)["entry_point"]
            return f"assert {e} is None or {e}(0) == object()"  # fails on any function
        if text.startswith(REVISE_PROMPT):
            e = problem_of(text)["entry_point"]
            return fence(f"def {e}(*args):\n    return None")  # compiles, and is wrong
        if text.startswith(CODE_PROMPT):
            p = problem_of(text)
            return fence(p["prompt"] + p["canonical_solution"])
        return "Write the function carefully and test it."  # the proposer's requests

    rng = random.Random(seed)
    problems = rng.sample(PROBLEMS, 8)
    train, val = problems[:5], problems[5:]
    system = build_codegen_system(ScriptedLM(reply))
    before = system.state_dict()
    assert system.evaluate(val, workers=3).scores == [0.0] * 3
    comps = {n: system.components[n].description for n in system.order if system.components[n].variables()}
    cfg = OptimasConfig.from_dict(
        {
            "seed": seed % 1000,
            "iterations": 2,
            "batch_size": 3,
            "initial_examples": 4,
            "initial_epochs": 1,
            "adapt_steps": 2,
            "cooldown": 0,
            "optimizer_inputs": 3,
            "val_workers": 3,
            "components": ["test_generator", "final_code_generator"],
            "collect": {"num_candidates": 3, "rollouts": 1, "workers": 3},
            "prompt": {"num_proposals": 1, "max_tokens": 16, "max_inputs": 2},
        }
    )
    rm = tiny_reward_model(comps, seed % 1000, train=TrainConfig(batch_pairs=8))
    res = Optimas(rm, ScriptedLM(reply), cfg).optimize(system, train, val, run_dir=tmp_path / "run")
    assert system.state_dict() == before  # the input is untouched
    assert len(res.history) == 3 and res.best_val >= res.initial_val == 0.0
    assert res.system.evaluate(val, workers=3).mean == pytest.approx(res.best_val)
    restored = build_codegen_system(ScriptedLM(reply))
    restored.load_state_dict(json.loads(json.dumps(res.system.state_dict())))
    assert restored.state_dict() == res.system.state_dict()
