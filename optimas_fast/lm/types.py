"""Plain data types of the LM layer (no behaviour, no imports from the rest of the layer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Message", "Prompt", "Usage", "Completion"]

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = str | Sequence[Message]


@dataclass
class Usage:
    """Token and call accounting for one or more LM calls."""

    prompt_tokens: int = 0  # tokens read by the model
    completion_tokens: int = 0  # tokens generated
    calls: int = 0  # backend requests actually made (cache hits excluded)
    cache_hits: int = 0  # completions served from the cache
    cost_usd: float = 0.0  # from the price table; 0 for local models

    def __iadd__(self, other: Usage) -> Usage:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.calls += other.calls
        self.cache_hits += other.cache_hits
        self.cost_usd += other.cost_usd
        return self

    def __add__(self, other: Usage) -> Usage:
        out = Usage(**vars(self))
        out += other
        return out

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """One generated text with the usage that produced it."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    cached: bool = False
    error: str | None = None  # why the request failed, when finish_reason == "error" (on_error="record")
