"""Wrap a DSPy program's predictors as components (optional extra: ``pip install optimas-fast[dspy]``).

Each ``dspy.Predict`` found by ``program.named_predictors()`` becomes a ``DSPyPredictorComponent``:
inputs and outputs are its signature's fields, the variable is a ``Prompt`` holding the signature's
instructions, and ``forward`` runs a fresh ``dspy.Predict`` built from the signature with the (possibly
overridden) instructions and the predictor's demos, so concurrent runs with different instructions never
share a mutable predictor. ``system_from_dspy`` wires those components into a ``System`` by field names,
which works when the program passes values between predictors under the same field names (the usual
case: ``self.answer(question=question, query=q)`` after ``self.rewrite(...) -> query``).

dspy is imported when an adapter function is called, never at import of ``optimas_fast.system``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from optimas_fast.system.component import Component
from optimas_fast.system.system import System
from optimas_fast.system.variables import Prompt

__all__ = ["DSPyPredictorComponent", "components_from_dspy", "system_from_dspy"]


def _dspy():
    try:
        import dspy
    except ImportError as exc:
        raise ImportError("the DSPy adapter needs dspy: pip install 'optimas-fast[dspy]'") from exc
    return dspy


class DSPyPredictorComponent(Component):
    """One DSPy predictor as a component. ``lm``: a dspy LM used for its calls (None: dspy's configured LM)."""

    def __init__(self, name: str, predictor: Any, *, description: str | None = None, lm: Any = None):
        dspy = _dspy()
        if not isinstance(predictor, dspy.Predict):
            raise TypeError(f"DSPyPredictorComponent: expected a dspy.Predict, got {type(predictor).__name__}")
        sig = predictor.signature
        super().__init__(
            name,
            inputs=list(sig.input_fields),
            outputs=list(sig.output_fields),
            description=description or sig.instructions,
            variable=Prompt(sig.instructions),
        )
        self.predictor = predictor
        self.lm = lm

    def forward(self, variable: Prompt, **inputs) -> dict:
        dspy = _dspy()
        predict = dspy.Predict(self.predictor.signature.with_instructions(variable.text), **self.predictor.config)
        predict.demos = list(self.predictor.demos)
        if self.lm is not None:
            with dspy.context(lm=self.lm):
                prediction = predict(**inputs)
        else:
            prediction = predict(**inputs)
        return {f: prediction.get(f) for f in self.outputs}

    def apply_to_program(self) -> None:
        """Writes the current instructions back into the wrapped DSPy predictor (after optimization)."""
        self.predictor.signature = self.predictor.signature.with_instructions(self.variable.text)


def _component_name(dspy_name: str) -> str:
    # DSPy names nested predictors "answer.predict"; dots separate variable keys in our addresses
    name = dspy_name[: -len(".predict")] if dspy_name.endswith(".predict") else dspy_name
    return name.replace(".", "__")


def components_from_dspy(program: Any, *, lm: Any = None,
                         descriptions: Mapping[str, str] | None = None) -> list[DSPyPredictorComponent]:
    """One component per named predictor of ``program``, in the program's declaration order."""
    dspy = _dspy()
    if not isinstance(program, dspy.Module):
        raise TypeError(f"components_from_dspy(program): expected a dspy.Module, got {type(program).__name__}")
    descriptions = dict(descriptions or {})
    out = []
    for dspy_name, predictor in program.named_predictors():
        name = _component_name(dspy_name)
        out.append(DSPyPredictorComponent(name, predictor, description=descriptions.pop(name, None), lm=lm))
    if not out:
        raise ValueError("components_from_dspy: the program has no predictors")
    if descriptions:
        raise ValueError(f"components_from_dspy(descriptions): no predictors named {sorted(descriptions)}")
    return out


def system_from_dspy(program: Any, metric: Callable[[Mapping, Mapping], float], final_outputs: Sequence[str], *,
                     inputs: Sequence[str] | None = None, lm: Any = None,
                     descriptions: Mapping[str, str] | None = None, name: str = "dspy") -> System:
    """A System of the program's predictors wired by field names (see the module docstring)."""
    components = components_from_dspy(program, lm=lm, descriptions=descriptions)
    return System(components, metric, final_outputs, inputs=inputs, name=name)
