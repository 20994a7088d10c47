"""Trace of one system run, and the result of evaluating a system on many examples."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optimas_fast.lm.base import Usage
from optimas_fast.system.variables import Variable

__all__ = ["Step", "Trace", "EvalResult"]


def _describe(var: Any) -> Any:
    if var is None:
        return None
    if isinstance(var, Variable):
        return {"kind": var.kind, "value": var.describe()}
    return {k: _describe(v) for k, v in var.items()}


@dataclass
class Step:
    """One component call inside a run."""

    component: str  # component name
    inputs: dict  # the declared input fields it read
    outputs: dict | None  # its output fields (None when it failed)
    variable: Any  # the Variable (or dict of them) it ran with, overrides applied
    seconds: float = 0.0  # wall time of the call
    usage: Usage = field(default_factory=Usage)  # LM usage recorded during the call
    error: str | None = None  # "ExcType: message" when the call failed
    reused: bool = False  # copied from an earlier trace (run_downstream) rather than executed here
    best_of: dict | None = None  # best-of-N: {"n", "candidates" (distinct outputs), "scores", "chosen", "failed"}

    def to_dict(self) -> dict:
        return {
            "component": self.component,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "variable": _describe(self.variable),
            "seconds": self.seconds,
            "usage": vars(self.usage).copy(),
            "error": self.error,
            "reused": self.reused,
            **({"best_of": self.best_of} if self.best_of is not None else {}),
        }


@dataclass
class Trace:
    """Everything one run did: per-component steps, all field values, prediction, score, error."""

    example: Mapping  # the example the run started from
    fields: dict  # every field value known at the end (example inputs + all produced outputs)
    steps: list[Step]  # in execution (topological) order
    prediction: dict | None = None  # the system's final output fields (None when the run failed)
    score: float | None = None  # metric(example, prediction); 0.0 for a failed run; None if not scored
    error: str | None = None  # first error ("component 'x': ExcType: message" or "metric: ...")
    failed_component: str | None = None  # component whose call failed, if any
    traceback: str | None = None  # formatted traceback of the error, for debugging
    seconds: float = 0.0  # wall time of the whole run
    seed: int | None = None  # sampling seed the run used

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def usage(self) -> Usage:
        total = Usage()
        for step in self.steps:
            if not step.reused:
                total += step.usage
        return total

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.component == name:
                return s
        raise KeyError(f"trace has no step for component '{name}' (steps: {[s.component for s in self.steps]})")

    __getitem__ = step

    def raise_for_error(self) -> Trace:
        """Raises RuntimeError with the recorded error (and traceback) if the run failed; else returns self."""
        if self.error is not None:
            raise RuntimeError(f"{self.error}\n{self.traceback or ''}".rstrip())
        return self

    def to_dict(self) -> dict:
        """A JSON-safe dict (values that are not JSON become their str)."""
        data = {
            "fields": self.fields,
            "steps": [s.to_dict() for s in self.steps],
            "prediction": self.prediction,
            "score": self.score,
            "error": self.error,
            "failed_component": self.failed_component,
            "seconds": self.seconds,
            "seed": self.seed,
        }
        return json.loads(json.dumps(data, default=str))


@dataclass
class EvalResult:
    """Per-example scores and errors of ``System.evaluate``; a failed example scores 0 and keeps its error."""

    scores: list[float]  # one per example, in input order; 0.0 where the run failed
    errors: list[str | None]  # one per example; None where the run succeeded
    traces: list[Trace]  # one per example
    seconds: float = 0.0  # wall time of the whole evaluation

    @property
    def mean(self) -> float:
        return float(sum(self.scores) / len(self.scores)) if self.scores else math.nan

    @property
    def n_failed(self) -> int:
        return sum(e is not None for e in self.errors)

    @property
    def failed(self) -> list[int]:
        """Indices of the examples whose run failed."""
        return [i for i, e in enumerate(self.errors) if e is not None]

    @property
    def usage(self) -> Usage:
        total = Usage()
        for t in self.traces:
            total += t.usage
        return total

    def summary(self) -> dict:
        u = self.usage
        return {
            "n": len(self.scores),
            "mean": self.mean,
            "failed": self.n_failed,
            "seconds": self.seconds,
            "lm_calls": u.calls,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cache_hits": u.cache_hits,
        }

    def __len__(self) -> int:
        return len(self.scores)
