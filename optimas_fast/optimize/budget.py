"""Metric-call budgets: the unit in which optimizers are compared at equal cost.

A **metric call** is one run of the system (or of the part of it downstream of a component) on one example,
scored by the metric: GEPA's ``max_metric_calls``. Training rollouts, candidate evaluations and validation
passes all end in one; that is what makes it a fair unit across methods that spend their effort differently
(Optimas on preference rollouts, GEPA on minibatch evaluations, random search on validation passes).

    counter = MetricCounter(limit=200)
    system.metric = counter.wrap(system.metric)     # every scored run now goes through the counter
    ...                                             # call 201 raises MetricBudgetExceeded before the metric runs
    system.metric = unwrap(system.metric)           # e.g. before a test evaluation, which does not count

The counter charges *before* calling the metric, so it can never be exceeded: the call that would go over
raises ``MetricBudgetExceeded`` (a ``BudgetExceeded``, so every layer that already stops cleanly on an LM
budget - ``System.evaluate``, preference collection, the Optimas loop - stops on this one the same way).
A run that fails before its metric (a component raised) scores 0 without a metric call and is not charged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from optimas_fast._validate import check_int
from optimas_fast.lm.errors import BudgetExceeded, LMError

__all__ = ["MetricBudgetExceeded", "MetricCounter", "CountedMetric", "unwrap", "attach", "detach"]

# the attributes a System calls its metric through: ``metric`` (every System) and ``dspy_metric`` (a DSPy
# ProgramSystem scores its runs with the program's own metric(example, prediction, trace))
_METRIC_ATTRS = ("metric", "dspy_metric")


class MetricBudgetExceeded(BudgetExceeded):
    """The next metric call would exceed ``max_metric_calls``; the metric was not called."""

    def __init__(self, maximum: int, used: int):
        LMError.__init__(self, f"metric-call budget exhausted: max_metric_calls={maximum} reached (used {used})")
        self.limit = "max_metric_calls"
        self.used = used
        self.requested = 1
        self.maximum = maximum


class MetricCounter:
    """Thread-safe count of metric calls with an optional hard limit (None: count only): a runtime tracker. The
    limit a run is configured with is ``BudgetConfig.max_metric_calls`` (``loop.budget:``); a comparison harness
    puts its own counter under the loop's."""

    def __init__(self, limit: int | None = None, used: int = 0):
        check_int(limit, "max_metric_calls", min=0, allow_none=True)
        check_int(used, "MetricCounter: used", min=0)
        self.limit = limit
        self._used = used
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @used.setter
    def used(self, value: int) -> None:
        check_int(value, "MetricCounter: used", min=0)
        with self._lock:
            self._used = value

    @property
    def remaining(self) -> int | None:
        """Calls left under the limit (None when unlimited)."""
        with self._lock:
            return None if self.limit is None else max(0, self.limit - self._used)

    def charge(self, n: int = 1) -> None:
        """Counts ``n`` calls, or raises ``MetricBudgetExceeded`` (counting nothing) if that would exceed the limit."""
        with self._lock:
            if self.limit is not None and self._used + n > self.limit:
                raise MetricBudgetExceeded(self.limit, self._used)
            self._used += n

    def wrap(self, metric: Callable[..., Any]) -> CountedMetric:
        """``metric`` behind this counter (any signature: plain ``metric(example, prediction)`` or DSPy's
        ``metric(example, prediction, trace)``)."""
        if not callable(metric):
            raise TypeError(f"MetricCounter.wrap(metric): expected a callable, got {type(metric).__name__}")
        return CountedMetric(metric, self)


class CountedMetric:
    """A metric that charges its counter before each call; ``inner`` is the wrapped metric."""

    def __init__(self, inner: Callable[..., Any], counter: MetricCounter):
        self.inner = inner
        self.counter = counter

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.counter.charge()
        return self.inner(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CountedMetric({self.inner!r}, used={self.counter.used}, limit={self.counter.limit})"


def unwrap(metric: Callable[..., Any]) -> Callable[..., Any]:
    """The user's metric under any number of counters."""
    while isinstance(metric, CountedMetric):
        metric = metric.inner
    return metric


def attach(system: Any, counter: MetricCounter) -> dict[str, Any]:
    """Puts ``counter`` in front of every metric ``system`` scores runs with (in place). Returns what was there,
    for ``detach`` (counters stack: the loop's own budget sits on top of a comparison harness's counter)."""
    previous = {}
    for name in _METRIC_ATTRS:
        fn = getattr(system, name, None)
        if callable(fn):
            previous[name] = fn
            setattr(system, name, counter.wrap(fn))
    return previous


def detach(system: Any, previous: dict[str, Any] | None = None) -> None:
    """Puts back the metrics ``attach`` returned (``previous``); without it, removes every counter."""
    for name in _METRIC_ATTRS:
        fn = getattr(system, name, None)
        if previous is not None and name in previous:
            setattr(system, name, previous[name])
        elif previous is None and isinstance(fn, CountedMetric):
            setattr(system, name, unwrap(fn))
