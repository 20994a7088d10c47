"""LMComponent: a component whose core is batched and whose LM calls go through the run's context.

    class Answerer(LMComponent):
        inputs, outputs = ("question",), ("answer",)
        description = "Answers the question in a few words."

        def forward_batch(self, batch, variable):
            prompts = [[{"role": "system", "content": variable.text},
                        {"role": "user", "content": b["question"]}] for b in batch]
            return [{"answer": t} for t in self.complete(self.lm(), prompts, max_tokens=16, temperature=0.0)]

    answerer = Answerer(lms={"main": lm}, variable=Prompt("Answer briefly."))

``forward_batch(list of inputs, variable) -> list of outputs`` is what optimizers call with many stored
inputs at once (``optimizers.run_batch`` looks for it by name), so a batching LM backend decodes them
together; ``forward`` is the batch of one. LM calls go through ``self.generate`` / ``self.complete``, so the
run's sampling seed (and, under best-of-N, its sampling temperature) and the usage accounting apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optimas_fast.lm.base import LM
from optimas_fast.system.component import Component

__all__ = ["LMComponent"]


class LMComponent(Component):
    """A component with named LMs (``lms``: name -> LM) and a batched ``forward_batch``; see the module
    docstring. The LMs are shared resources: ``copy()`` (and so ``System.copy`` / ``Optimas.optimize``)
    shares them, never copies them."""

    def __init__(self, lms: LM | Mapping[str, LM], **kwargs):
        super().__init__(**kwargs)
        if isinstance(lms, LM):
            lms = {lms.name: lms}
        if not isinstance(lms, Mapping) or not lms:
            raise TypeError(
                f"component '{self.name}': lms must be an LM or a non-empty dict name -> LM, got {type(lms).__name__}"
            )
        for name, lm in lms.items():
            if not isinstance(name, str) or not isinstance(lm, LM):
                raise TypeError(
                    f"component '{self.name}': lms must map str -> optimas_fast.lm.LM, got "
                    f"{name!r}: {type(lm).__name__}"
                )
        self.lms = dict(lms)

    def forward(self, variable: Any = None, **inputs) -> dict:
        return self.forward_batch([inputs], variable)[0]

    def forward_batch(self, batch: Sequence[Mapping[str, Any]], variable: Any) -> list[dict]:
        raise NotImplementedError(f"component '{self.name}': LMComponent subclasses implement forward_batch")

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
