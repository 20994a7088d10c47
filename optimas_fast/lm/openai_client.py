"""A client for any OpenAI-compatible server (OpenAI, vLLM, llama.cpp server, ...), standard library only.

- Routes: ``mode="chat"`` -> ``POST {base_url}/chat/completions``; ``mode="completions"`` ->
  ``POST {base_url}/completions`` (plain-string prompts only).
- One HTTP request per sample (``n`` is never sent): every server supports it, each sample gets its own
  seed and cache entry, and a failed sample is retried alone.
- Concurrency: one thread pool of ``max_concurrency`` workers per client, shared by every thread that
  calls ``generate``, so the server never sees more than ``max_concurrency`` requests from this client.
- Retries with exponential backoff and equal jitter (``base * 2**attempt``, capped, half fixed, half
  random; ``Retry-After`` honoured up to the cap) on 408/429/5xx, timeouts and connection errors.
  401/403 raise ``LMAuthError`` naming the environment variable; other 4xx raise ``LMRequestError``
  with the server's message; neither is retried.
- The API key is read from ``api_key_env`` when the client is built; it is sent only in the
  ``Authorization`` header and never enters cache keys, reprs or logs. No key is fine for local servers.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from optimas_fast._validate import check_int, check_number
from optimas_fast.lm.base import LM, Request, SamplingParams, cut_at_stop
from optimas_fast.lm.cache import LMCache, resolve_cache
from optimas_fast.lm.errors import LMAuthError, LMRequestError, LMResponseError, LMServerError
from optimas_fast.lm.types import Completion, Usage
from optimas_fast.lm.usage import UsageLedger

__all__ = ["OpenAIClient"]

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
_NET_ERRORS = (TimeoutError, socket.timeout, ConnectionError, urllib.error.URLError, http.client.HTTPException, OSError)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIClient(LM):
    """``OpenAIClient(base_url, model)``: see the module docstring for behaviour."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",  # environment variable holding the key (may be unset locally)
        api_key: str | None = None,  # explicit key; overrides the environment variable
        max_concurrency: int = 8,  # requests in flight at once, across all calling threads
        timeout: float = 60.0,  # seconds per HTTP attempt (connect + read)
        max_retries: int = 5,  # extra attempts after the first, for retryable failures
        backoff_base: float = 0.5,  # seconds; attempt k waits ~ base * 2**k (equal jitter)
        backoff_max: float = 30.0,  # seconds; cap on one wait (Retry-After included)
        mode: str = "chat",  # "chat" (/chat/completions) or "completions" (/completions)
        extra_body: dict | None = None,  # extra JSON fields sent with every request (e.g. top_p); part of the cache key
        cache: bool | str | os.PathLike | LMCache | None = True,  # see resolve_cache
        ledger: UsageLedger | None = None,  # None: the current ledger
        on_error: str = "raise",  # "raise" or "record" (failed requests come back as error Completions)
        priced: bool | None = None,  # bill with the price table; None: yes unless the server is on loopback
    ):
        if not isinstance(base_url, str) or not base_url:
            raise TypeError(f"OpenAIClient: base_url must be a non-empty str, got {base_url!r}")
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"OpenAIClient: base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}"
            )
        if not isinstance(model, str) or not model:
            raise TypeError(f"OpenAIClient: model must be a non-empty str, got {model!r}")
        check_int(max_concurrency, "OpenAIClient: max_concurrency", min=1)
        check_int(max_retries, "OpenAIClient: max_retries", min=0)
        for name, v in (("timeout", timeout), ("backoff_base", backoff_base), ("backoff_max", backoff_max)):
            check_number(v, f"OpenAIClient: {name}", gt=0)
        if mode not in ("chat", "completions"):
            raise ValueError(f"OpenAIClient: mode must be 'chat' or 'completions', got {mode!r}")
        if extra_body is not None and not isinstance(extra_body, dict):
            raise TypeError(f"OpenAIClient: extra_body must be a dict or None, got {type(extra_body).__name__}")
        if on_error not in ("raise", "record"):
            raise ValueError(f"OpenAIClient: on_error must be 'raise' or 'record', got {on_error!r}")
        if not isinstance(api_key_env, str) or not api_key_env:
            raise TypeError(f"OpenAIClient: api_key_env must be a non-empty str, got {api_key_env!r}")

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"openai:{model}"
        self.api_key_env = api_key_env
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.mode = mode
        self.extra_body = dict(extra_body or {})
        self.cache = resolve_cache(cache)
        self.ledger = ledger
        self.on_error = on_error
        host = parsed.hostname or ""
        self.priced = (not _is_loopback(host)) if priced is None else bool(priced)
        # loopback servers never go through a proxy; others follow the usual *_proxy variables
        self._opener = (
            urllib.request.build_opener(urllib.request.ProxyHandler({}))
            if _is_loopback(host)
            else urllib.request.build_opener()
        )
        self._rng = random.Random()
        self._sleep = time.sleep  # tests may replace it
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # --- LM hooks -------------------------------------------------------------------------------
    def cache_identity(self) -> dict:
        # the server is part of the identity: local servers often report generic model names ("default",
        # "local-model"), so two servers would otherwise share entries for different weights. Only scheme,
        # host, port and path are kept: user:password@ and query strings can carry credentials. The route
        # matters too (chat and completions prompt differently).
        u = urllib.parse.urlparse(self.base_url)
        host = u.hostname or ""
        server = f"{u.scheme}://{host}{f':{u.port}' if u.port else ''}{u.path.rstrip('/')}"
        return {"backend": "openai", "server": server, "model": self.model, "mode": self.mode, "extra": self.extra_body}

    def _generate(self, requests: list[Request], params: SamplingParams) -> list[Completion | Exception]:
        if self.mode == "completions":
            for r in requests:
                if not isinstance(r.prompt, str):
                    raise ValueError(
                        "OpenAIClient(mode='completions') needs plain-string prompts, "
                        "got a list of messages; use mode='chat'"
                    )
        pool = self._executor()
        futures = [pool.submit(self._request_one, r, params) for r in requests]
        out: list[Completion | Exception] = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # returned, not raised: the batch's other results still get cached
                out.append(e)
        return out

    # --- HTTP -----------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="optimas-lm-http")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _payload(self, r: Request, params: SamplingParams) -> dict:
        body: dict[str, Any] = {"model": self.model, "temperature": params.temperature, "max_tokens": params.max_tokens}
        if self.mode == "chat":
            body["messages"] = [{"role": "user", "content": r.prompt}] if isinstance(r.prompt, str) else r.prompt
        else:
            body["prompt"] = r.prompt
        if params.stop:
            body["stop"] = list(params.stop)
        if r.seed is not None:
            body["seed"] = r.seed
        body.update(self.extra_body)
        return body

    def _post(self, url: str, data: bytes) -> tuple[int, dict, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:  # a non-2xx answer: still an answer, with a body
            try:
                body = e.read()
            except Exception:
                body = b""
            return e.code, dict(e.headers or {}), body

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.backoff_max, self.backoff_base * (2**attempt))
        delay = cap / 2 + self._rng.uniform(0, cap / 2)  # equal jitter: spreads a thundering herd
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def _request_one(self, r: Request, params: SamplingParams) -> Completion:
        route = "/chat/completions" if self.mode == "chat" else "/completions"
        url = self.base_url + route
        data = json.dumps(self._payload(r, params)).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                status, headers, body = self._post(url, data)
            except _NET_ERRORS as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            else:
                if 200 <= status < 300:
                    return self._parse(body, params, url)
                snippet = body[:500].decode("utf-8", "replace").strip()
                if status in (401, 403):
                    hint = (
                        f"check the key in ${self.api_key_env}"
                        if self._api_key
                        else f"no API key was sent: set ${self.api_key_env}"
                    )
                    raise LMAuthError(f"{url} refused the request (HTTP {status}): {hint}. Server said: {snippet}")
                if status in _RETRY_STATUS or status >= 500:
                    last = f"HTTP {status}: {snippet}"
                    try:
                        retry_after = float(headers.get("Retry-After") or headers.get("retry-after") or "x")
                    except ValueError:
                        retry_after = None
                else:
                    raise LMRequestError(
                        f"{url} rejected the request (HTTP {status}, model {self.model!r}): {snippet}", status=status
                    )
            if attempt < self.max_retries:
                delay = self._backoff(attempt, retry_after)
                logger.info(
                    "LM request to %s failed (%s); retry %d/%d in %.2fs",
                    url,
                    last,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                self._sleep(delay)
        raise LMServerError(f"{url} failed after {self.max_retries + 1} attempts; last error: {last}")

    def _parse(self, body: bytes, params: SamplingParams, url: str) -> Completion:
        if not body or not body.strip():
            raise LMResponseError(f"{url} returned an empty body (HTTP 200)")
        try:
            obj = json.loads(body)
        except ValueError:
            raise LMResponseError(
                f"{url} returned a body that is not JSON: {body[:200].decode('utf-8', 'replace')!r}"
            ) from None
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LMResponseError(f"{url} returned JSON without choices: {str(obj)[:200]}")
        ch = choices[0]
        if self.mode == "chat":
            msg = ch.get("message")
            text = msg.get("content") if isinstance(msg, dict) else None
        else:
            text = ch.get("text")
        if text is None:
            text = ""  # e.g. a refusal or a tool call: an empty completion, recorded as such
        if not isinstance(text, str):
            raise LMResponseError(f"{url} returned a non-string completion: {str(text)[:200]}")
        text, cut = cut_at_stop(text, params.stop)  # for servers that ignore `stop`
        finish = "stop" if cut else (ch.get("finish_reason") or "stop")
        u = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        usage = Usage(
            prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0)
        )
        if not text:
            logger.warning("%s returned an empty completion (finish_reason=%s)", url, finish)
        return Completion(text, usage, finish_reason=str(finish))

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r}, mode={self.mode!r})"
