"""Compound systems: components with declared fields and optimizable variables, wired into a DAG.

See ``system.py`` for the run/evaluate/override/state API and ``component.py`` for defining components.
"""

from optimas_fast.system.component import Component, ComponentError
from optimas_fast.system.context import RunContext, current_run, record_usage
from optimas_fast.system.lm_component import LMComponent
from optimas_fast.system.system import STATE_FORMAT, System
from optimas_fast.system.trace import EvalResult, Step, Trace
from optimas_fast.system.variables import Choice, Prompt, Variable, Weights, variable_from_state

__all__ = [
    "Component",
    "ComponentError",
    "LMComponent",
    "RunContext",
    "current_run",
    "record_usage",
    "System",
    "STATE_FORMAT",
    "EvalResult",
    "Step",
    "Trace",
    "Variable",
    "Prompt",
    "Choice",
    "Weights",
    "variable_from_state",
]
