"""Text forms of field values and of (component, inputs, outputs) rows: the one place that decides what an LRF
reads. It sits below ``system`` and ``reward`` (it imports nothing of the package), so the preference layer
(pairs collected by the loop), the optimizers (candidates scored against an LRF), best-of-N and the reward
engine's file formats (``reward.formats``: pairs read from TRL or reference Optimas data) all render alike.

    format_value(0.123456)                          # '0.1235'
    format_fields({"q": "why?", "k": 3})            # 'q: why?\\nk: 3'
    reward_row(component, inputs, outputs)          # (component.name, inputs text, outputs text)

A *component* here is anything with ``name``, ``inputs`` and ``outputs`` (field names), e.g. a
``system.Component``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "REWARD_INPUT_CHARS",
    "REWARD_OUTPUT_CHARS",
    "format_fields",
    "format_value",
    "render_inputs",
    "render_outputs",
    "reward_row",
]

# Per-field caps of the text an LRF sees: the LRF template keeps at most 512 tokens, and an over-long *output*
# is an error there (the scored text is never truncated silently), so outputs are capped well below that.
REWARD_INPUT_CHARS = 1200
REWARD_OUTPUT_CHARS = 600


class HasFields(Protocol):
    name: str
    inputs: Sequence[str]
    outputs: Sequence[str]


def format_value(value: Any, max_chars: int | None = None) -> str:
    """Text form of a field value for prompts and LRF templates (str as is, floats rounded, else JSON);
    longer than ``max_chars`` ends in ``...`` within the cap."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
        text = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max(0, max_chars - 3)] + "..."
    return text


def format_fields(values: Mapping[str, Any], fields: Iterable[str] | None = None, max_chars: int | None = None) -> str:
    """``field: value`` lines for ``fields`` in their order (a field ``values`` lacks reads ``null``); every
    key of ``values`` in its own order when ``fields`` is None."""
    names = values.keys() if fields is None else fields
    return "\n".join(f"{f}: {format_value(values.get(f), max_chars)}" for f in names)


def render_inputs(component: HasFields, inputs: Mapping[str, Any], max_chars: int = REWARD_INPUT_CHARS) -> str:
    """The LRF's text of a component's inputs: its declared input fields, each capped at ``max_chars``."""
    return format_fields(inputs, component.inputs, max_chars)


def render_outputs(component: HasFields, outputs: Mapping[str, Any], max_chars: int = REWARD_OUTPUT_CHARS) -> str:
    """The LRF's text of a component's outputs: its declared output fields, each capped at ``max_chars``."""
    return format_fields(outputs, component.outputs, max_chars)


def reward_row(component: HasFields, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(component name, inputs text, outputs text)``: the row a reward model's ``score(rows)`` takes."""
    return component.name, render_inputs(component, inputs), render_outputs(component, outputs)
