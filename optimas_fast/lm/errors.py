"""Errors of the LM layer.

Every error raised on purpose by ``optimas_fast.lm`` derives from ``LMError`` so that a caller (the
System's per-example error accounting, the optimization loop) can catch the whole family at once, and
tell a *budget stop* (``BudgetExceeded``: stop cleanly, save state) from a *failed request*.
"""

from __future__ import annotations

__all__ = [
    "LMError",
    "LMAuthError",
    "LMRequestError",
    "LMServerError",
    "LMResponseError",
    "BudgetExceeded",
    "MissingDependencyError",
]


class LMError(RuntimeError):
    """Base class of every error the LM layer raises on purpose."""


class LMAuthError(LMError):
    """The server refused our credentials (HTTP 401/403). Never retried: retrying cannot fix a key."""


class LMRequestError(LMError):
    """The server rejected the request itself (HTTP 4xx other than 401/403/408/429). Never retried."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LMServerError(LMError):
    """Transient failures (429, 5xx, timeouts, connection errors) persisted through every retry."""


class LMResponseError(LMError):
    """The server answered 200 but the body is not a usable completion (not JSON, no choices, ...)."""


class BudgetExceeded(LMError):
    """The next backend request would exceed the run's ``Budget``; nothing was sent.

    ``limit`` names the exhausted limit ("max_calls", "max_tokens" or "max_usd"); ``used`` and
    ``requested`` give the amounts so that the loop can log why it stopped.
    """

    def __init__(self, limit: str, used: float, requested: float, maximum: float):
        super().__init__(
            f"LM budget exhausted: {limit}={maximum:g} would be exceeded "
            f"(used {used:g}, this call needs up to {requested:g})"
        )
        self.limit = limit
        self.used = used
        self.requested = requested
        self.maximum = maximum


class MissingDependencyError(LMError, ImportError):
    """An optional backend's package is not installed; the message says which extra to install."""
