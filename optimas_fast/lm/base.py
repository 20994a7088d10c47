"""The one LM interface every backend implements and every component calls.

A prompt is either a plain string or a chat (list of {"role", "content"} dicts). ``generate`` is batched:
it takes a list of prompts and returns, per prompt, a list of ``n`` completions.

``LM.generate`` is a template shared by every backend:

1. validate the arguments (clear TypeError/ValueError naming the argument);
2. expand to one request per (prompt, sample index) and look each up in the cache (memory, then SQLite);
   at temperature 0 all ``n`` samples are the same request (greedy decoding is deterministic), so one
   backend request serves them;
3. reserve the worst case of the missing requests in the ``UsageLedger``'s ``Budget`` (may raise
   ``BudgetExceeded``: nothing sent);
4. ``self._generate(requests, params)`` - the only method a backend must implement - returns a
   ``Completion`` or an ``Exception`` per request;
5. price, cache (successful non-empty completions only) and record usage under the current component;
   then raise the first failure (``on_error="raise"``) or return it as a ``Completion`` with
   ``finish_reason="error"`` and ``error`` set (``on_error="record"``).

A subclass may still override ``generate`` itself (a scripted test LM does); it then bypasses cache and
accounting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optimas_fast._validate import check_int, is_int, is_number
from optimas_fast.lm.cache import LMCache, cache_key
from optimas_fast.lm.errors import LMAuthError, LMError
from optimas_fast.lm.types import Completion, Message, Prompt, Usage
from optimas_fast.lm.usage import UsageLedger, cost_usd, current_ledger

__all__ = ["LM", "Completion", "Usage", "Message", "Prompt", "SamplingParams", "Request", "check_prompts"]

logger = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings shared by one ``generate`` call."""

    temperature: float  # 0 = greedy
    max_tokens: int  # completion tokens at most, per sample
    stop: tuple[str, ...]  # stop strings; the text is cut before the first one
    seed: int | None  # base seed; sample i of a prompt uses sample_seed(seed, i)

    def as_key(self) -> dict:
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stop": sorted(self.stop),
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Request:
    """One backend request: a prompt and which of its ``n`` samples this is."""

    prompt: Prompt  # str, or a list of {"role", "content"} dicts
    sample_index: int  # 0..n-1 (always 0 at temperature 0)
    seed: int | None  # per-sample seed (None: backend's own randomness)


def sample_seed(seed: int | None, sample_index: int) -> int | None:
    """Distinct, reproducible seeds for the samples of one request."""
    if seed is None:
        return None
    return (seed * 1_000_003 + sample_index) % (2**31 - 1)


def check_prompts(prompts: Any) -> list[Prompt]:
    """Validates a batch of prompts; returns them as a list of str / list-of-message-dicts."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of prompts (each a str or a list of messages), got {type(prompts).__name__}; "
            "wrap a single prompt in a list"
        )
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
            continue
        if isinstance(p, bytes) or not isinstance(p, Sequence):
            raise TypeError(f"prompts[{i}] must be a str or a list of messages, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is an empty list of messages")
        msgs = []
        for j, m in enumerate(p):
            if not isinstance(m, dict):
                raise TypeError(f"prompts[{i}][{j}] must be a dict with 'role' and 'content', got {type(m).__name__}")
            if m.get("role") not in _ROLES:
                raise ValueError(f"prompts[{i}][{j}]['role'] must be one of {_ROLES}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise TypeError(f"prompts[{i}][{j}]['content'] must be a str, got {type(m.get('content')).__name__}")
            msgs.append({"role": m["role"], "content": m["content"]})  # drop extra keys: stable cache key
        out.append(msgs)
    return out


def check_sampling(n: Any, temperature: Any, max_tokens: Any, stop: Any, seed: Any) -> SamplingParams:
    check_int(n, "n", min=1)
    if not is_number(temperature):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    check_int(max_tokens, "max_tokens", min=1)
    if stop is None:
        stop_t: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stop_t = (stop,)
    elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
        stop_t = tuple(stop)
    else:
        raise TypeError(f"stop must be None, a str or a list of str, got {stop!r}")
    if any(s == "" for s in stop_t):
        raise ValueError("stop strings must be non-empty")
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return SamplingParams(float(temperature), max_tokens, stop_t, seed)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string (OpenAI semantics: the stop string is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class LM:
    """Base class: backends implement ``_generate``; caching, budgets and accounting wrap it."""

    #: a stable identifier (backend + model) used in cache keys and usage reports
    name: str = "lm"
    #: the model name looked up in the price table (hosted APIs only)
    model: str = ""
    #: True for hosted APIs billed per token; local backends cost $0
    priced: bool = False
    #: the completion cache (None: no caching)
    cache: LMCache | None = None
    #: the ledger usage is recorded in (None: the current ledger, see optimas_fast.lm.usage)
    ledger: UsageLedger | None = None
    #: "raise": a failed request raises after the batch is accounted; "record": returned as an error Completion
    on_error: str = "raise"

    def cache_identity(self) -> dict:
        """What identifies this backend's outputs, for cache keys. Never include secrets."""
        return {"backend": type(self).__name__, "name": self.name}

    def estimate_prompt_tokens(self, prompt: Prompt) -> int:
        """Upper-bound-ish estimate for budget reservations (~4 characters a token, plus chat overhead)."""
        text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
        n_msgs = 0 if isinstance(prompt, str) else len(prompt)
        return len(text) // 4 + 1 + 4 * n_msgs

    def _generate(self, requests: list[Request], params: SamplingParams) -> list[Completion | Exception]:
        raise NotImplementedError(f"{type(self).__name__} must implement _generate (or override generate)")

    # ----------------------------------------------------------------------------------------------
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
        prompts = check_prompts(prompts)
        params = check_sampling(n, temperature, max_tokens, stop, seed)
        if self.on_error not in ("raise", "record"):
            raise ValueError(f"{type(self).__name__}.on_error must be 'raise' or 'record', got {self.on_error!r}")
        if not prompts:
            return []
        identity = self.cache_identity()
        pkey = params.as_key()
        greedy = params.temperature == 0.0

        # one key per (prompt, sample); identical keys (greedy samples, repeated prompts) share one request
        slots: list[list[str]] = []
        requests: dict[str, Request] = {}
        for p in prompts:
            row = []
            for i in range(n):
                idx = 0 if greedy else i
                k = cache_key(identity, p, pkey, idx)
                row.append(k)
                requests.setdefault(k, Request(p, idx, sample_seed(params.seed, idx)))
            slots.append(row)

        found = self.cache.get_many(requests) if self.cache is not None else {}
        todo = [k for k in requests if k not in found]
        fresh: dict[str, Completion | Exception] = {}
        ledger = self.ledger if self.ledger is not None else current_ledger()
        if todo:
            est_in = sum(self.estimate_prompt_tokens(requests[k].prompt) for k in todo)
            est_out = len(todo) * params.max_tokens
            est_usd = cost_usd(self.model, est_in, est_out, priced=self.priced)
            reservation = ledger.reserve(len(todo), est_in + est_out, est_usd)  # may raise BudgetExceeded
            try:
                outs = self._generate([requests[k] for k in todo], params)
                if len(outs) != len(todo):
                    raise LMError(
                        f"{type(self).__name__}._generate returned {len(outs)} results for {len(todo)} requests"
                    )
                fresh = dict(zip(todo, outs))
                spent = Usage()
                to_cache = {}
                for k, c in fresh.items():
                    if isinstance(c, Exception):
                        continue
                    c.usage.calls = 1
                    c.usage.cost_usd = cost_usd(
                        self.model, c.usage.prompt_tokens, c.usage.completion_tokens, priced=self.priced
                    )
                    spent += c.usage
                    if c.text and c.finish_reason != "error":  # never cache failures or empty texts
                        to_cache[k] = {
                            "text": c.text,
                            "finish_reason": c.finish_reason,
                            "prompt_tokens": c.usage.prompt_tokens,
                            "completion_tokens": c.usage.completion_tokens,
                        }
                ledger.record(spent, model=self.name)
                if self.cache is not None and to_cache:
                    self.cache.put_many(to_cache)
            finally:
                reservation.release()

        hits = 0
        used: set[str] = set()
        result: list[list[Completion]] = []
        first_error: Exception | None = None
        for row in slots:
            out_row = []
            for k in row:
                if k in fresh and k not in used:
                    used.add(k)
                    c = fresh[k]
                    if isinstance(c, Exception):
                        first_error = first_error or c
                        c = Completion("", Usage(), finish_reason="error", error=f"{type(c).__name__}: {c}")
                    out_row.append(c)
                    continue
                v = found.get(k)
                if v is None:  # a duplicate of a request made in this call
                    src = fresh[k]
                    if isinstance(src, Exception):
                        out_row.append(
                            Completion("", Usage(), finish_reason="error", error=f"{type(src).__name__}: {src}")
                        )
                        continue
                    v = {"text": src.text, "finish_reason": src.finish_reason}
                hits += 1
                out_row.append(
                    Completion(
                        v["text"], Usage(cache_hits=1), finish_reason=v.get("finish_reason", "stop"), cached=True
                    )
                )
            result.append(out_row)
        if hits:
            ledger.record(Usage(cache_hits=hits), model=self.name)
        # a refused key is a configuration error, never a per-example failure: always raised
        if first_error is not None and (self.on_error == "raise" or isinstance(first_error, LMAuthError)):
            raise first_error
        return result

    def __call__(self, prompt: Prompt, **kwargs) -> str:
        """Convenience: one prompt, one completion's text."""
        return self.generate([prompt], n=1, **kwargs)[0][0].text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
