"""Per-run context: the seed components sample with, and the usage accumulator of the running step.

Both live in ``contextvars`` so that concurrent runs on different threads never see each other's
state: a run sets them for the duration of one component call and restores them afterwards.
Components reach them through ``current_run()`` / ``record_usage()`` (or ``Component.generate``,
which does both). Code that spawns its own threads must copy the context (``contextvars.copy_context``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from optimas_fast.lm.base import Completion, Usage
from optimas_fast.lm.usage import usage_scope as _lm_usage_scope

__all__ = ["RunContext", "current_run", "record_usage", "usage_scope"]


@dataclass
class RunContext:
    """What a component may need to know about the run it is part of."""

    component: str  # name of the component being called
    seed: int | None = None  # sampling seed for LM calls (distinct rollouts get distinct seeds)
    temperature: float | None = None  # best-of-N sampling: LM calls sample at least this hot (None: as asked)
    usage: Usage = field(default_factory=Usage)  # LM usage recorded during this component call


_RUN: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("optimas_fast_run", default=None)


def current_run() -> RunContext | None:
    """The context of the component call in progress on this thread, or None outside a system run."""
    return _RUN.get()


def record_usage(completions: Iterable) -> None:
    """Adds the usage of ``completions`` (Completion objects or nested lists of them) to the running step.

    Outside a system run this does nothing, so LM helpers can call it unconditionally.
    """
    ctx = _RUN.get()
    if ctx is None:
        return
    for item in completions:
        if isinstance(item, Completion):
            ctx.usage += item.usage
        else:
            record_usage(item)


@contextlib.contextmanager
def usage_scope(component: str, seed: int | None = None, temperature: float | None = None) -> Iterator[RunContext]:
    """Makes a fresh RunContext current for the duration of one component call, and enters the LM layer's
    ``usage_scope(component)`` so that its ledger (per-component totals, budgets) attributes the calls too."""
    ctx = RunContext(component=component, seed=seed, temperature=temperature)
    token = _RUN.set(ctx)
    try:
        with _lm_usage_scope(component):
            yield ctx
    finally:
        _RUN.reset(token)
