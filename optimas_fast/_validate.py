"""Argument validators shared by every layer (the lowest layer: it imports nothing from optimas_fast).

Why one module: ``bool`` is a subclass of ``int``, so ``isinstance(True, int)`` holds and ``n=True`` would pass
an int check as 1. Every int or number check must exclude bool, and the copies of that test drifted (some
forgot it). Here it is written once.

Two kinds of helper:
- predicates ``is_int`` / ``is_number`` for call sites that word their own message or split TypeError (wrong
  type) from ValueError (out of range);
- ``check_*`` raisers with one message shape, ``"{name} must be {what}, got {value!r}"``, where ``name`` is the
  argument as the caller names it, prefix included ("OpenAIClient: timeout", "weights.lora_lr",
  "best_of['writer']"). Each raises ``error`` (ValueError unless the caller passes its own class, e.g. a
  ``ConfigError``) for a wrong type and a value out of range alike, and returns the value unchanged.

Bounds: ``min`` / ``max`` are inclusive, ``gt`` / ``lt`` exclusive. A NaN never satisfies a bound, so any bound
rejects NaN (``not v >= lo``, never ``v < lo``, which NaN slips through).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = ["is_int", "is_number", "check_int", "check_number", "check_bool", "check_choice"]


def is_int(value: Any, *, numpy: bool = False) -> bool:
    """True for an int that is not a bool. ``numpy=True`` also accepts numpy integers (any
    ``numbers.Integral``; numpy bools are not Integral)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral if numpy else int)


def is_number(value: Any, *, finite: bool = False) -> bool:
    """True for an int or a float that is not a bool; ``finite=True`` also rejects NaN and +-inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not finite or math.isfinite(value)


def _describe(kind: str, min: Any, max: Any, gt: Any, lt: Any) -> str:
    # "an int >= 1", "a number > 0", "a number in (0, 2]"
    lo = (f"[{min}", f">= {min}") if min is not None else (f"({gt}", f"> {gt}") if gt is not None else None
    hi = (f"{max}]", f"<= {max}") if max is not None else (f"{lt})", f"< {lt}") if lt is not None else None
    if lo and hi:
        return f"{kind} in {lo[0]}, {hi[0]}"
    if lo or hi:
        return f"{kind} {(lo or hi)[1]}"
    return kind


def _in_bounds(v: Any, min: Any, max: Any, gt: Any, lt: Any) -> bool:
    # written as "not v >= lo" so that NaN fails every bound
    return not (
        (min is not None and not v >= min)
        or (max is not None and not v <= max)
        or (gt is not None and not v > gt)
        or (lt is not None and not v < lt)
    )


def check_int(
    value: Any,
    name: str,
    *,
    min: int | None = None,
    max: int | None = None,
    allow_none: bool = False,
    none: str = "None",
    error: type[Exception] = ValueError,
    what: str | None = None,
) -> Any:
    """``value`` if it is an int (not a bool) within ``[min, max]`` (or None with ``allow_none``); else
    ``error("{name} must be an int >= {min}[ or None], got {value!r}")``. ``none`` is how None is spelled in
    the message ("null" for YAML configs); ``what`` replaces the generated description."""
    if value is None and allow_none:
        return value
    if not is_int(value) or not _in_bounds(value, min, max, None, None):
        desc = what or _describe("an int", min, max, None, None) + (f" or {none}" if allow_none else "")
        raise error(f"{name} must be {desc}, got {value!r}")
    return value


def check_number(
    value: Any,
    name: str,
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    finite: bool = False,
    allow_none: bool = False,
    none: str = "None",
    error: type[Exception] = ValueError,
    what: str | None = None,
) -> Any:
    """``value`` if it is an int or float (not a bool) within the bounds (and finite with ``finite``; or None
    with ``allow_none``); else ``error("{name} must be a [finite ]number > 0[ or None], got {value!r}")``.
    Returned unchanged (an int stays an int)."""
    if value is None and allow_none:
        return value
    if not is_number(value, finite=finite) or not _in_bounds(value, min, max, gt, lt):
        kind = "a finite number" if finite else "a number"
        desc = what or _describe(kind, min, max, gt, lt) + (f" or {none}" if allow_none else "")
        raise error(f"{name} must be {desc}, got {value!r}")
    return value


def check_bool(value: Any, name: str, *, allow_none: bool = False, error: type[Exception] = ValueError) -> Any:
    """``value`` if it is a bool (or None with ``allow_none``); else ``error("{name} must be a bool[ or None],
    got {value!r}")``. Ints are not bools here: ``flag=1`` is a mistake worth reporting."""
    if (value is None and allow_none) or isinstance(value, bool):
        return value
    raise error(f"{name} must be a bool{' or None' if allow_none else ''}, got {value!r}")


def check_choice(value: Any, name: str, choices: Collection, *, error: type[Exception] = ValueError) -> Any:
    """``value`` if it is one of ``choices``; else ``error("{name} must be one of {choices}, got {value!r}")``."""
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set or dict
        ok = False
    if not ok:
        raise error(f"{name} must be one of {choices}, got {value!r}")
    return value
