"""Pieces shared by the example systems: LM resolution and chat prompts. ``LMComponent`` (the batched LM
component base) lives in ``optimas_fast.system``; it is re-exported here for existing imports."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import optimas_fast.lm as lm_pkg
from optimas_fast.lm.base import LM
from optimas_fast.system.lm_component import LMComponent

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
