"""Test helpers: a scripted OpenAI-compatible HTTP server on 127.0.0.1.

    with FakeOpenAIServer() as srv:
        srv.inject(429, 500, "timeout")     # the next three requests fail like that, in order
        lm = OpenAIClient(srv.url, "fake-model", cache=False)
        lm.generate(["hi"])

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``. A reply is ``reply_fn(prompt_text,
body)`` (default: a deterministic echo that includes the seed and temperature, so that distinct samples
differ). The server counts requests, records their bodies and headers, and tracks the largest number of
requests it handled at once (``max_concurrent``); ``delay`` makes every request take that long.
Faults for ``inject``: an int HTTP status (with a JSON error body), ``"timeout"`` (sleeps
``timeout_sleep`` seconds before answering), ``"non_json"``, ``"empty"`` (200 with no body),
``"no_choices"``, ``"null_content"``, ``"drop"`` (closes the connection without answering).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FakeOpenAIServer"]


def _default_reply(prompt_text: str, body: dict) -> str:
    return f"echo[{prompt_text}] t={body.get('temperature')} seed={body.get('seed')}"


class FakeOpenAIServer:
    def __init__(
        self,
        reply_fn: Callable[[str, dict], str] | None = None,
        *,
        delay: float = 0.0,
        require_key: str | None = None,
        timeout_sleep: float = 1.0,
    ):
        self.reply_fn = reply_fn or _default_reply
        self.delay = delay  # seconds every request takes (to observe concurrency)
        self.require_key = require_key  # when set, other keys get 401
        self.timeout_sleep = timeout_sleep  # how long an injected "timeout" stalls
        self.requests: list[dict] = []  # JSON bodies received, in arrival order
        self.headers: list[dict] = []  # their headers
        self.max_concurrent = 0
        self._concurrent = 0
        self._faults: deque = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control --------------------------------------------------------------------------------
    def inject(self, *faults) -> None:
        """Queues faults; each of the next requests consumes one (in order) instead of a normal reply."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _done(self):
                """This request stops counting as in flight (once): before its response is written, because
                the client may send its next request the moment it has read this one (counting until after
                the write made a client limited to 1 look like 2 under load)."""
                if getattr(self, "_in_flight", False):
                    self._in_flight = False
                    with outer._lock:
                        outer._concurrent -= 1

            def _send(self, status: int, payload: bytes, ctype: str = "application/json"):
                self._done()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (an injected timeout): nothing to answer

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with outer._lock:
                    outer._concurrent += 1
                    outer.max_concurrent = max(outer.max_concurrent, outer._concurrent)
                    fault = outer._faults.popleft() if outer._faults else None
                self._in_flight = True
                try:
                    self._handle(raw, fault)
                finally:
                    self._done()  # paths that answer nothing (a dropped connection)

            def _handle(self, raw: bytes, fault):
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self._send(400, b'{"error": {"message": "request body is not JSON"}}')
                with outer._lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.require_key is not None and self.headers.get("Authorization") != f"Bearer {outer.require_key}":
                    return self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
                route = self.path.rstrip("/")
                if route not in ("/v1/chat/completions", "/v1/completions"):
                    return self._send(404, b'{"error": {"message": "no such route"}}')
                if isinstance(fault, int):
                    msg = json.dumps({"error": {"message": f"injected HTTP {fault}"}}).encode()
                    return self._send(fault, msg)
                if fault == "timeout":
                    time.sleep(outer.timeout_sleep)
                elif fault == "drop":
                    self.close_connection = True
                    self._done()
                    self.connection.shutdown(2)
                    return None
                elif fault == "non_json":
                    return self._send(200, b"<html>upstream error</html>", "text/html")
                elif fault == "empty":
                    return self._send(200, b"")
                elif fault == "no_choices":
                    return self._send(200, b'{"choices": []}')
                if route == "/v1/chat/completions":
                    msgs = body.get("messages") or []
                    prompt_text = msgs[-1]["content"] if msgs else ""
                else:
                    prompt_text = body.get("prompt", "")
                text = None if fault == "null_content" else outer.reply_fn(prompt_text, body)
                choice = (
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    if route == "/v1/chat/completions"
                    else {"index": 0, "text": text, "finish_reason": "stop"}
                )
                usage = {
                    "prompt_tokens": len(str(prompt_text).split()) + 3,
                    "completion_tokens": len((text or "").split()),
                }
                out = {
                    "id": "fake",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [choice],
                    "usage": usage,
                }
                return self._send(200, json.dumps(out).encode())

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
