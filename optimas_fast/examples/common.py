"""Pieces shared by the example systems: LM resolution, chat prompts, and a batched LM component base."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import optimas_fast.lm as lm_pkg
from optimas_fast.lm.base import LM
from optimas_fast.system.component import Component

__all__ = ["resolve_lms", "chat", "LMComponent", "clip"]

log = logging.getLogger(__name__)


def default_lm() -> LM:
    """The embedded SmolLM2-135M-Instruct (CPU, offline) from ``optimas_fast.lm``."""
    factory = getattr(lm_pkg, "make_lm", None)
    if factory is None:
        raise RuntimeError("optimas_fast.lm.make_lm is not available: pass lms=... (an LM or a dict of LMs)")
    return factory("embedded")


def resolve_lms(lms: LM | Mapping[str, LM] | str | None) -> dict[str, LM]:
    """A name -> LM dict from: None (the embedded default), one LM, a spec str for ``make_lm``, or a dict."""
    if lms is None:
        lm = default_lm()
        return {lm.name: lm}
    if isinstance(lms, str):
        if not hasattr(lm_pkg, "make_lm"):
            raise RuntimeError("optimas_fast.lm.make_lm is not available: pass lms=... (an LM or a dict of LMs)")
        lm = lm_pkg.make_lm(lms)
        return {lm.name: lm}
    if isinstance(lms, LM):
        return {lms.name: lms}
    if isinstance(lms, Mapping) and lms:
        for name, lm in lms.items():
            if not isinstance(name, str) or not isinstance(lm, LM):
                raise TypeError(f"lms: expected a dict of str -> optimas_fast.lm.LM, got {name!r}: {type(lm).__name__}")
        return dict(lms)
    raise TypeError(f"lms: expected an LM, a non-empty dict of LMs, a spec str or None, got {type(lms).__name__}")


def clip(text: str, max_chars: int) -> str:
    """Text cut to ``max_chars`` at a word boundary (prompts must fit a small model's context)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut) + " ..."


def chat(instruction: str, body: str) -> list[dict]:
    """A two-message chat: the instruction as the system message, the fields as the user message."""
    return [{"role": "system", "content": instruction}, {"role": "user", "content": body}]


class LMComponent(Component):
    """A component whose core is batched: ``forward_batch(list of inputs, variable) -> list of outputs``.

    ``forward`` is the batch of one. Subclasses implement ``forward_batch``; LM calls go through
    ``self.generate`` so the run's seed and usage accounting apply.
    """

    def __init__(self, lms: Mapping[str, LM], **kwargs):
        super().__init__(**kwargs)
        self.lms = dict(lms)

    def forward(self, variable: Any = None, **inputs) -> dict:
        return self.forward_batch([inputs], variable)[0]

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Any) -> list[dict]:
        raise NotImplementedError

    def lm(self, name: str | None = None) -> LM:
        """The LM called ``name`` (the first one when None); a clear error for an unknown name."""
        if name is None:
            return next(iter(self.lms.values()))
        if name not in self.lms:
            raise ValueError(f"component '{self.name}': no LM named {name!r} (have {sorted(self.lms)})")
        return self.lms[name]

    def complete(self, lm: LM, prompts: Sequence, **kwargs) -> list[str]:
        """One completion text per prompt (``""`` for an empty reply: the caller decides the fallback; a failed
        request raises, so the run records it as this example's failure)."""
        out = self.generate(lm, prompts, n=1, **kwargs)
        texts = []
        for row in out:
            if row and row[0].finish_reason == "error":
                # a failed request (LM built with on_error="record") fails this example, visibly
                raise RuntimeError(f"LM request failed: {getattr(row[0], 'error', None)}")
            text = row[0].text if row and isinstance(row[0].text, str) else ""
            texts.append(text.strip())
        return texts
