"""Text forms of a component's inputs and outputs for the LRF (the reward engine only sees strings).

One place decides how a (component, inputs, outputs) row becomes text, so that pairs collected for training
and rows scored by the optimizers always use the same rendering.
"""
from __future__ import annotations

from typing import Any, Mapping

from optimas_fast.system import Component

__all__ = ["render_inputs", "render_outputs", "MAX_INPUT_CHARS", "MAX_OUTPUT_CHARS"]

# Per-field caps: the LRF template keeps at most 512 tokens, and an over-long *output* is an error there
# (the scored text is never truncated silently), so outputs are capped well below that here.
MAX_INPUT_CHARS = 1200
MAX_OUTPUT_CHARS = 600


def render_inputs(component: Component, inputs: Mapping[str, Any], max_chars: int = MAX_INPUT_CHARS) -> str:
    return component.format_inputs(inputs, max_chars)


def render_outputs(component: Component, outputs: Mapping[str, Any], max_chars: int = MAX_OUTPUT_CHARS) -> str:
    return component.format_outputs(outputs, max_chars)
