"""ProgramSystem: a DSPy program's own forward as a System. Every predictor call is recorded in call order,
instruction overrides are run-scoped (also across threads), rollouts replay the prefix and re-run the rest,
failures are recorded and budget stops propagate, best-of-N picks by the reward, and the program handed in
is never touched."""

from __future__ import annotations

import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest
import torch

from optimas_fast.best_of import BestOfN
from optimas_fast.dspy import DSPyLM
from optimas_fast.lm import Budget, BudgetExceeded, UsageLedger, use_ledger
from optimas_fast.lm.base import LM, Completion, Usage
from optimas_fast.system import Prompt, Trace
from optimas_fast.system.dspy_adapter import ProgramSystem, component_name


def field(text: str, name: str) -> str:
    m = re.search(r"\[\[ ## " + name + r" ## \]\]\n(.*?)(?:\n\n|\Z)", text, re.S)
    return m.group(1).strip() if m else ""


def objective(system_message: str) -> str:
    return system_message.split("objective is:")[-1].strip()


class EchoLM(LM):
    """Scripted through ``_generate`` (the LM layer's ledger and budget apply). A query is the question plus
    the rewriter's instruction; an answer is the answerer's instruction (and the query it read), so every
    output shows which instructions its call ran with."""

    def __init__(self, fail_on: str | None = None):
        self.name = "echo-lm"
        self.fail_on = fail_on
        self.requests: list = []
        self._lock = threading.Lock()

    def _generate(self, requests, params):
        out = []
        for r in requests:
            with self._lock:
                self.requests.append((r.prompt, params))
            system, last = r.prompt[0]["content"], r.prompt[-1]["content"]
            if self.fail_on and self.fail_on in system:
                out.append(RuntimeError("scripted failure"))
                continue
            if "[[ ## answer ## ]]" in system:
                body = (
                    f"[[ ## reasoning ## ]]\nseed {params.seed} t {params.temperature}\n\n"
                    f"[[ ## answer ## ]]\n{objective(system)} | {field(last, 'query')}"
                )
            else:
                body = f"[[ ## query ## ]]\n{field(last, 'question')} / {objective(system)}"
            out.append(Completion(body + "\n\n[[ ## completed ## ]]", Usage(prompt_tokens=5, completion_tokens=5)))
        return out


class QA(dspy.Module):
    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.answer = dspy.ChainOfThought("question, query -> answer")

    def forward(self, question):
        query = self.rewrite(question=question).query
        return self.answer(question=question, query=query.upper())  # plain Python in between


class TwoHop(dspy.Module):
    """One predictor called in a loop (two calls, the same field names), then an answerer."""

    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.answer = dspy.ChainOfThought("question, query -> answer")

    def forward(self, question):
        q = question
        for _ in range(2):
            q = self.rewrite(question=q).query
        return self.answer(question=question, query=q)


def metric(example, prediction, trace=None):
    return float("exact" in prediction.answer)


def example(question: str) -> dspy.Example:
    return dspy.Example(question=question, answer="?").with_inputs("question")


def test_program_system_records_every_call(seed):
    rng = random.Random(seed)
    question = f"question {rng.randrange(10**6)}"
    program = QA()
    before = program.dump_state()
    lm = EchoLM()
    system = ProgramSystem(program, metric, lm=DSPyLM(lm))
    assert system.order == ["rewrite", "answer"]
    assert system.predictor_paths() == {"rewrite": "rewrite", "answer": "answer.predict"}
    assert system.components["answer"].inputs == ("question", "query")
    assert system.components["answer"].outputs == ("reasoning", "answer")
    assert isinstance(system.variables()["rewrite"], Prompt)
    assert system.inputs == ("question",) and system.descendants("rewrite") == ["answer"]

    trace = system.run(example(question), seed=rng.randrange(1000))
    assert trace.ok, trace.traceback
    rw_instr = program.rewrite.signature.instructions
    query = f"{question} / {rw_instr}"
    assert trace["rewrite"].inputs == {"question": question} and trace["rewrite"].outputs == {"query": query}
    assert trace["answer"].inputs == {"question": question, "query": query.upper()}  # what the forward passed
    assert trace.prediction["answer"] == f"{program.answer.predict.signature.instructions} | {query.upper()}"
    assert trace.score == 0.0 and len(lm.requests) == 2
    assert trace["rewrite"].usage.calls == 1 and trace.usage.calls == 2
    # the seed of the run reaches the LM
    assert all(p.seed == trace.seed for _, p in lm.requests)

    # a predictor called in a loop: one step per call, in call order
    hops = ProgramSystem(TwoHop(), metric, lm=DSPyLM(EchoLM()))
    t = hops.run(example(question))
    assert [s.component for s in t.steps] == ["rewrite", "rewrite", "answer"]
    assert t.steps[1].inputs == {"question": t.steps[0].outputs["query"]}
    assert t["rewrite"] is t.steps[0]

    # the program handed in is untouched (no hooks, same state)
    assert program.dump_state() == before
    assert "forward" not in vars(program.rewrite) and "forward" not in vars(program.answer.predict)


def test_overrides_are_run_scoped_and_thread_safe(seed):
    rng = random.Random(seed)
    system = ProgramSystem(QA(), metric, lm=DSPyLM(EchoLM()))
    default = system.components["answer"].variable.text
    texts = [f"Answer exact variant {rng.randrange(10**9)}." for _ in range(12)]

    def one(text):
        return system.run(example("q"), overrides={"answer": text})

    with ThreadPoolExecutor(4) as pool:
        traces = list(pool.map(one, texts))
    for text, t in zip(texts, traces):
        assert t.ok and t.prediction["answer"].startswith(text + " |"), (text, t.prediction)
        assert t["answer"].variable == Prompt(text) and t.score == 1.0
    # nothing shared changed: the next plain run uses the current instructions
    assert system.run(example("q")).prediction["answer"].startswith(default)
    # evaluate with workers: same override on every example, in input order
    res = system.evaluate([example(f"q{i}") for i in range(6)], workers=3, overrides={"answer": texts[0]})
    assert res.scores == [1.0] * 6

    # run_component: one predictor alone, with a candidate instruction (what the optimizers call)
    out = system.run_component("answer", {"question": "q", "query": "Q"}, variable="Be exact.")
    assert out["answer"] == "Be exact. | Q" and set(out) == {"reasoning", "answer"}
    # the optimizers' batches: rows on threads, results in row order, each with the candidate's instruction
    comp = system.components["answer"]
    rows = [{"question": f"q{i}", "query": f"Q{rng.randrange(10**6)}"} for i in range(7)]
    outs = comp.forward_batch(rows, Prompt("Batch exact."))
    assert [o["answer"] for o in outs] == [f"Batch exact. | {r['query']}" for r in rows]
    # state and copy: variables are independent, the program's own instructions never change
    other = system.copy()
    other.set_variable("answer", "Copy instruction.")
    assert system.components["answer"].variable.text == default
    assert other.run(example("q")).prediction["answer"].startswith("Copy instruction.")
    state = other.state_dict()
    system.load_state_dict(state)
    assert system.components["answer"].variable.text == "Copy instruction."


def test_run_downstream_replays_the_prefix(seed):
    rng = random.Random(seed)
    lm = EchoLM()
    system = ProgramSystem(TwoHop(), metric, lm=DSPyLM(lm))
    trace = system.run(example(f"q{rng.randrange(1000)}"), seed=1)
    n = len(lm.requests)

    # replacing the answer: nothing runs (the prefix replays), the metric sees the given answer
    t = system.run_downstream("answer", {"reasoning": "r", "answer": "exact!"}, trace, seed=2)
    assert len(lm.requests) == n and t.score == 1.0 and t.prediction["answer"] == "exact!"
    assert [s.reused for s in t.steps] == [True, True, True]

    # replacing the first hop's query: the second hop and the answer run again on it
    new_query = f"new query {rng.randrange(1000)}"
    t = system.run_downstream("rewrite", {"query": new_query}, trace, seed=3)
    assert len(lm.requests) == n + 2
    assert [s.reused for s in t.steps] == [True, False, False]
    assert t.steps[1].inputs == {"question": new_query}
    assert t.prediction["answer"].endswith(t.steps[1].outputs["query"])
    assert all(p.seed == 3 for _, p in lm.requests[n:])
    with pytest.raises(ValueError, match="reasoning"):
        system.run_downstream("answer", {"answer": "x"}, trace)  # a component's full output set


def test_failures_and_budget(seed):
    lm = EchoLM(fail_on="Given the fields `question`, `query`")
    system = ProgramSystem(QA(), metric, lm=DSPyLM(lm))
    t = system.run(example("q"))
    assert not t.ok and t.failed_component == "answer" and t.score == 0.0
    assert t.error.startswith("component 'answer':") and "scripted failure" in t.error
    assert t["rewrite"].outputs is not None and t["answer"].outputs is None

    # a program that fails in its own Python code names the program
    class Broken(QA):
        def forward(self, question):
            self.rewrite(question=question)
            raise KeyError("boom")

    t = ProgramSystem(Broken(), metric, lm=DSPyLM(EchoLM())).run(example("q"))
    assert t.error.startswith("program: KeyError") and t.failed_component is None

    # a budget stop is raised through DSPy's call stack as itself: it is no example's failure
    ok = ProgramSystem(QA(), metric, lm=DSPyLM(EchoLM()))
    with use_ledger(UsageLedger(Budget(max_calls=1))):
        with pytest.raises(BudgetExceeded):
            ok.run(example("q"))
        with pytest.raises(BudgetExceeded):
            ok.evaluate([example("a"), example("b")], workers=2)
        with pytest.raises(BudgetExceeded):
            ok.run_component("rewrite", {"question": "q"})


class PreferLong:
    """A stand-in reward model: scores an output by its length (so the pick is known)."""

    components = ["rewrite", "answer"]

    def __init__(self):
        self.calls = 0

    def score(self, rows):
        self.calls += 1
        return torch.tensor([float(len(text)) for _, _, text in rows])


def test_best_of_n_picks_by_the_reward(seed):
    lm = EchoLM()
    system = ProgramSystem(QA(), metric, lm=DSPyLM(lm))
    rm = PreferLong()
    t = BestOfN(system, rm, {"answer": 3}).run(example("q"), seed=seed % 1000)
    assert t.ok, t.traceback
    info = t["answer"].best_of
    assert info["n"] == 3 and len(info["candidates"]) == 3 and rm.calls == 1
    best = max(info["candidates"], key=lambda c: len("\n".join(f"{k}: {v}" for k, v in c.items())))
    assert t["answer"].outputs == best and t.prediction["answer"] == best["answer"]
    temps = sorted(p.temperature for prompt, p in lm.requests if "[[ ## answer ## ]]" in prompt[0]["content"])
    assert temps == [0.0, 0.7, 0.7]  # the plain call, then samples at best_of_temperature
    with pytest.raises(ValueError, match="needs reward"):
        BestOfN(system, None, {"answer": 2})


def test_bad_arguments():
    with pytest.raises(TypeError, match="dspy.Module"):
        ProgramSystem("not a program", metric)
    with pytest.raises(ValueError, match="has no predictors"):
        ProgramSystem(dspy.Module(), metric)
    with pytest.raises(TypeError, match="metric"):
        ProgramSystem(QA(), "metric")
    with pytest.raises(TypeError, match=r"ProgramSystem\(lm\)"):
        ProgramSystem(QA(), metric, lm=EchoLM())  # an optimas_fast LM must be wrapped: DSPyLM(lm)
    system = ProgramSystem(QA(), metric, lm=DSPyLM(EchoLM()))
    with pytest.raises(ValueError, match="with_inputs"):
        system.run(dspy.Example(question="q"))
    with pytest.raises(TypeError, match="dspy.Example or a dict"):
        system.run(["q"])
    with pytest.raises(ValueError, match="start_from"):
        system.run(example("q"), start_from="answer")
    with pytest.raises(ValueError, match="no component named 'nope'"):
        system.run(example("q"), overrides={"nope": "x"})
    with pytest.raises(TypeError, match="Trace"):
        system.run_downstream("answer", {"reasoning": "r", "answer": "a"}, {"not": "a trace"})
    empty = Trace(example=example("q"), fields={}, steps=[])
    with pytest.raises(ValueError, match="did not call it"):
        system.run_downstream("answer", {"reasoning": "r", "answer": "a"}, empty)
    # a bare predictor is a program too (DSPy names it "self")
    bare = ProgramSystem(dspy.Predict("question -> query"), metric, lm=DSPyLM(EchoLM()))
    assert bare.order == ["self"] and bare.run(example("q"))["self"].outputs["query"].startswith("q / ")
    assert bare.inputs == ("question",)  # forward(**kwargs): the predictor's input fields
    assert bare.run({"question": "q2", "other": 1})["self"].inputs == {"question": "q2"}
    # a dict example works through the forward's parameters
    assert system.run({"question": "q", "answer": "?"}).ok
    assert component_name("hops[0].predict") == "hops_0" and component_name("a.b.predict") == "a_b"
