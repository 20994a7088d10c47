"""llama.cpp: the in-process engine (LlamaCppLM) and a real OpenAI-compatible server (llama_cpp.server, started by the
session fixture ``llama_server``) driven by OpenAIClient, directly and through a fault-injecting loopback proxy."""

import http.server
import json
import random
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from optimas_fast.lm import LMCache, OpenAIClient, UsageLedger, make_lm
from optimas_fast.lm.errors import LMServerError
from optimas_fast.lm.llamacpp import LlamaCppLM

QUESTIONS = [
    "What color is the sky?",
    "Name a fruit.",
    "What is two plus two?",
    "Name a planet.",
    "What do bees make?",
    "Name an ocean.",
    "What is ice made of?",
    "Name a metal.",
]


# ------------------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def engine():
    return LlamaCppLM(cache=None, ledger=UsageLedger())


def test_greedy_is_deterministic_and_counted(engine):
    engine.ledger = UsageLedger()
    a = engine.generate(QUESTIONS[:3], max_tokens=12)
    b = engine.generate(QUESTIONS[:3], max_tokens=12)
    assert [r[0].text for r in a] == [r[0].text for r in b]
    assert all(r[0].text for r in a)
    total = engine.ledger.total
    assert total.calls == 6 and total.completion_tokens == sum(r[0].usage.completion_tokens for r in a + b)
    assert total.prompt_tokens > 0 and total.cost_usd == 0.0


def test_seeded_sampling_is_reproducible_and_samples_differ(engine):
    a = engine.generate(["Write a line about rivers."], n=3, temperature=1.0, seed=11, max_tokens=12)[0]
    b = engine.generate(["Write a line about rivers."], n=3, temperature=1.0, seed=11, max_tokens=12)[0]
    assert [c.text for c in a] == [c.text for c in b]
    assert len({c.text for c in a}) > 1  # sample i uses its own seed


def test_stop_strings_and_length_finish(engine):
    out = engine.generate(["Count from one to ten, separated by commas."], max_tokens=40, stop=[","])[0][0]
    assert "," not in out.text and out.finish_reason == "stop"
    out = engine.generate(["Write a long story about a dragon."], max_tokens=3)[0][0]
    assert out.finish_reason == "length" and out.usage.completion_tokens == 3


def test_cache_and_make_lm(tmp_path):
    lm = make_lm({"backend": "llamacpp", "cache": str(tmp_path / "c.sqlite"), "ledger": UsageLedger()})
    assert isinstance(lm, LlamaCppLM) and make_lm("llamacpp", cache=str(tmp_path / "c.sqlite"), ledger=lm.ledger) is lm
    first = lm("Name a color.", max_tokens=8)
    calls = lm.ledger.total.calls
    assert lm("Name a color.", max_tokens=8) == first and lm.ledger.total.calls == calls  # served from the cache


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="gguf_path"):
        LlamaCppLM(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="n_ctx"):
        LlamaCppLM(n_ctx=4)
    with pytest.raises(ValueError, match="cannot parse spec"):
        make_lm("llamacpp:")


def test_prompt_longer_than_context_fails_alone():
    lm = LlamaCppLM(n_ctx=64, cache=None, ledger=UsageLedger(), on_error="record")
    out = lm.generate(["word " * 400, "Say hi."], max_tokens=4)
    assert out[0][0].finish_reason == "error" and out[0][0].error
    assert out[1][0].finish_reason != "error" and out[1][0].text


# ------------------------------------------------------------------------------------------ real server
def _client(url, **kw):
    kw.setdefault("cache", None)
    kw.setdefault("ledger", UsageLedger())
    kw.setdefault("timeout", 60.0)
    return OpenAIClient(url, "smollm2", **kw)


def test_server_chat_and_completions_routes_with_server_usage(llama_server):
    chat = _client(llama_server)
    out = chat.generate([QUESTIONS[0], [{"role": "user", "content": QUESTIONS[1]}]], max_tokens=10)
    assert all(r[0].text for r in out)
    # usage comes from the server's `usage` field: the ledger holds exactly what the server reported
    assert chat.ledger.total.calls == 2
    assert chat.ledger.total.completion_tokens == sum(r[0].usage.completion_tokens for r in out) > 0
    assert all(0 < r[0].usage.completion_tokens <= 10 for r in out)
    comp = _client(llama_server, mode="completions")
    text = comp.generate(["The capital of France is"], max_tokens=6)[0][0]
    assert text.text and text.usage.prompt_tokens > 0


def test_server_cache_identity_is_per_server(llama_server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    a = _client(llama_server, cache=LMCache(path))
    a.generate([QUESTIONS[2]], max_tokens=6)
    other = llama_server.replace("127.0.0.1", "localhost")  # the same weights behind another address
    b = _client(other, cache=LMCache(path))
    b.generate([QUESTIONS[2]], max_tokens=6)
    assert b.ledger.total.calls == 1 and b.ledger.total.cache_hits == 0  # another server: no shared entries
    c = _client(llama_server, cache=LMCache(path))
    c.generate([QUESTIONS[2]], max_tokens=6)
    assert c.ledger.total.calls == 0 and c.ledger.total.cache_hits == 1


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream`` that fails a share of requests: 429 (with Retry-After),
    500/503, a hang past the client's timeout, or a dropped connection (closed without a reply). Counts every
    request it forwarded and the most requests in flight at once."""

    def __init__(self, upstream: str, rate: float, seed: int, hang_s: float):
        self.upstream = upstream.rstrip("/")
        self.rate, self.hang_s = rate, hang_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: list[str] = []
        self.forwarded = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.server: http.server.ThreadingHTTPServer | None = None

    def _pick(self) -> str | None:
        with self.lock:
            if self.rng.random() >= self.rate:
                return None
            f = self.rng.choice(["429", "500", "503", "hang", "drop"])
            self.faults.append(f)
            return f

    def __enter__(self):
        proxy = self
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    fault = proxy._pick()
                    if fault in ("429", "500", "503"):
                        payload = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
                        self.send_response(int(fault))
                        if fault == "429":
                            self.send_header("Retry-After", "0")
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    if fault == "hang":
                        time.sleep(proxy.hang_s)
                        self.close_connection = True
                        return
                    if fault == "drop":
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    req = urllib.request.Request(
                        proxy.upstream + self.path.removeprefix("/v1"),
                        data=body,
                        headers={"Content-Type": "application/json"},
                    )
                    with opener.open(req, timeout=120) as r:
                        data = r.read()
                    with proxy.lock:
                        proxy.forwarded += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this attempt (its timeout): it retries on a new connection
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_server_retries_behind_faults_lose_and_duplicate_nothing(llama_server, seed):
    direct = _client(llama_server).generate(QUESTIONS, max_tokens=8)  # the right answers (greedy)
    # the client's timeout must sit well above a real reply's time (the server decodes one request at a time) and
    # below the injected hang, so that only the hang times out
    with FaultProxy(llama_server, rate=0.3, seed=seed, hang_s=9.0) as proxy:
        lm = _client(proxy.url, timeout=8.0, max_retries=12, backoff_base=0.01, backoff_max=0.05, max_concurrency=2)
        got = lm.generate(QUESTIONS, max_tokens=8)
    assert [r[0].text for r in got] == [r[0].text for r in direct]  # every request ends with the right completion
    assert lm.ledger.total.calls == len(QUESTIONS)  # none lost, none counted twice
    assert lm.ledger.total.completion_tokens == sum(r[0].usage.completion_tokens for r in direct)
    assert proxy.forwarded >= len(QUESTIONS)


def test_server_concurrency_limit_holds(llama_server):
    with FaultProxy(llama_server, rate=0.0, seed=0, hang_s=0) as proxy:
        lm = _client(proxy.url, max_concurrency=2)
        with ThreadPoolExecutor(4) as ex:  # four threads, each with its own batch: the limit is across threads
            list(ex.map(lambda q: lm.generate([q + " Answer briefly."], max_tokens=4), QUESTIONS[:6]))
    assert 1 <= proxy.max_in_flight <= 2


def test_server_errors_exhausted_are_clear(llama_server):
    with FaultProxy(llama_server, rate=1.0, seed=1, hang_s=0.5) as proxy:
        proxy._pick = lambda: "503"  # every attempt fails the same way
        lm = _client(proxy.url, max_retries=2, backoff_base=0.01, backoff_max=0.02, timeout=1.0)
        with pytest.raises(LMServerError, match="503"):
            lm.generate(["hi"], max_tokens=2)


def test_model_params_are_set_for_the_load_and_restored(engine, monkeypatch):
    """repack_weights=False loads without llama.cpp's extra buffer types (its AMX path segfaults on a VM that
    advertises AMX); the patched parameter function is the original again after construction, even when the
    load fails."""
    import llama_cpp

    from optimas_fast.lm import llamacpp as mod

    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params
    assert engine.repack_weights is False and default().use_extra_bufts is True  # llama.cpp's own default
    seen = []
    with mod._model_params(llama_cpp, use_extra_bufts=False):
        seen.append(low.llama_model_default_params().use_extra_bufts)
    assert seen == [False] and low.llama_model_default_params is default
    with pytest.raises(RuntimeError, match="boom"):
        with mod._model_params(llama_cpp, use_extra_bufts=False):
            raise RuntimeError("boom")
    assert low.llama_model_default_params is default
