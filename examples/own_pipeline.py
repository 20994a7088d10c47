"""Optimize your own pipeline: a two-component support-ticket router, end to end.

    extract (LM, Prompt)              ticket -> keywords
    route   (LM, Prompt + Choice)     ticket, keywords -> department      metric: department == gold

Run it (from the repository root):

    python examples/own_pipeline.py                      # a scripted stand-in LM: runs in seconds, no model
    python examples/own_pipeline.py --lm embedded --backbone minilm    # the embedded SmolLM2 and the MiniLM LRF
    optimas-fast run examples/own_pipeline.yaml          # the same through the CLI (system: own_pipeline:build_system)

The data are JSONL files, one example a line: the system's input fields (``ticket``) plus what the metric
reads (``department``); ``id`` keeps example keys stable.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optimas_fast.lm import LM, make_lm
from optimas_fast.optimize import Optimas, OptimasConfig
from optimas_fast.system import Choice, LMComponent, Prompt, System
from optimas_fast.system.testing import ScriptedLM

DATA = Path(__file__).resolve().parent / "own_pipeline_data"
DEPARTMENTS = ("billing", "tech", "shipping")


# ------------------------------------------------------------------------------------------- components
class ExtractKeywords(LMComponent):
    name = "extract"
    inputs = ("ticket",)
    outputs = ("keywords",)
    description = "Lists the words of a support ticket that say what it is about."

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Prompt) -> list[dict]:
        prompts = [
            [
                {"role": "system", "content": variable.text},
                {"role": "user", "content": f"Ticket: {b['ticket']}\nKeywords:"},
            ]
            for b in batch
        ]
        texts = self.complete(self.lm(), prompts, max_tokens=24, temperature=0.0)
        return [{"keywords": t.splitlines()[0].strip() if t else ""} for t in texts]


class Route(LMComponent):
    name = "route"
    inputs = ("ticket", "keywords")
    outputs = ("department",)
    description = "Routes a support ticket to one department: billing, tech or shipping."

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: dict) -> list[dict]:
        show_keywords = variable["context"]["show"] == "ticket+keywords"
        prompts = []
        for b in batch:
            body = f"Ticket: {b['ticket']}\n" + (f"Keywords: {b['keywords']}\n" if show_keywords else "")
            prompts.append(
                [
                    {"role": "system", "content": variable["prompt"].text},
                    {"role": "user", "content": body + "Department:"},
                ]
            )
        texts = self.complete(self.lm(), prompts, max_tokens=8, temperature=0.0)
        return [{"department": parse_department(t)} for t in texts]


def parse_department(text: str) -> str:
    """The first department named in a reply ("" when none is)."""
    m = re.search(r"\b(" + "|".join(DEPARTMENTS) + r")\b", text.lower())
    return m.group(1) if m else ""


def accuracy(example: Mapping, prediction: Mapping) -> float:
    """The metric: 1 when the routed department is the gold one."""
    return float(prediction["department"] == example["department"])


def build_system(lm: LM) -> System:
    """The factory the CLI calls (``system: own_pipeline:build_system``): one LM for both components."""
    extract = ExtractKeywords(lms={"main": lm}, variable=Prompt("List the keywords of the support ticket."))
    route = Route(
        lms={"main": lm},
        variable={
            "prompt": Prompt("Route the support ticket to billing, tech or shipping. Reply with one word."),
            "context": Choice(show=["ticket", "ticket+keywords"]),  # what the router sees
        },
    )
    return System([extract, route], accuracy, ["department"], inputs=["ticket"], name="ticket-router")


# ------------------------------------------------------------------------------------------- a scripted LM
KEYWORDS = {
    "refund": "billing",
    "invoice": "billing",
    "charged": "billing",
    "price": "billing",
    "crash": "tech",
    "error": "tech",
    "login": "tech",
    "password": "tech",
    "app": "tech",
    "package": "shipping",
    "delivery": "shipping",
    "tracking": "shipping",
    "courier": "shipping",
}
PROPOSALS = (
    "List every keyword of the ticket that names a product, a payment or a delivery.",
    "Extract the words that tell which department should handle the ticket.",
    "Name the topic words of the ticket, separated by commas.",
)


def _scripted_reply(prompt: str, i: int) -> str:
    """A stand-in for a real LM that reads the prompts above: keywords are the ticket's topic words; the
    router votes by keywords when it is shown them and otherwise guesses "tech" unless it sees a refund."""
    if "Write one new instruction" in prompt:  # the prompt optimizer's proposer
        return PROPOSALS[(len(prompt) + i) % len(PROPOSALS)]
    ticket = re.search(r"Ticket: (.*)", prompt)
    words = re.findall(r"[a-z]+", ticket.group(1).lower()) if ticket else []
    if prompt.rstrip().endswith("Keywords:"):
        return ", ".join(w for w in words if w in KEYWORDS)
    if prompt.rstrip().endswith("Department:"):
        shown = re.search(r"Keywords: (.*)", prompt)
        if shown:
            votes = [KEYWORDS[w] for w in re.findall(r"[a-z]+", shown.group(1)) if w in KEYWORDS]
            if votes:
                return max(DEPARTMENTS, key=votes.count)
        return "billing" if "refund" in words else "tech"
    return "I am not sure."


def scripted_lm() -> LM:
    """The scripted LM (the CLI config names it as ``lm: {factory: own_pipeline:scripted_lm}``)."""
    return ScriptedLM(_scripted_reply, name="scripted-support")


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------- optimize it
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm", default="scripted", help="'scripted' (default) or a make_lm spec such as 'embedded'")
    p.add_argument("--backbone", default="tiny-random", help="LRF backbone: 'tiny-random' (fast) or 'minilm'")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    lm = scripted_lm() if args.lm == "scripted" else make_lm(args.lm)
    system = build_system(lm)
    train, val, test = (load_jsonl(DATA / f"{k}.jsonl") for k in ("train", "val", "test"))
    heads = {name: c.description for name, c in system.components.items()}
    if args.backbone == "tiny-random":
        from optimas_fast.optimize.testing import tiny_reward_model

        rm = tiny_reward_model(heads, seed=0)
    else:
        from optimas_fast.reward import RewardModel

        rm = RewardModel(args.backbone, heads)
    config = OptimasConfig.from_dict(
        {
            "iterations": args.iterations,
            "batch_size": 6,
            "initial_examples": 8,
            "val_workers": 4,
            "collect": {"num_candidates": 3, "workers": 4},
            "prompt": {"num_proposals": 2},
        }
    )
    result = Optimas(rm, proposer=lm, config=config).optimize(system, train, val, run_dir=args.out)
    before, after = system.evaluate(test, workers=4).mean, result.system.evaluate(test, workers=4).mean
    print(
        json.dumps(
            {
                "val": [result.initial_val, result.best_val],
                "test_before": before,
                "test_after": after,
                "variables": {a: v.describe() for a, v in result.system.variables().items()},
                "run_dir": result.run_dir,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
