"""Preference pairs from scored candidates, their weights, and the PairStore that keeps them per component.

Pair building (DESIGN.md section 1, step 4): for the candidates y_1..y_K of one input with measured global
rewards s_1..s_K, emit **every** ordered pair (y_i, y_j) with s_i > s_j (the reference implementation only
looked at i < j and so dropped the pairs where the later candidate is better). Candidates with equal
rewards give no pair. Margin m = s_i - s_j > 0.

Weights: ``pair_weights`` is the reward engine's (optimas_fast.reward.pair_weights, re-exported here): the
normalised margin w = m / mean(m), floored at ``floor`` so that no valid pair gets weight 0; an empty list
gives [] and all-equal margins give 1.0 each, never NaN.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from optimas_fast._validate import check_int
from optimas_fast.reward import Candidate, PreferencePair, pair_weights

__all__ = ["build_pairs", "pair_weights", "PairStore", "is_held_out"]


def build_pairs(component: str, inputs: str, candidates: Sequence[tuple[str, float]]) -> list[PreferencePair]:
    """All ordered pairs (chosen, rejected) with reward(chosen) > reward(rejected).

    ``candidates``: (output text, reward) for one input; duplicate texts must already be merged.
    """
    texts = [t for t, _ in candidates]
    if len(set(texts)) != len(texts):
        raise ValueError(f"build_pairs: duplicate candidate outputs for component {component!r}; merge them first")
    out = []
    for i, (ti, si) in enumerate(candidates):
        if not math.isfinite(si):
            raise ValueError(f"build_pairs: candidate {i} of component {component!r} has reward {si}")
        for tj, sj in candidates:
            if si > sj:
                out.append(PreferencePair(component, inputs, ti, tj, float(si - sj)))
    return out


def is_held_out(key: str, fraction: float) -> bool:
    """Stable held-out membership of an example key (crc32, never Python's salted hash)."""
    return (zlib.crc32(key.encode("utf-8")) % 10_000) < int(round(fraction * 10_000))


@dataclass
class _Group:
    """The candidates of one (component, input) with their rewards, for pairs and alignment."""

    component: str
    key: str  # example key (decides the train / held-out split)
    inputs: str  # rendered inputs
    outputs: list  # rendered candidate outputs
    rewards: list  # measured mean global reward per candidate


class PairStore:
    """Preference data per component: bounded FIFO of candidate groups, split into train and held-out.

    The held-out share (examples whose key hashes below ``holdout_fraction``) is never trained on: the loop's
    alignment monitor measures each head's pairwise accuracy and rank correlation there. Raw inputs (the
    component's input dicts) of recent train examples are kept too: the optimizers score candidates on them.
    """

    def __init__(self, max_groups: int = 512, holdout_fraction: float = 0.2, max_inputs: int = 256):
        check_int(max_groups, "PairStore.max_groups", min=1)
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"PairStore.holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
        self.max_groups = max_groups
        self.holdout_fraction = holdout_fraction
        self.max_inputs = max_inputs
        self._groups: dict[str, deque] = {}
        self._inputs: dict[str, deque] = {}

    def add_group(
        self,
        component: str,
        key: str,
        inputs: str,
        candidates: Sequence[tuple[str, float]],
        raw_inputs: dict | None = None,
    ) -> list[PreferencePair]:
        """Store one input's scored candidates; returns its pairs (empty if all rewards tie)."""
        pairs = build_pairs(component, inputs, candidates)
        g = _Group(component, key, inputs, [t for t, _ in candidates], [float(s) for _, s in candidates])
        self._groups.setdefault(component, deque(maxlen=self.max_groups)).append(g)
        if raw_inputs is not None and not self.held_out(key):
            self._inputs.setdefault(component, deque(maxlen=self.max_inputs)).append(raw_inputs)
        return pairs

    def held_out(self, key: str) -> bool:
        return self.holdout_fraction > 0 and is_held_out(key, self.holdout_fraction)

    def _select(self, component: str | None, held_out: bool) -> Iterable[_Group]:
        comps = [component] if component is not None else sorted(self._groups)
        for c in comps:
            for g in self._groups.get(c, ()):
                if self.held_out(g.key) == held_out:
                    yield g

    def pairs(self, component: str | None = None, held_out: bool = False) -> list[PreferencePair]:
        out = []
        for g in self._select(component, held_out):
            out += build_pairs(g.component, g.inputs, list(zip(g.outputs, g.rewards)))
        return out

    def candidates(self, component: str | None = None, held_out: bool = True) -> list[Candidate]:
        return [
            Candidate(g.component, g.inputs, o, r)
            for g in self._select(component, held_out)
            for o, r in zip(g.outputs, g.rewards)
        ]

    def inputs(self, component: str) -> list[dict]:
        """Recent raw train inputs of ``component`` (oldest first)."""
        return list(self._inputs.get(component, ()))

    def components(self) -> list[str]:
        return sorted(self._groups)

    def __len__(self) -> int:
        return sum(len(v) for v in self._groups.values())

    def state_dict(self) -> dict:
        return {
            "max_groups": self.max_groups,
            "holdout_fraction": self.holdout_fraction,
            "max_inputs": self.max_inputs,
            "groups": {c: [asdict(g) for g in gs] for c, gs in self._groups.items()},
            "inputs": {c: list(v) for c, v in self._inputs.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> PairStore:
        store = cls(state["max_groups"], state["holdout_fraction"], state["max_inputs"])
        store._groups = {
            c: deque((_Group(**g) for g in gs), maxlen=store.max_groups) for c, gs in state["groups"].items()
        }
        store._inputs = {c: deque(v, maxlen=store.max_inputs) for c, v in state["inputs"].items()}
        return store
