"""Amazon next-item selection (accuracy over 4 choices): session summariser -> candidate scorer -> decider.

- ``session_summariser`` (Prompt): one sentence on what the user is shopping for.
- ``candidate_scorer`` (Weights + Choice): a small trainable scorer over MiniLM embeddings. The session
  vector pools the clicked items' embeddings (``pooling``: mean, last item, or recency-weighted with
  decay ``recency_decay``), optionally averaged with the summary's embedding (``use_summary``); each
  choice gets ``CandidateScorer(session (B, D), candidates (B, K, D)) -> (B, K)`` logits. The scorer starts
  as scaled cosine similarity (its projection is initialised to the identity), so it is useful before any
  training; the Weights optimizer trains it.
- ``final_decider`` (Prompt + Choice): ``trust`` = "lm" (the LM picks from the numbered options),
  "scorer" (argmax of the scores, no LM call) or "lm_with_scores" (the LM sees the scorer's ranking).
  An LM reply that names no option falls back to the scorer's argmax (logged at debug level).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from optimas_fast.examples.common import LMComponent, chat, clip, resolve_lms
from optimas_fast.examples.embeddings import Embedder, get_minilm
from optimas_fast.examples.parsing import parse_option_index
from optimas_fast.lm.base import LM
from optimas_fast.system import Choice, Component, Prompt, System, Weights

__all__ = ["AmazonConfig", "CandidateScorer", "build_amazon_system", "amazon_metric", "pool_session"]

log = logging.getLogger(__name__)


@dataclass
class AmazonConfig:
    max_items: int = 8  # most recent session items shown to the LM (older ones rarely matter)
    max_item_chars: int = 120  # product titles are long; the head names the product
    summary_max_tokens: int = 48  # one sentence
    decider_max_tokens: int = 8  # an option number
    embedding_dim: int = 384  # MiniLM width; the scorer's input size
    init_scale: float = 10.0  # initial logit scale of the cosine scorer (softmax over 4 gets peaky enough)


SUMMARY_PROMPT = "Describe in one sentence what kind of product this shopper is looking for."
DECIDER_PROMPT = (
    "A shopper viewed the products listed. Which option will they interact with next? "
    "Reply with the option number only."
)


class CandidateScorer(torch.nn.Module):
    """score_k = scale * cos(P s, c_k): a cosine scorer with a trainable projection P and scale.

    forward(session (B, D), candidates (B, K, D)) -> logits (B, K).
    """

    def __init__(self, dim: int = 384, init_scale: float = 10.0):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))  # identity: starts as plain cosine similarity
        self.log_scale = torch.nn.Parameter(torch.tensor(float(init_scale)).log())

    def forward(self, session: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        if session.dim() != 2 or candidates.dim() != 3 or session.shape[0] != candidates.shape[0]:
            raise ValueError(
                f"CandidateScorer: expected session (B, D) and candidates (B, K, D), "
                f"got {tuple(session.shape)} and {tuple(candidates.shape)}"
            )
        s = torch.nn.functional.normalize(self.proj(session), dim=-1)  # (B, D)
        c = torch.nn.functional.normalize(candidates, dim=-1)  # (B, K, D)
        return self.log_scale.exp() * torch.einsum("bd,bkd->bk", s, c)  # (B, K)


def pool_session(items: torch.Tensor, pooling: str, decay: float) -> torch.Tensor:
    """(N, D) item embeddings, oldest first -> (D,) session vector."""
    if pooling == "mean":
        return items.mean(0)
    if pooling == "last":
        return items[-1]
    if pooling == "recency":
        n = items.shape[0]
        w = decay ** torch.arange(n - 1, -1, -1, dtype=items.dtype)  # (N,) newest item weight 1
        return (w[:, None] * items).sum(0) / w.sum()
    raise ValueError(f"pool_session: unknown pooling {pooling!r}")


def _format_session(session: Sequence[str], config: AmazonConfig) -> str:
    recent = list(session)[-config.max_items :]
    return "\n".join(f"- {clip(t, config.max_item_chars)}" for t in recent)


def _format_options(choices: Sequence[str], config: AmazonConfig) -> str:
    return "\n".join(f"{i + 1}. {clip(c, config.max_item_chars)}" for i, c in enumerate(choices))


def _check_choices(choices: Any, name: str) -> list[str]:
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"component '{name}': choices must be a list of at least 2 str")
    return list(choices)


class SessionSummariser(LMComponent):
    inputs = ("session",)
    outputs = ("session_summary",)
    description = "Summarises in one sentence what a shopper is looking for, from the products they viewed."

    def __init__(self, lms: Mapping[str, LM], config: AmazonConfig):
        super().__init__(lms, name="session_summariser", variable=Prompt(SUMMARY_PROMPT))
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Prompt) -> list[dict]:
        prompts = [
            chat(variable.text, "Viewed products:\n" + _format_session(b["session"], self.config)) for b in batch
        ]
        texts = self.complete(self.lm(), prompts, max_tokens=self.config.summary_max_tokens, temperature=0.0)
        return [{"session_summary": t} for t in texts]


class CandidateScorerComponent(Component):
    inputs = ("session", "session_summary", "choices")
    outputs = ("scores",)
    description = "Scores each candidate product by its similarity to the shopper's session (higher is likelier)."

    def __init__(self, embedder: Embedder | None, config: AmazonConfig):
        variable = {
            "weights": Weights(CandidateScorer(config.embedding_dim, config.init_scale)),
            "pooling": Choice(
                {"pooling": "recency", "recency_decay": 0.8, "use_summary": False},
                pooling=["mean", "last", "recency"],
                recency_decay=[0.5, 0.8],
                use_summary=[False, True],
            ),
        }
        super().__init__(name="candidate_scorer", variable=variable)
        self._embedder = embedder
        self.config = config

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_minilm()
        return self._embedder

    def session_and_candidates(
        self, session: Sequence[str], summary: str, choices: Sequence[str], pooling: Choice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scorer's inputs for one example: session (D,) and candidates (K, D)."""
        if not isinstance(session, (list, tuple)) or not session or not all(isinstance(s, str) for s in session):
            raise ValueError("component 'candidate_scorer': session must be a non-empty list of str")
        emb = self.embedder.embed([*session, *choices, summary or ""])  # (N + K + 1, D)
        n, k = len(session), len(choices)
        s = pool_session(emb[:n], pooling["pooling"], float(pooling["recency_decay"]))  # (D,)
        if pooling["use_summary"] and summary:
            s = 0.5 * (s + emb[-1])
        return s, emb[n : n + k]

    def forward(self, session, session_summary, choices, variable) -> dict:
        choices = _check_choices(choices, self.name)
        s, c = self.session_and_candidates(session, session_summary, choices, variable["pooling"])
        module = variable["weights"].module
        with torch.no_grad():
            logits = module(s[None].to(next(module.parameters()).dtype), c[None].to(s.dtype))[0]  # (K,)
        return {"scores": [round(float(x), 4) for x in logits]}


class FinalDecider(LMComponent):
    inputs = ("session", "session_summary", "choices", "scores")
    outputs = ("answer",)
    description = "Picks the product (0-based option index) the shopper will interact with next."

    def __init__(self, lms: Mapping[str, LM], config: AmazonConfig):
        variable = {"prompt": Prompt(DECIDER_PROMPT), "policy": Choice(trust=["lm", "scorer", "lm_with_scores"])}
        super().__init__(lms, name="final_decider", variable=variable)
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Mapping[str, Any]) -> list[dict]:
        trust = variable["policy"]["trust"]
        best = []
        for b in batch:
            choices = _check_choices(b["choices"], self.name)
            scores = b["scores"]
            if not isinstance(scores, (list, tuple)) or len(scores) != len(choices):
                raise ValueError(f"component '{self.name}': scores must be one number per choice")
            best.append(max(range(len(choices)), key=lambda i: (scores[i], -i)))
        if trust == "scorer":
            return [{"answer": i} for i in best]
        prompts = []
        for b in batch:
            body = (
                f"Shopper: {b['session_summary']}\nViewed products:\n{_format_session(b['session'], self.config)}\n"
                f"Options:\n{_format_options(b['choices'], self.config)}\n"
            )
            if trust == "lm_with_scores":
                ranking = sorted(range(len(b["choices"])), key=lambda i: -b["scores"][i])
                body += "A similarity model ranks the options: " + ", ".join(str(i + 1) for i in ranking) + "\n"
            prompts.append(chat(variable["prompt"].text, body + "Answer:"))
        texts = self.complete(self.lm(), prompts, max_tokens=self.config.decider_max_tokens, temperature=0.0)
        out = []
        for b, text, fallback in zip(batch, texts, best):
            idx = parse_option_index(text, len(b["choices"]), b["choices"])
            if idx is None:
                log.debug("final_decider: unparsable reply %r, using the scorer's choice", text[:80])
                idx = fallback
            out.append({"answer": idx})
        return out


def amazon_metric(example: Mapping[str, Any], prediction: Mapping[str, Any]) -> float:
    """Accuracy: 1.0 when the predicted option index equals the gold index."""
    return float(prediction.get("answer") == example["answer"])


def build_amazon_system(
    lms: LM | Mapping[str, LM] | str | None = None, config: AmazonConfig | None = None, embedder: Embedder | None = None
) -> System:
    """The Amazon next-item system; ``embedder`` defaults to the shared MiniLM (loaded when first needed)."""
    config = config or AmazonConfig()
    lms = resolve_lms(lms)
    if embedder is not None and embedder.dim != config.embedding_dim:
        config = AmazonConfig(**{**vars(config), "embedding_dim": embedder.dim})
    components = [SessionSummariser(lms, config), CandidateScorerComponent(embedder, config), FinalDecider(lms, config)]
    return System(components, amazon_metric, ["answer"], inputs=["session", "choices"], name="amazon")
