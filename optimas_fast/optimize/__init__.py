"""The Optimas loop: component selection, preference collection, online LRF adaptation, per-variable
optimizers, validation gate, alignment monitor, budgets, atomic RunState checkpoints and resume."""

from optimas_fast.optimize.config import BudgetConfig, ConfigError, OptimasConfig
from optimas_fast.optimize.loop import Optimas, OptimasResult, select_component
from optimas_fast.optimize.state import RUN_STATE, load_run_state

__all__ = [
    "Optimas",
    "OptimasResult",
    "OptimasConfig",
    "BudgetConfig",
    "ConfigError",
    "select_component",
    "RUN_STATE",
    "load_run_state",
]
