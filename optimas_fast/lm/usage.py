"""Usage and cost accounting: prices, per-component/per-run ledgers, and hard budgets.

How usage flows
---------------
Every ``LM.generate`` call (1) returns ``Completion`` objects that each carry their own ``Usage``
(tokens, 1 call or 1 cache hit, $), and (2) records the same usage in a ``UsageLedger`` under the name of
the *component* that is running. So there are two ways to attribute usage, and they agree:

* the System sums ``completion.usage`` of what a component got back (per step, per trace);
* the ledger keeps running totals per component, per model and overall (per run), and enforces the
  ``Budget``.

Which component is running is a ``contextvars`` value set by ``usage_scope``::

    from optimas_fast.lm import usage_scope
    with usage_scope("solver"):
        lm.generate([...])          # recorded under "solver" in the current ledger

Calls outside any scope are recorded under ``UNSCOPED`` ("(none)"). Which ledger is used: the LM's own
``lm.ledger`` if set, else the one made current with ``use_ledger(ledger)`` (a contextvar), else the
process-wide default (``default_ledger()``, replaceable with ``set_default_ledger``). Threads started with
a plain ``ThreadPoolExecutor`` do not inherit contextvars: copy the context (``contextvars.copy_context``)
or set the process default, as the loop does for a whole run.

Budgets
-------
``Budget(max_calls, max_tokens, max_usd)`` is a hard cap. Before a ``generate`` call sends anything, it
*reserves* the worst case of all its backend requests (1 call each, estimated prompt tokens,
``max_tokens`` completion tokens per request, and their price). If the reservation would exceed any limit,
``BudgetExceeded`` is raised and nothing is sent (cache hits are free and always served). After the call
the reservation is replaced by the actual usage. Prompt tokens are exact for local models and estimated
(~4 characters a token) for HTTP backends, so the $ cap can be overshot only by that estimate's error.

Prices are US dollars per million tokens (input, output), looked up by exact model name, then by the
longest registered prefix; local models cost 0. Extend with ``register_price``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from optimas_fast._validate import check_number, is_number
from optimas_fast.lm.errors import BudgetExceeded
from optimas_fast.lm.types import Usage

__all__ = [
    "UNSCOPED",
    "Budget",
    "BudgetExceeded",
    "UsageLedger",
    "usage_scope",
    "current_component",
    "use_ledger",
    "current_ledger",
    "default_ledger",
    "set_default_ledger",
    "PRICES",
    "register_price",
    "price_for",
    "cost_usd",
]

logger = logging.getLogger(__name__)

UNSCOPED = "(none)"

# USD per 1M tokens (input, output) as published by the providers (mid 2025). Verify before relying on
# them for billing, and extend with register_price(); unknown hosted models cost 0 with one warning.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}
_PRICES_LOCK = threading.Lock()
_WARNED_UNPRICED: set[str] = set()


def register_price(model: str, input_per_mtok: float, output_per_mtok: float) -> None:
    """Adds or replaces the price of ``model`` (or of every model starting with that prefix)."""
    if not isinstance(model, str) or not model:
        raise TypeError(f"register_price: model must be a non-empty string, got {model!r}")
    for name, v in (("input_per_mtok", input_per_mtok), ("output_per_mtok", output_per_mtok)):
        check_number(v, f"register_price: {name}", min=0, finite=True)
    with _PRICES_LOCK:
        PRICES[model] = (float(input_per_mtok), float(output_per_mtok))


def price_for(model: str) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for ``model``: exact name, else longest matching prefix."""
    with _PRICES_LOCK:
        if model in PRICES:
            return PRICES[model]
        best = max((p for p in PRICES if model.startswith(p)), key=len, default=None)
        return PRICES[best] if best is not None else None


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, *, priced: bool = True) -> float:
    """Dollar cost of one request; 0 for local backends (``priced=False``) and unknown models."""
    if not priced:
        return 0.0
    p = price_for(model)
    if p is None:
        if model not in _WARNED_UNPRICED:
            _WARNED_UNPRICED.add(model)
            logger.warning(
                "no price registered for model %r: its cost is counted as $0 "
                "(add one with optimas_fast.lm.register_price)",
                model,
            )
        return 0.0
    return (prompt_tokens * p[0] + completion_tokens * p[1]) / 1e6


def _check_limit(name: str, v, integer: bool):
    if v is None:
        return None
    if not is_number(v) or (integer and not float(v).is_integer()):
        raise TypeError(f"Budget: {name} must be {'an integer' if integer else 'a number'} or None, got {v!r}")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"Budget: {name} must be finite and >= 0, got {v!r}")
    return int(v) if integer else float(v)


@dataclass(frozen=True)
class Budget:
    """Hard limits on LM spending that a ``UsageLedger`` enforces at run time (reserving each request's worst case
    before it is sent); None means unlimited. See the module docstring for the semantics. A run's configuration is
    ``optimize.BudgetConfig`` (``loop.budget:``), whose LM limits become this (``BudgetConfig.lm_budget()``)."""

    max_calls: int | None = None  # backend requests (cache hits are free)
    max_tokens: int | None = None  # prompt + completion tokens over all requests
    max_usd: float | None = None  # dollars, from the price table

    def __post_init__(self):
        object.__setattr__(self, "max_calls", _check_limit("max_calls", self.max_calls, True))
        object.__setattr__(self, "max_tokens", _check_limit("max_tokens", self.max_tokens, True))
        object.__setattr__(self, "max_usd", _check_limit("max_usd", self.max_usd, False))


_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "calls", "cache_hits", "cost_usd")


def _usage_from_dict(d: dict) -> Usage:
    return Usage(**{k: d.get(k, 0) for k in _USAGE_FIELDS})


class UsageLedger:
    """Thread-safe running totals per component and per model, with an optional ``Budget``."""

    def __init__(self, budget: Budget | None = None):
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"UsageLedger: budget must be a Budget or None, got {type(budget).__name__}")
        self.budget = budget
        self._lock = threading.Lock()
        self._by_component: dict[str, Usage] = {}
        self._by_model: dict[str, Usage] = {}
        self._total = Usage()
        # worst-case usage of requests in flight (reserved, not yet recorded): calls, tokens, usd
        self._reserved = [0, 0, 0.0]

    # --- budget ---------------------------------------------------------------------------------
    def reserve(self, calls: int, tokens: int, usd: float) -> Reservation:
        """Reserves the worst case of a batch of requests or raises ``BudgetExceeded`` (nothing reserved)."""
        with self._lock:
            b = self.budget
            if b is not None:
                t = self._total
                checks = (
                    ("max_calls", b.max_calls, t.calls + self._reserved[0], calls),
                    ("max_tokens", b.max_tokens, t.prompt_tokens + t.completion_tokens + self._reserved[1], tokens),
                    ("max_usd", b.max_usd, t.cost_usd + self._reserved[2], usd),
                )
                for name, maximum, used, req in checks:
                    if maximum is not None and used + req > maximum + 1e-12:
                        raise BudgetExceeded(name, used, req, maximum)
            self._reserved[0] += calls
            self._reserved[1] += tokens
            self._reserved[2] += usd
        return Reservation(self, calls, tokens, usd)

    def _release(self, calls: int, tokens: int, usd: float) -> None:
        with self._lock:
            self._reserved[0] -= calls
            self._reserved[1] -= tokens
            self._reserved[2] -= usd

    # --- recording ------------------------------------------------------------------------------
    def record(self, usage: Usage, *, model: str, component: str | None = None) -> None:
        """Adds ``usage`` under ``component`` (default: the current ``usage_scope``) and ``model``."""
        component = component if component is not None else current_component()
        with self._lock:
            self._by_component.setdefault(component, Usage()).__iadd__(usage)
            self._by_model.setdefault(model, Usage()).__iadd__(usage)
            self._total += usage

    # --- reading --------------------------------------------------------------------------------
    @property
    def total(self) -> Usage:
        with self._lock:
            return Usage(**asdict(self._total))

    def by_component(self) -> dict[str, Usage]:
        with self._lock:
            return {k: Usage(**asdict(v)) for k, v in self._by_component.items()}

    def by_model(self) -> dict[str, Usage]:
        with self._lock:
            return {k: Usage(**asdict(v)) for k, v in self._by_model.items()}

    def reset(self) -> None:
        with self._lock:
            self._by_component.clear()
            self._by_model.clear()
            self._total = Usage()

    def state_dict(self) -> dict:
        """JSON-able totals, for the run checkpoint (so a resumed run keeps counting against its budget)."""
        with self._lock:
            return {
                "total": asdict(self._total),
                "by_component": {k: asdict(v) for k, v in self._by_component.items()},
                "by_model": {k: asdict(v) for k, v in self._by_model.items()},
                "budget": None if self.budget is None else asdict(self.budget),
            }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"total", "by_component", "by_model"} <= set(state):
            raise ValueError(
                "UsageLedger.load_state_dict: state must be a dict from state_dict() "
                "with 'total', 'by_component' and 'by_model'"
            )
        with self._lock:
            self._total = _usage_from_dict(state["total"])
            self._by_component = {k: _usage_from_dict(v) for k, v in state["by_component"].items()}
            self._by_model = {k: _usage_from_dict(v) for k, v in state["by_model"].items()}
            if state.get("budget") is not None:
                self.budget = Budget(**state["budget"])

    def summary(self) -> str:
        """One line per component, for logs and the CLI."""
        rows = [f"{'component':<24}{'calls':>8}{'hits':>8}{'tok in':>10}{'tok out':>10}{'$':>10}"]
        for name, u in sorted(self.by_component().items()) + [("TOTAL", self.total)]:
            rows.append(
                f"{name:<24}{u.calls:>8}{u.cache_hits:>8}{u.prompt_tokens:>10}"
                f"{u.completion_tokens:>10}{u.cost_usd:>10.4f}"
            )
        return "\n".join(rows)


class Reservation:
    """A budget reservation; ``release()`` once the actual usage has been recorded (idempotent)."""

    def __init__(self, ledger: UsageLedger, calls: int, tokens: int, usd: float):
        self._ledger, self._amounts, self._done = ledger, (calls, tokens, usd), False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._ledger._release(*self._amounts)


# --- context: which component, which ledger ---------------------------------------------------
_COMPONENT: contextvars.ContextVar[str] = contextvars.ContextVar("optimas_fast_lm_component", default=UNSCOPED)
_LEDGER: contextvars.ContextVar[UsageLedger | None] = contextvars.ContextVar("optimas_fast_lm_ledger", default=None)
_DEFAULT_LEDGER = UsageLedger()


def current_component() -> str:
    """Name of the component whose LM calls are being recorded (``UNSCOPED`` outside any scope)."""
    return _COMPONENT.get()


@contextlib.contextmanager
def usage_scope(component: str) -> Iterator[str]:
    """Attributes every LM call made in this block (this thread / task) to ``component``."""
    if not isinstance(component, str) or not component:
        raise TypeError(f"usage_scope: component must be a non-empty string, got {component!r}")
    token = _COMPONENT.set(component)
    try:
        yield component
    finally:
        _COMPONENT.reset(token)


def default_ledger() -> UsageLedger:
    return _DEFAULT_LEDGER


def set_default_ledger(ledger: UsageLedger) -> UsageLedger:
    """Replaces the process-wide ledger (seen by every thread); returns the previous one."""
    global _DEFAULT_LEDGER
    if not isinstance(ledger, UsageLedger):
        raise TypeError(f"set_default_ledger: expected a UsageLedger, got {type(ledger).__name__}")
    prev, _DEFAULT_LEDGER = _DEFAULT_LEDGER, ledger
    return prev


def current_ledger() -> UsageLedger:
    return _LEDGER.get() or _DEFAULT_LEDGER


@contextlib.contextmanager
def use_ledger(ledger: UsageLedger) -> Iterator[UsageLedger]:
    """Makes ``ledger`` current for this block (this thread / task and contexts copied from it)."""
    if not isinstance(ledger, UsageLedger):
        raise TypeError(f"use_ledger: expected a UsageLedger, got {type(ledger).__name__}")
    token = _LEDGER.set(ledger)
    try:
        yield ledger
    finally:
        _LEDGER.reset(token)
