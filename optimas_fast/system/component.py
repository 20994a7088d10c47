"""Component: one step of a compound system, with declared fields and an optimizable variable.

Two ways to define one:

    class Solver(Component):
        inputs = ("question", "summary")
        outputs = ("answer",)
        description = "Answers the question from the summary."

        def forward(self, question, summary, variable):
            return {"answer": ...}

    Component("solver", inputs=["question"], outputs=["answer"], description="...",
              variable=Prompt("..."), fn=lambda question, variable: {"answer": ...})

``variable`` is one ``Variable`` (Prompt, Choice, Weights), None (not optimizable), or a dict of named
variables when a component has several knobs (e.g. ``{"prompt": Prompt(...), "policy": Choice(...)}``);
``forward`` then receives the dict. Each variable has an *address*: the component name for a single
variable, ``"component.key"`` for one of several. Optimizers and overrides use addresses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from optimas_fast.lm.base import LM, Completion
from optimas_fast.render import format_fields
from optimas_fast.system.context import current_run, record_usage
from optimas_fast.system.variables import Variable, Weights

__all__ = ["Component", "ComponentError"]


class ComponentError(ValueError):
    """A component was called with missing inputs, or returned a wrong set of output fields."""


def _check_fields(kind: str, fields: Any, owner: str) -> tuple[str, ...]:
    if isinstance(fields, str) or not isinstance(fields, Sequence):
        raise TypeError(f"component '{owner}': {kind} must be a list of field names, got {fields!r}")
    fields = tuple(fields)
    for f in fields:
        if not isinstance(f, str) or not f.isidentifier():
            raise ValueError(f"component '{owner}': {kind} field {f!r} is not a valid identifier")
    if len(set(fields)) != len(fields):
        raise ValueError(f"component '{owner}': duplicate {kind} fields in {list(fields)}")
    return fields


class Component:
    """Base class of every component; see the module docstring."""

    name: str = ""  # unique within a system; no dots (dots separate variable keys in addresses)
    inputs: Sequence[str] = ()  # field names read
    outputs: Sequence[str] = ()  # field names produced, exactly these in every forward's result
    description: str = ""  # what it does, in words (used in LRF templates and proposer prompts)

    def __init__(
        self,
        name: str | None = None,
        *,
        inputs: Sequence[str] | None = None,
        outputs: Sequence[str] | None = None,
        description: str | None = None,
        variable: Variable | Mapping[str, Variable] | None = None,
        fn: Callable[..., Mapping[str, Any]] | None = None,
    ):
        name = name if name is not None else (self.name or type(self).__name__)
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"Component name must be a non-empty str without '.', got {name!r}")
        self.name = name
        self.inputs = _check_fields("inputs", self.inputs if inputs is None else inputs, name)
        self.outputs = _check_fields("outputs", self.outputs if outputs is None else outputs, name)
        if not self.outputs:
            raise ValueError(f"component '{name}': declares no outputs")
        both = set(self.inputs) & set(self.outputs)
        if both:
            raise ValueError(f"component '{name}': fields {sorted(both)} are both inputs and outputs")
        self.description = self.description if description is None else description
        if not isinstance(self.description, str):
            raise TypeError(f"component '{name}': description must be a str")
        if fn is not None and not callable(fn):
            raise TypeError(f"component '{name}': fn must be callable")
        self._fn = fn
        self._variables: dict[str, Variable] = {}
        self._single = True
        self.variable = variable  # goes through the setter's checks

    # ----------------------------------------------------------------------------------------------
    # variables
    @property
    def variable(self) -> Variable | dict[str, Variable] | None:
        """The current variable (or dict of them); the value forward receives when nothing overrides it."""
        if self._single:
            return self._variables.get("")
        return dict(self._variables)

    @variable.setter
    def variable(self, value: Variable | Mapping[str, Variable] | None) -> None:
        if value is None:
            self._variables, self._single = {}, True
        elif isinstance(value, Variable):
            self._variables, self._single = {"": value}, True
        elif isinstance(value, Mapping):
            if not value:
                raise ValueError(f"component '{self.name}': an empty dict of variables; use None")
            for key, var in value.items():
                if not isinstance(key, str) or not key.isidentifier():
                    raise ValueError(f"component '{self.name}': variable key {key!r} is not an identifier")
                if not isinstance(var, Variable):
                    raise TypeError(
                        f"component '{self.name}': variable '{key}' must be a Prompt, Choice or Weights, "
                        f"got {type(var).__name__}"
                    )
            self._variables, self._single = dict(value), False
        else:
            raise TypeError(
                f"component '{self.name}': variable must be a Prompt, Choice, Weights, a dict of them or None, "
                f"got {type(value).__name__}"
            )

    def variables(self) -> dict[str, Variable]:
        """Every variable by address (``name`` for a single one, ``name.key`` for one of several)."""
        if self._single:
            return {self.name: v for v in self._variables.values()}  # noqa: B035 (exactly one variable here)
        return {f"{self.name}.{k}": v for k, v in self._variables.items()}

    def copy(self) -> Component:
        """A copy whose variables are independent of this component's: setting or loading a variable on one
        never shows on the other. Prompt and Choice values are immutable and shared; a module-held
        ``Weights`` is deep-copied (``Weights.copy``), since loading a state writes into its module. Every
        other attribute (LM clients, caches, indexes, policies) is shared: it is not optimizable state, and
        it may be large or uncopyable (locks, connections). Subclasses holding other mutable per-run state
        override this."""
        new = copy.copy(self)
        new._variables = {k: (v.copy() if isinstance(v, Weights) else v) for k, v in self._variables.items()}
        return new

    def variable_kinds(self) -> str | dict[str, str] | None:
        if self._single:
            v = self._variables.get("")
            return None if v is None else v.kind
        return {k: v.kind for k, v in self._variables.items()}

    def resolve_variable(self, override: Any = None) -> Variable | dict[str, Variable] | None:
        """The variable value for one call: the current one with ``override`` applied (not stored).

        For a single variable, ``override`` is a Variable or a raw value (str for Prompt, dict for
        Choice, module or path for Weights). For several, a dict ``{key: value}`` of some of the keys.
        """
        if override is None:
            return self.variable
        if not self._variables:
            raise ValueError(f"component '{self.name}' has no variable to override")
        if self._single:
            return self._variables[""].coerce(override)
        if not isinstance(override, Mapping):
            raise TypeError(
                f"component '{self.name}' has several variables {sorted(self._variables)}: override it with a "
                f"dict {{key: value}}, got {type(override).__name__}"
            )
        out = dict(self._variables)
        for key, val in override.items():
            if key not in out:
                raise ValueError(f"component '{self.name}': unknown variable key '{key}' (has {sorted(out)})")
            out[key] = out[key].coerce(val)
        return out

    # ----------------------------------------------------------------------------------------------
    # calling
    def forward(self, variable: Any = None, **inputs) -> Mapping[str, Any]:
        """Computes the outputs; subclasses override this (or pass ``fn``)."""
        if self._fn is None:
            raise NotImplementedError(f"component '{self.name}': define forward() or pass fn=")
        return self._fn(variable=variable, **inputs)

    def __call__(self, inputs: Mapping[str, Any], variable: Any = None) -> dict[str, Any]:
        """Runs forward on exactly the declared inputs with ``variable`` overriding the current one.

        Missing inputs or a result without exactly the declared output fields raise ComponentError.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(f"component '{self.name}': inputs must be a dict, got {type(inputs).__name__}")
        missing = [f for f in self.inputs if f not in inputs]
        if missing:
            raise ComponentError(f"component '{self.name}': missing input fields {missing}")
        kwargs = {f: inputs[f] for f in self.inputs}
        result = self.forward(variable=self.resolve_variable(variable), **kwargs)
        return self.check_outputs(result)

    def check_outputs(self, result: Any) -> dict[str, Any]:
        if not isinstance(result, Mapping):
            raise ComponentError(
                f"component '{self.name}': forward must return a dict with fields {list(self.outputs)}, "
                f"got {type(result).__name__}"
            )
        missing = [f for f in self.outputs if f not in result]
        extra = [f for f in result if f not in self.outputs]
        if missing or extra:
            raise ComponentError(
                f"component '{self.name}': output fields must be exactly {list(self.outputs)}; "
                f"missing {missing}, extra {extra}"
            )
        return {f: result[f] for f in self.outputs}

    # ----------------------------------------------------------------------------------------------
    # text forms for LRF templates and prompts
    def format_inputs(self, inputs: Mapping[str, Any], max_chars: int | None = None) -> str:
        """``field: value`` lines for the declared inputs, in declaration order (``optimas_fast.render``)."""
        return format_fields(inputs, self.inputs, max_chars)

    def format_outputs(self, outputs: Mapping[str, Any], max_chars: int | None = None) -> str:
        """``field: value`` lines for the declared outputs, in declaration order (``optimas_fast.render``)."""
        return format_fields(outputs, self.outputs, max_chars)

    # ----------------------------------------------------------------------------------------------
    # LM helper
    def generate(self, lm: LM, prompts: Sequence, **kwargs) -> list[list[Completion]]:
        """``lm.generate`` with the run's sampling seed (and, for best-of-N candidates, its sampling temperature)
        and usage recorded for this component's step."""
        if not isinstance(lm, LM):
            raise TypeError(f"component '{self.name}': expected an optimas_fast.lm.LM, got {type(lm).__name__}")
        ctx = current_run()
        if kwargs.get("seed") is None and ctx is not None and ctx.seed is not None:
            kwargs["seed"] = ctx.seed
        if ctx is not None and ctx.temperature is not None and (kwargs.get("temperature") or 0.0) < ctx.temperature:
            # a best-of-N candidate: greedy decoding would give N identical outputs, so sample (seeded)
            kwargs["temperature"] = ctx.temperature
        out = lm.generate(list(prompts), **kwargs)
        record_usage(out)
        return out

    def __repr__(self) -> str:
        var = self.variable
        return (
            f"{type(self).__name__}(name={self.name!r}, inputs={list(self.inputs)}, "
            f"outputs={list(self.outputs)}, variable={var!r})"
        )
