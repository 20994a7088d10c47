"""The one LM interface every backend implements and every component calls.

A prompt is either a plain string or a chat (list of {"role", "content"} dicts). ``generate`` is batched:
it takes a list of prompts and returns, per prompt, a list of ``n`` completions.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence, Union

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, Sequence[Message]]


@dataclass
class Usage:
    """Token and call accounting for one or more LM calls."""

    prompt_tokens: int = 0  # tokens read by the model
    completion_tokens: int = 0  # tokens generated
    calls: int = 0  # backend requests actually made (cache hits excluded)
    cache_hits: int = 0  # completions served from the cache
    cost_usd: float = 0.0  # from the price table; 0 for local models

    def __iadd__(self, other: "Usage") -> "Usage":
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls
        self.cache_hits += other.cache_hits
        self.cost_usd += other.cost_usd
        return self


@dataclass
class Completion:
    """One generated text with the usage that produced it."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    cached: bool = False


class LM(abc.ABC):
    """Base class: subclasses implement ``_generate`` for a batch; caching/accounting wrap it."""

    #: a stable identifier (backend + model) used in cache keys and usage reports
    name: str = "lm"

    @abc.abstractmethod
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        n: int = 1,
        temperature: float = 0.0,
        max_tokens: int = 256,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """Returns one list of ``n`` completions per prompt, in prompt order."""

    def __call__(self, prompt: Prompt, **kwargs) -> str:
        """Convenience: one prompt, one completion's text."""
        return self.generate([prompt], n=1, **kwargs)[0][0].text
