"""Text forms of a component's inputs and outputs for the LRF (the reward engine only sees strings).

One place decides how a (component, inputs, outputs) row becomes text, so that pairs collected for training
and rows scored by the optimizers always use the same rendering.
"""
from __future__ import annotations

from typing import Any, Mapping

from optimas_fast.system import Component
from optimas_fast.system.component import REWARD_INPUT_CHARS as MAX_INPUT_CHARS
from optimas_fast.system.component import REWARD_OUTPUT_CHARS as MAX_OUTPUT_CHARS

__all__ = ["render_inputs", "render_outputs", "MAX_INPUT_CHARS", "MAX_OUTPUT_CHARS"]

# The per-field caps live with Component (best-of-N scoring in System renders rows the same way).


def render_inputs(component: Component, inputs: Mapping[str, Any], max_chars: int = MAX_INPUT_CHARS) -> str:
    return component.format_inputs(inputs, max_chars)


def render_outputs(component: Component, outputs: Mapping[str, Any], max_chars: int = MAX_OUTPUT_CHARS) -> str:
    return component.format_outputs(outputs, max_chars)
