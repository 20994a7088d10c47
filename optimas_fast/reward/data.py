"""Plain-data inputs of the reward engine: scoring requests, preference pairs, held-out candidates.

Everything is plain strings: the System layer renders a component's inputs and outputs as text and the
engine never needs to know what a component is beyond its name and description.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from optimas_fast._validate import is_number


@dataclass(frozen=True)
class ScoreRequest:
    component: str  # which head scores this row
    inputs: str  # the component's inputs, rendered as text (-> prefix)
    outputs: str  # one candidate output, rendered as text (-> suffix)


@dataclass(frozen=True)
class PreferencePair:
    component: str  # which head the pair trains
    inputs: str  # shared inputs of both candidates (-> the shared prefix)
    chosen: str  # the output with the higher measured global reward
    rejected: str  # the output with the lower measured global reward
    margin: float = 1.0  # s_chosen - s_rejected >= 0 (drives the pair weight and the optional subtracted margin)


@dataclass(frozen=True)
class Candidate:
    """A held-out candidate with its measured global reward (for the alignment metric)."""

    component: str  # which head scores it
    inputs: str  # the input it answers
    outputs: str  # the candidate output
    reward: float  # measured global reward of the system with this output (mean over rollouts)


def _check_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def pair_weights(margins: Sequence[float], floor: float = 0.05, reference: float | None = None) -> list[float]:
    """Pair weights from margins (DESIGN.md section 1): the normalised margin, floored, w = max(m / ref, floor).

    ``ref`` is ``reference`` when given (the trainer passes the mean margin of the whole training set, so a
    batch's weights do not depend on which pairs it happens to hold), else the mean of ``margins``. Never 0 for
    a valid pair (floor > 0) and never NaN: an empty list gives [], a reference <= 0 (all-zero margins) gives
    1.0 each, and all-equal margins without a reference give exactly 1.0 each.
    """
    if not floor > 0:
        raise ValueError(f"pair_weights: floor must be > 0 (else a valid pair can get weight 0), got {floor!r}")
    ms = [float(m) for m in margins]
    for i, m in enumerate(ms):
        if not math.isfinite(m) or m < 0:
            raise ValueError(f"pair_weights: margins[{i}] must be finite and >= 0, got {m!r}")
    if reference is not None and not math.isfinite(reference):
        raise ValueError(f"pair_weights: reference must be finite, got {reference!r}")
    if not ms:
        return []
    if reference is None:
        if max(ms) == min(ms):
            return [1.0] * len(ms)
        reference = sum(ms) / len(ms)
    if reference <= 0:
        return [1.0] * len(ms)
    return [max(m / reference, floor) for m in ms]


def as_requests(requests: Iterable[Any]) -> list[ScoreRequest]:
    """Accept ScoreRequest objects or (component, inputs, outputs) tuples; validate types."""
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, ScoreRequest):
            out.append(r)
            continue
        if not isinstance(r, (tuple, list)) or len(r) != 3:
            raise TypeError(
                f"requests[{i}] must be a ScoreRequest or a (component, inputs, outputs) tuple, got {r!r:.80}"
            )
        out.append(ScoreRequest(*(_check_str(v, f"requests[{i}][{j}]") for j, v in enumerate(r))))
    return out


def as_pairs(pairs: Iterable[Any], what: str = "pairs") -> list[PreferencePair]:
    """Accept PreferencePair objects or (component, inputs, chosen, rejected[, margin]) tuples; validate."""
    if pairs is None:
        raise ValueError(f"{what} must be a non-empty sequence of preference pairs, got None")
    out = []
    for i, p in enumerate(pairs):
        if not isinstance(p, PreferencePair):
            if not isinstance(p, (tuple, list)) or len(p) not in (4, 5):
                raise TypeError(
                    f"{what}[{i}] must be a PreferencePair or a (component, inputs, chosen, rejected"
                    f"[, margin]) tuple, got {p!r:.80}"
                )
            p = PreferencePair(*p)
        for field_name in ("component", "inputs", "chosen", "rejected"):
            _check_str(getattr(p, field_name), f"{what}[{i}].{field_name}")
        if not is_number(p.margin):
            raise TypeError(f"{what}[{i}].margin must be a real number, got {type(p.margin).__name__}")
        if not math.isfinite(p.margin):
            raise ValueError(f"{what}[{i}].margin is {p.margin}: margins must be finite (NaN/inf reward gap?)")
        if p.margin < 0:
            raise ValueError(
                f"{what}[{i}].margin is {p.margin} < 0: chosen must score at least as high as rejected "
                "(swap chosen and rejected)"
            )
        out.append(p)
    if not out:
        raise ValueError(f"{what} is empty: need at least one preference pair")
    return out


def as_candidates(candidates: Sequence[Any] | None) -> list[Candidate]:
    if candidates is None:
        return []
    out = []
    for i, c in enumerate(candidates):
        if not isinstance(c, Candidate):
            if not isinstance(c, (tuple, list)) or len(c) != 4:
                raise TypeError(f"candidates[{i}] must be a Candidate or (component, inputs, outputs, reward)")
            c = Candidate(*c)
        if not isinstance(c.reward, (int, float)) or not math.isfinite(c.reward):
            raise ValueError(f"candidates[{i}].reward must be a finite number, got {c.reward!r}")
        out.append(c)
    return out
