"""How good are the local rewards? LRF pairwise accuracy against an LLM judge on held-out preference pairs.

Pairs come from examples the LRF **never trained on**: the loop's held-out share of its pair store
(``holdout_fraction``), and pairs collected after the run on test examples (``unseen_pairs``: the loop's own
collection procedure, outside the metric budget; the test split is never trained on). On each pair
(component, inputs, chosen, rejected), where "chosen" had the higher measured global reward:

- the LRF is right when its head scores chosen above rejected (a tie counts one half);
- the judge (an LM: the config's proposer, by default the config's ``lm``) is asked which of two outputs of
  the component is better for the system's final goal, **in both orders** (chosen first, then second); each
  order it gets right counts one half, so a judge that always answers "A" scores exactly 0.5 (position bias
  cancels) and a reply naming neither counts as wrong in that order.

Both accuracies get a 95% percentile-bootstrap interval over the pairs.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from optimas_fast.lm.usage import usage_scope
from optimas_fast.preference.collect import CollectConfig, collect_preferences
from optimas_fast.report import bootstrap_ci
from optimas_fast.reward.metrics import pair_hits

__all__ = ["judge_messages", "parse_verdict", "lrf_vs_judge", "unseen_pairs"]

log = logging.getLogger(__name__)

MAX_PAIRS = 64  # held-out pairs judged per component (2 LM calls each)


def judge_messages(description: str, inputs: str, first: str, second: str) -> list[dict]:
    body = (
        f"A step of an AI pipeline: {description}\n\nIts inputs:\n{inputs}\n\n"
        f"Output A:\n{first}\n\nOutput B:\n{second}\n\n"
        "Which output is better for the pipeline's final goal? Answer with one letter: A or B."
    )
    return [
        {"role": "system", "content": "You judge the outputs of AI pipeline steps."},
        {"role": "user", "content": body},
    ]


_VERDICT = re.compile(r"\b(?:output\s+)?([AB])\b")


def parse_verdict(text: str) -> str | None:
    """ "A", "B" or None (no verdict, or both letters named first-equal)."""
    m = _VERDICT.search((text or "").strip())
    return m.group(1) if m else None


def unseen_pairs(
    system: Any,
    components: Sequence[str],
    examples: Sequence[Mapping],
    config: CollectConfig,
    *,
    seed: int = 0,
    prompt_pool: Mapping[str, Sequence[str]] | None = None,
) -> list:
    """Preference pairs per component on ``examples`` (examples the LRF never saw: the test split), by the
    loop's collection procedure (``collect_preferences``: each example's current output against variants
    drawn from the component's search space, each scored by a downstream run and the metric). The caller
    decides whether those scored runs count against a budget (the harness runs this with its counter off)."""
    rng = random.Random(f"{seed}:unseen-pairs")
    pairs: list = []
    for name in components:
        res = collect_preferences(system, name, list(examples), rng, config, store=None, prompt_pool=prompt_pool)
        pairs += res.pairs
    return pairs


def lrf_vs_judge(
    pairs: Sequence[Any],
    rm: Any,
    judge: Any,
    descriptions: Mapping[str, str],
    *,
    seed: int = 0,
    max_pairs: int = MAX_PAIRS,
) -> dict:
    """Per component: ``{"n", "lrf": ci, "judge": ci, "judge_no_verdict", "lrf_per_pair", "judge_per_pair"}``
    (ci = ``bootstrap_ci`` output; the per-pair lists hold each pair's 0 / 0.5 / 1) on
    ``pairs`` (PreferencePair: component, inputs, chosen, rejected); the first ``max_pairs`` per component."""
    by_comp: dict[str, list] = {}
    for p in pairs:
        if len(by_comp.setdefault(p.component, [])) < max_pairs:
            by_comp[p.component].append(p)
    out = {}
    for comp, ps in sorted(by_comp.items()):
        rows = [(comp, p.inputs, y) for p in ps for y in (p.chosen, p.rejected)]
        scores = rm.score(rows).tolist()  # (2P,): chosen, rejected, chosen, rejected, ...
        lrf = pair_hits(torch.tensor(scores[0::2]), torch.tensor(scores[1::2])).tolist()  # the package's accuracy
        prompts = []
        for p in ps:
            prompts.append(judge_messages(descriptions.get(comp, comp), p.inputs, p.chosen, p.rejected))  # right: A
            prompts.append(judge_messages(descriptions.get(comp, comp), p.inputs, p.rejected, p.chosen))  # right: B
        judged, missing = [], 0
        if judge is not None:
            with usage_scope("judge"):
                replies = judge.generate(prompts, max_tokens=4, temperature=0.0, seed=seed)
            verdicts = [parse_verdict(r[0].text) for r in replies]
            missing = sum(v is None for v in verdicts)
            judged = [0.5 * (a == "A") + 0.5 * (b == "B") for a, b in zip(verdicts[0::2], verdicts[1::2], strict=True)]
        out[comp] = {
            "n": len(ps),
            "lrf": bootstrap_ci(lrf, seed=seed),
            "judge": bootstrap_ci(judged, seed=seed) if judged else None,
            "judge_no_verdict": missing,
            "lrf_per_pair": lrf,
            "judge_per_pair": judged,
        }  # pooled across seeds by the report
    return out
