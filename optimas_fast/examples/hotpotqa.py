"""HotpotQA, distractor setting (answer F1): query rewriter -> retriever -> answer generator.

- ``query_rewriter`` (Prompt): turns the question into a short search query (empty reply: the question).
- ``retriever`` (Choice): ranks the example's 10 paragraphs by
  ``(1 - w) * minmax(BM25) + w * minmax(cosine(MiniLM))`` with ``embedding_weight`` w in
  {0 (pure BM25), 0.25, 0.5, 0.75, 1 (pure embeddings)} and keeps the ``top_k`` in {1, 2, 3, 5}.
  One weight knob covers "BM25 vs embeddings vs hybrid" without duplicate configurations.
- ``answer_generator`` (Prompt): a short answer from the retrieved paragraphs; the span is the text after
  an "Answer:" marker (if any), first sentence, at most 12 words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from optimas_fast.examples.bm25 import BM25
from optimas_fast.examples.common import LMComponent, chat, clip, resolve_lms
from optimas_fast.examples.embeddings import Embedder, get_minilm
from optimas_fast.examples.parsing import answer_f1, extract_short_answer
from optimas_fast.lm.base import LM
from optimas_fast.system import Choice, Component, Prompt, System

__all__ = ["HotpotQAConfig", "build_hotpotqa_system", "hotpotqa_metric", "Retriever"]


@dataclass
class HotpotQAConfig:
    rewriter_max_tokens: int = 32  # a query is a handful of words
    answer_max_tokens: int = 24  # answers are short spans
    max_paragraph_chars: int = 600  # each retrieved paragraph cut to this (prompt size at top_k = 5)
    default_weight: float = 0.0  # initial embedding weight (0 = BM25), one of the Choice's options
    default_top_k: int = 2  # initial top-k (HotpotQA questions need two paragraphs)


REWRITE_PROMPT = "Rewrite the question as a short search query that names the key entities. Reply with the query only."
ANSWER_PROMPT = "Answer the question using the paragraphs. Reply with a short phrase only, no explanation."
WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]
TOP_KS = [1, 2, 3, 5]


class QueryRewriter(LMComponent):
    inputs = ("question",)
    outputs = ("search_query",)
    description = "Rewrites a multi-hop question into a short search query naming its key entities."

    def __init__(self, lms: Mapping[str, LM], config: HotpotQAConfig):
        super().__init__(lms, name="query_rewriter", variable=Prompt(REWRITE_PROMPT))
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Prompt) -> list[dict]:
        prompts = [chat(variable.text, f"Question: {b['question']}") for b in batch]
        texts = self.complete(self.lm(), prompts, max_tokens=self.config.rewriter_max_tokens, temperature=0.0)
        out = []
        for b, text in zip(batch, texts):
            query = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            out.append({"search_query": query or b["question"]})  # empty reply: search with the question
        return out


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


class Retriever(Component):
    inputs = ("search_query", "paragraphs")
    outputs = ("retrieved",)
    description = "Selects the paragraphs most relevant to the search query (BM25, MiniLM embeddings or a hybrid)."

    def __init__(self, embedder: Embedder | None, config: HotpotQAConfig):
        variable = Choice(
            {"embedding_weight": config.default_weight, "top_k": config.default_top_k},
            embedding_weight=WEIGHTS,
            top_k=TOP_KS,
        )
        super().__init__(name="retriever", variable=variable)
        self._embedder = embedder
        self.config = config

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_minilm()  # loaded on first use of an embedding weight > 0
        return self._embedder

    def rank(self, query: str, paragraphs: Sequence[str], weight: float) -> list[int]:
        """Paragraph indices, best first (ties broken by paragraph order, so ranking is deterministic)."""
        if (
            not isinstance(paragraphs, (list, tuple))
            or not paragraphs
            or not all(isinstance(p, str) for p in paragraphs)
        ):
            raise ValueError("component 'retriever': paragraphs must be a non-empty list of str")
        score = torch.zeros(len(paragraphs))
        if weight < 1.0:
            score += (1.0 - weight) * _minmax(torch.tensor(BM25(paragraphs).scores(query)))  # (P,)
        if weight > 0.0:
            emb = self.embedder.embed([query, *paragraphs])  # (1 + P, D), unit rows
            score += weight * _minmax(emb[1:] @ emb[0])  # (P,) cosine similarities
        return sorted(range(len(paragraphs)), key=lambda i: (-float(score[i]), i))

    def forward(self, search_query: str, paragraphs: Sequence[str], variable: Choice) -> dict:
        order = self.rank(search_query, paragraphs, float(variable["embedding_weight"]))
        top = order[: int(variable["top_k"])]
        return {"retrieved": [clip(paragraphs[i], self.config.max_paragraph_chars) for i in top]}


class AnswerGenerator(LMComponent):
    inputs = ("question", "retrieved")
    outputs = ("answer",)
    description = "Answers the multi-hop question with a short phrase taken from the retrieved paragraphs."

    def __init__(self, lms: Mapping[str, LM], config: HotpotQAConfig):
        super().__init__(lms, name="answer_generator", variable=Prompt(ANSWER_PROMPT))
        self.config = config

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Prompt) -> list[dict]:
        prompts = []
        for b in batch:
            paras = "\n".join(f"[{i + 1}] {p}" for i, p in enumerate(b["retrieved"]))
            prompts.append(chat(variable.text, f"Paragraphs:\n{paras}\n\nQuestion: {b['question']}\nAnswer:"))
        texts = self.complete(self.lm(), prompts, max_tokens=self.config.answer_max_tokens, temperature=0.0)
        return [{"answer": extract_short_answer(t)} for t in texts]


def hotpotqa_metric(example: Mapping[str, Any], prediction: Mapping[str, Any]) -> float:
    """Answer F1 (HotpotQA's normalisation: lower case, no punctuation or articles)."""
    return answer_f1(str(prediction.get("answer", "")), example["answer"])


def build_hotpotqa_system(
    lms: LM | Mapping[str, LM] | str | None = None,
    config: HotpotQAConfig | None = None,
    embedder: Embedder | None = None,
) -> System:
    """The HotpotQA system; ``embedder`` defaults to the shared MiniLM (loaded when first needed)."""
    config = config or HotpotQAConfig()
    if config.default_weight not in WEIGHTS or config.default_top_k not in TOP_KS:
        raise ValueError(f"HotpotQAConfig: default_weight must be in {WEIGHTS} and default_top_k in {TOP_KS}")
    lms = resolve_lms(lms)
    components = [QueryRewriter(lms, config), Retriever(embedder, config), AnswerGenerator(lms, config)]
    return System(components, hotpotqa_metric, ["answer"], inputs=["question", "paragraphs"], name="hotpotqa")
