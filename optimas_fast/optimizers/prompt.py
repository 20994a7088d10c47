"""Prompt optimizer (OPRO-style): the proposer LM writes new instructions from the current one and the
scored history; every candidate **and the incumbent** run the component on the same stored inputs, and each
is scored by the mean LRF score of its outputs (rows aligned with their inputs, one batched score call).

History: per variable address, the instructions tried so far with their mean LRF score at the time, best
last (OPRO shows the top of the trajectory in ascending order so the model continues the trend). It is part
of the run state (``state_dict``) so a resumed run proposes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optimas_fast._validate import check_int
from optimas_fast.lm.base import LM
from optimas_fast.lm.usage import usage_scope as lm_usage_scope
from optimas_fast.optimizers.base import (
    Optimizer,
    OptimizerBudget,
    Proposal,
    mean,
    override_for,
    pick_best,
    resolve_address,
    run_batch,
    score_matrix,
)
from optimas_fast.system import Component, Prompt

__all__ = ["PromptConfig", "PromptOptimizer", "parse_instruction", "meta_prompt", "echoes"]

log = logging.getLogger(__name__)


@dataclass
class PromptConfig:
    num_proposals: int = 4  # new instructions asked of the proposer per call
    temperature: float = 0.8  # proposer sampling temperature (diversity between proposals)
    max_tokens: int = 96  # proposer completion length
    history_size: int = 6  # scored instructions shown to the proposer
    max_inputs: int = 6  # stored inputs each candidate runs on
    max_chars: int = 500  # longer proposals are cut (a small model can ramble)

    def validate(self) -> None:
        for name in ("num_proposals", "max_tokens", "history_size", "max_inputs", "max_chars"):
            check_int(getattr(self, name), f"prompt.{name}", min=1)
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"prompt.temperature must be in [0, 2], got {self.temperature!r}")


_PREFIX = re.compile(r"^\s*(new\s+)?(instruction|prompt)\s*\d*\s*[:\-]\s*", re.IGNORECASE)


def parse_instruction(text: str, max_chars: int = 500) -> str | None:
    """The instruction in a proposer reply: first paragraph, label and quotes stripped; None if too short."""
    text = (text or "").strip()
    text = text.split("\n\n")[0].strip()
    text = _PREFIX.sub("", text).strip().strip('"').strip("'").strip("`").strip()
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text if len(text.split()) >= 3 else None


def _ngrams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def echoes(proposal: str, context: str, allowed: str, n: int = 5) -> bool:
    """True when ``proposal`` copies a run of ``n`` words from ``context`` (the meta-prompt's own wording or
    the example inputs) that does not occur in ``allowed`` (the instructions it may rewrite). Small proposer
    models often answer a meta-prompt by continuing it ("A component of an AI pipeline: ...") or by quoting
    the example; such a reply is not an instruction and must not reach the validation gate."""
    return bool((_ngrams(proposal, n) & _ngrams(context, n)) - _ngrams(allowed, n))


def meta_prompt(component: Component, current: str, history: Sequence[tuple[str, float]], example: str) -> list[dict]:
    lines = [f"Score {s:.3f}: {t}" for t, s in sorted(history, key=lambda h: h[1])]
    body = (
        f"A component of an AI pipeline: {component.description}\n"
        f"Its inputs look like this:\n{example}\n\n"
        f"Instructions tried so far, from worst to best score:\n"
        + ("\n".join(lines) or "(none yet)")
        + f"\n\nCurrent instruction: {current}\n\n"
        "Write one new instruction that is different from all of the above and likely to score higher. "
        "Reply with the instruction only."
    )
    return [
        {"role": "system", "content": "You improve instructions for language models."},
        {"role": "user", "content": body},
    ]


class PromptOptimizer(Optimizer):
    kind = "prompt"

    def __init__(self, proposer: LM | None, config: PromptConfig | None = None):
        self.proposer = proposer
        self.config = config or PromptConfig()
        self.config.validate()
        self.history: dict[str, list[tuple[str, float]]] = {}  # address -> [(instruction, score)]
        self.seeds: dict[str, list[str]] = {}  # address -> unscored rewrites (preference-collection variants)

    def pool(self) -> dict[str, list[str]]:
        """Instructions known per address, scored or not (preference collection draws Prompt variants here)."""
        out = {a: list(v) for a, v in self.seeds.items()}
        for a, h in self.history.items():
            out.setdefault(a, [])
            out[a] += [t for t, _ in h if t not in out[a]]
        return out

    def seed_pool(
        self, component: Component, address: str, example: Mapping[str, Any], n: int, rng: random.Random
    ) -> list[str]:
        """Ask the proposer for ``n`` rewrites of the current instruction, without scores: a Prompt's "search
        space" for preference collection before the optimizer has run (else a temperature-0 prompt component
        has a single candidate output and never gets pairs)."""
        address, _, current = resolve_address(component, address)
        texts = self.propose(component, address, current.text, component.format_inputs(example, 400), n, rng)
        self.seeds.setdefault(address, []).extend(t for t in texts if t not in self.seeds.get(address, []))
        return texts

    def propose(
        self, component: Component, address: str, current: str, example: str, n: int, rng: random.Random
    ) -> list[str]:
        if self.proposer is None:
            raise ValueError("PromptOptimizer: no proposer LM was given (set the loop's proposer)")
        hist = self.history.get(address, [])[-self.config.history_size :]
        with lm_usage_scope("proposer"):
            out = self.proposer.generate(
                [meta_prompt(component, current, hist, example)],
                n=n,
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
                seed=rng.randrange(2**31),
            )
        seen = {current} | {t for t, _ in self.history.get(address, [])} | set(self.seeds.get(address, []))
        # what a reply may legitimately reuse (the instructions) vs what it must not parrot (everything else
        # the proposer was shown)
        shown = " ".join(m["content"] for m in meta_prompt(component, current, hist, example))
        allowed = " ".join([current, *(t for t, _ in hist)])
        props, echoed = [], 0
        for c in out[0]:
            text = parse_instruction(c.text, self.config.max_chars)
            if text and echoes(text, shown, allowed):
                echoed += 1
                continue
            if text and text not in seen:
                seen.add(text)
                props.append(text)
        if echoed:
            log.info("prompt proposals for %s: dropped %d that copy the meta-prompt or the example", address, echoed)
        return props

    def optimize(
        self,
        component: Component,
        inputs: Sequence[Mapping[str, Any]],
        reward_model: Any,
        budget: OptimizerBudget | None = None,
        *,
        address: str | None = None,
        rng: random.Random | None = None,
    ) -> Proposal:
        t0, rng, budget, address, key, current = self._start(component, budget, address, rng, Prompt)
        xs = self._inputs(inputs, budget.max_inputs or self.config.max_inputs, rng)
        n = min(self.config.num_proposals, budget.max_candidates or self.config.num_proposals)
        texts = self.propose(component, address, current.text, component.format_inputs(xs[0], 400), n, rng)
        scored = {t for t, _ in self.history.get(address, [])}
        unscored = [t for t in self.seeds.get(address, []) if t not in scored and t != current.text]
        # incumbent first (ties keep it), then the new proposals, then seeded rewrites never scored yet
        cands = [current] + [Prompt(t) for t in texts + unscored]
        outputs = [run_batch(component, xs, override_for(key, c)) for c in cands]
        mat = score_matrix(component, reward_model, xs, outputs)  # (1 + proposals, inputs)
        means = [mean(row) for row in mat]
        hist = self.history.setdefault(address, [])
        known = {t for t, _ in hist}
        for c, s in zip(cands, means):
            if c.text not in known:
                hist.append((c.text, s))
                known.add(c.text)
        best = pick_best(means)
        return Proposal(
            address,
            cands[best],
            current,
            means[best],
            means[0],
            [{"value": c.text, "score": s} for c, s in zip(cands, means)],
            n_rows=sum(y is not None for outs in outputs for y in outs),
            n_inputs=len(xs),
            seconds=self._clock() - t0,
            info={"proposals": len(texts)},
        )

    def state_dict(self) -> dict:
        return {
            "history": {a: [[t, s] for t, s in h] for a, h in self.history.items()},
            "seeds": {a: list(v) for a, v in self.seeds.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.history = {a: [(t, float(s)) for t, s in h] for a, h in state.get("history", {}).items()}
        self.seeds = {a: list(v) for a, v in state.get("seeds", {}).items()}
