"""DSPy adapter: a two-predictor DSPy program becomes a System (skipped when the dspy extra is absent)."""
import random

import pytest

dspy = pytest.importorskip("dspy", reason="the optional extra 'dspy' is not installed")

from dspy.utils.dummies import DummyLM  # noqa: E402

from optimas_fast.system import Prompt  # noqa: E402
from optimas_fast.system.dspy_adapter import components_from_dspy, system_from_dspy  # noqa: E402


class QA(dspy.Module):
    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.answer = dspy.ChainOfThought("question, query -> answer")

    def forward(self, question):
        return self.answer(question=question, query=self.rewrite(question=question).query)


def test_dspy_program_as_system(seed):
    rng = random.Random(seed)
    gold = f"answer-{rng.randint(0, 10**6)}"
    lm = DummyLM([{"query": "a query"}, {"reasoning": "because", "answer": gold}] * 4)
    system = system_from_dspy(QA(), lambda e, p: float(p["answer"] == e["gold"]), ["answer"], lm=lm)
    assert system.order == ["rewrite", "answer"]
    assert system.components["answer"].inputs == ("question", "query")
    assert system.components["answer"].outputs == ("reasoning", "answer")
    assert isinstance(system.variables()["rewrite"], Prompt)
    trace = system.run({"question": "what?", "gold": gold})
    assert trace.ok and trace.score == 1.0, trace.error
    assert trace["rewrite"].outputs == {"query": "a query"}
    # an instruction override is run-scoped and the program's own predictor is untouched
    program = QA()
    comps = components_from_dspy(program, lm=lm)
    before = program.rewrite.signature.instructions
    comps[0].variable = Prompt("Write a search query.")
    assert program.rewrite.signature.instructions == before
    comps[0].apply_to_program()
    assert program.rewrite.signature.instructions == "Write a search query."


def test_dspy_adapter_bad_arguments():
    with pytest.raises(TypeError, match="dspy.Module"):
        components_from_dspy("not a program")
    with pytest.raises(ValueError, match="no predictors named"):
        components_from_dspy(QA(), descriptions={"nope": "x"})
