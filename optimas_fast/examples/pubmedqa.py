"""PubMedQA (yes/no/maybe accuracy): context analyst -> answer model -> solver.

- ``context_analyst`` (Prompt): reads the abstract and writes the findings that bear on the question.
- ``answer_model`` (Choice over LM names and decoding settings): drafts an answer with a reason, using
  the chosen LM, temperature and length; the model-selection knob of the system.
- ``solver`` (Prompt + Choice): commits to one label from the question, the findings and the draft. Its
  ``policy`` Choice holds two decoding knobs: ``max_tokens`` (reply length: a small model often opens with
  "The study ..." and only names the label later) and ``fallback`` (the label given when neither the reply
  nor the draft holds one: "" = none, which scores 0, or a fixed label: the "abstention policy" of the
  system). The starting configuration is the shortest reply and no fallback (``config.fallback_label``).

Parsing: the solver's label is the first yes/no/maybe word of its reply (after an "Answer:" marker if
any); if there is none it falls back to the draft's label, then to the policy's ``fallback``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optimas_fast._validate import is_int
from optimas_fast.examples.common import LMComponent, chat, clip, resolve_lms
from optimas_fast.examples.parsing import parse_label
from optimas_fast.lm.base import LM
from optimas_fast.system import Choice, Prompt, System

__all__ = ["PubMedQAConfig", "build_pubmedqa_system", "pubmedqa_metric"]

LABELS = ("yes", "no", "maybe")


@dataclass
class PubMedQAConfig:
    max_context_chars: int = 1500  # abstract cut to fit a small model's context window (~400 tokens)
    analyst_max_tokens: int = 64  # findings are two sentences
    solver_max_tokens: tuple = (8, 32)  # solver reply lengths offered to its policy Choice (first: the start)
    temperatures: tuple = (0.0, 0.7)  # decoding settings offered to the answer-model Choice
    draft_max_tokens: tuple = (32, 64)  # draft lengths offered to the answer-model Choice
    fallback_label: str = ""  # the policy's starting fallback ("" = none: an unparsable reply scores 0)


ANALYST_PROMPT = (
    "You are a biomedical research assistant. Read the abstract and state, in at most two sentences, "
    "the findings that answer the question."
)
DRAFT_PROMPT = "Answer the research question with yes, no or maybe, then give one short reason."
SOLVER_PROMPT = "Reply with exactly one word, yes, no or maybe: does the evidence support the question?"


class ContextAnalyst(LMComponent):
    inputs = ("question", "context")
    outputs = ("summary",)
    description = "Reads a PubMed abstract and writes the key findings that bear on the research question."

    def __init__(self, lms: Mapping[str, LM], config: PubMedQAConfig):
        super().__init__(lms, name="context_analyst", variable=Prompt(ANALYST_PROMPT))
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Prompt) -> list[dict]:
        prompts = [
            chat(
                variable.text,
                f"Question: {b['question']}\nAbstract: {clip(b['context'], self.config.max_context_chars)}",
            )
            for b in batch
        ]
        texts = self.complete(self.lm(), prompts, max_tokens=self.config.analyst_max_tokens, temperature=0.0)
        # an empty reply leaves the findings empty: downstream components still see the question
        return [{"summary": t} for t in texts]


class AnswerModel(LMComponent):
    inputs = ("question", "summary")
    outputs = ("draft_answer",)
    description = "Drafts an answer (yes, no or maybe, with a reason) with the selected model and decoding settings."

    def __init__(self, lms: Mapping[str, LM], config: PubMedQAConfig):
        space = Choice(model=list(lms), temperature=list(config.temperatures), max_tokens=list(config.draft_max_tokens))
        super().__init__(lms, name="answer_model", variable=space)
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Choice) -> list[dict]:
        prompts = [chat(DRAFT_PROMPT, f"Question: {b['question']}\nFindings: {b['summary']}") for b in batch]
        texts = self.complete(
            self.lm(variable["model"]),
            prompts,
            max_tokens=int(variable["max_tokens"]),
            temperature=float(variable["temperature"]),
        )
        return [{"draft_answer": t} for t in texts]


class Solver(LMComponent):
    inputs = ("question", "summary", "draft_answer")
    outputs = ("answer",)
    description = "Gives the final answer to the research question: exactly one of yes, no or maybe."

    def __init__(self, lms: Mapping[str, LM], config: PubMedQAConfig):
        fallbacks = [config.fallback_label] + [f for f in ("",) + LABELS if f != config.fallback_label]
        policy = Choice(
            {"max_tokens": config.solver_max_tokens[0], "fallback": config.fallback_label},
            max_tokens=list(config.solver_max_tokens),
            fallback=fallbacks,
        )
        super().__init__(lms, name="solver", variable={"prompt": Prompt(SOLVER_PROMPT), "policy": policy})
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Mapping[str, Any]) -> list[dict]:
        policy = variable["policy"]
        prompts = [
            chat(
                variable["prompt"].text,
                f"Question: {b['question']}\nFindings: {b['summary']}\n"
                f"Draft answer: {b['draft_answer']}\nAnswer (yes, no or maybe):",
            )
            for b in batch
        ]
        texts = self.complete(self.lm(), prompts, max_tokens=int(policy["max_tokens"]), temperature=0.0)
        out = []
        for b, text in zip(batch, texts):
            label = parse_label(text, LABELS) or parse_label(b["draft_answer"], LABELS) or policy["fallback"]
            out.append({"answer": label})
        return out


def pubmedqa_metric(example: Mapping[str, Any], prediction: Mapping[str, Any]) -> float:
    """Accuracy: 1.0 when the predicted label equals the gold label."""
    return float(str(prediction.get("answer", "")).strip().lower() == example["answer"])


def build_pubmedqa_system(
    lms: LM | Mapping[str, LM] | str | None = None, config: PubMedQAConfig | None = None
) -> System:
    """The PubMedQA system. ``lms``: one LM, a dict name -> LM (the answer model chooses among them; the
    first one serves the analyst and solver), a ``make_lm`` spec, or None for the embedded default."""
    config = config or PubMedQAConfig()
    if config.fallback_label not in LABELS + ("",):
        raise ValueError(f"PubMedQAConfig.fallback_label must be one of {LABELS} or '', got {config.fallback_label!r}")
    if (
        not isinstance(config.solver_max_tokens, (tuple, list))
        or not config.solver_max_tokens
        or not all(is_int(n) and n >= 1 for n in config.solver_max_tokens)
    ):
        raise ValueError(
            f"PubMedQAConfig.solver_max_tokens must be a non-empty tuple of ints >= 1, got {config.solver_max_tokens!r}"
        )
    lms = resolve_lms(lms)
    components = [ContextAnalyst(lms, config), AnswerModel(lms, config), Solver(lms, config)]
    return System(components, pubmedqa_metric, ["answer"], inputs=["question", "context"], name="pubmedqa")
