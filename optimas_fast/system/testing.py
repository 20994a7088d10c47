"""A scripted LM for tests and offline demos: replies come from a function or a fixed list, no model.

    lm = ScriptedLM(lambda prompt, i: "yes")          # i = sample index within n
    lm = ScriptedLM(["first reply", "second", ...])   # cycled, in call order (thread-safe)

Usage is counted as whitespace tokens so that accounting code has something real to add up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from optimas_fast.lm.base import LM, Completion, Prompt, Usage

__all__ = ["ScriptedLM", "prompt_text"]


def prompt_text(prompt: Prompt) -> str:
    """The text of a prompt: the string itself, or the chat messages' contents joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


class ScriptedLM(LM):
    """An LM whose replies are scripted. Records every call (``calls``: list of (prompt text, kwargs))."""

    def __init__(self, replies: Callable[[str, int], str] | Sequence[str], name: str = "scripted"):
        if callable(replies):
            self._fn = replies
            self._list = None
        else:
            if isinstance(replies, str) or not replies:
                raise ValueError("ScriptedLM(replies): expected a callable or a non-empty list of str")
            self._fn = None
            self._list = list(replies)
        self.name = name
        self.calls: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._next = 0

    def generate(self, prompts, *, n=1, temperature=0.0, max_tokens=256, stop=None, seed=None):
        if isinstance(prompts, str):
            raise TypeError("ScriptedLM.generate(prompts): expected a list of prompts, got a str")
        out = []
        for p in prompts:
            text = prompt_text(p)
            kwargs = {"n": n, "temperature": temperature, "max_tokens": max_tokens, "stop": stop, "seed": seed}
            row = []
            for i in range(n):
                with self._lock:
                    self.calls.append((text, kwargs))
                    if self._list is not None:
                        reply = self._list[self._next % len(self._list)]
                        self._next += 1
                if self._fn is not None:
                    reply = self._fn(text, i)
                if not isinstance(reply, str):
                    raise TypeError(f"ScriptedLM: the script returned {type(reply).__name__}, expected str")
                usage = Usage(prompt_tokens=len(text.split()), completion_tokens=len(reply.split()), calls=1)
                row.append(Completion(reply, usage=usage, finish_reason="stop"))
            out.append(row)
        return out
