"""OpenAIClient against a real HTTP server on 127.0.0.1 (scripted replies and injected faults)."""

import json
import random
import sqlite3
import threading

import pytest

from optimas_fast.lm import (
    LMAuthError,
    LMRequestError,
    LMResponseError,
    LMServerError,
    OpenAIClient,
    UsageLedger,
    make_lm,
)
from optimas_fast.lm.testing import FakeOpenAIServer


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def client(srv, **kw):
    kw.setdefault("cache", ":memory:")
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 0.05)
    kw.setdefault("timeout", 2.0)
    kw.setdefault("ledger", UsageLedger())
    return OpenAIClient(srv.url, "fake-model", **kw)


def prompts(seed, k):
    rng = random.Random(seed)
    return [f"question {rng.randrange(10**6)} #{i}" for i in range(k)]


def test_chat_and_completions_routes(server, seed):
    ps = prompts(seed, 3)
    chat = client(server)
    out = chat.generate(ps + [[{"role": "system", "content": "be brief"}, {"role": "user", "content": ps[0]}]])
    assert [o[0].text for o in out[:3]] == [f"echo[{p}] t=0.0 seed=None" for p in ps]
    assert out[3][0].text.startswith(f"echo[{ps[0]}]")
    assert any(r["messages"][0] == {"role": "system", "content": "be brief"} for r in server.requests)
    assert all(o[0].usage.calls == 1 and o[0].usage.prompt_tokens > 0 for o in out)
    comp = client(server, mode="completions")
    out = comp.generate(ps[:1], max_tokens=7)
    assert out[0][0].text == f"echo[{ps[0]}] t=0.0 seed=None"
    assert server.requests[-1]["prompt"] == ps[0] and server.requests[-1]["max_tokens"] == 7
    with pytest.raises(ValueError, match="plain-string prompts"):
        comp.generate([[{"role": "user", "content": "x"}]])


def test_stop_strings_are_applied_client_side(server):
    out = client(server).generate(["abc"], stop=["]"])
    assert out[0][0].text == "echo[abc" and out[0][0].finish_reason == "stop"
    assert server.requests[-1]["stop"] == ["]"]


@pytest.mark.parametrize("faults", [(429,), (500, 502), ("timeout",), ("drop", 503), (429, "timeout", 500)])
def test_retries_recover(faults, seed):
    with FakeOpenAIServer(timeout_sleep=0.6) as srv:
        srv.inject(*faults)
        lm = client(srv, timeout=0.3, max_retries=4)
        p = prompts(seed, 1)
        out = lm.generate(p)
        assert out[0][0].text.startswith(f"echo[{p[0]}]")
        assert srv.calls == len(faults) + 1  # every fault was retried, then one success


def test_retries_exhausted_raise_server_error(server):
    server.inject(500, 500, 500)
    lm = client(server, max_retries=2)
    with pytest.raises(LMServerError, match="after 3 attempts.*HTTP 500"):
        lm.generate(["x"])
    assert server.calls == 3


def test_backoff_grows_and_honours_retry_after(server):
    lm = client(server, backoff_base=0.1, backoff_max=10.0)
    waits = [lm._backoff(k, None) for k in range(5)]
    for k, w in enumerate(waits):
        cap = min(10.0, 0.1 * 2**k)
        assert cap / 2 <= w <= cap  # equal jitter: half fixed, half random
    assert lm._backoff(0, 3.0) >= 3.0 and lm._backoff(0, 99.0) <= 10.0
    slept = []
    lm._sleep = slept.append
    server.inject(429, 429)
    lm.generate(["y"])
    assert len(slept) == 2


def test_auth_error_names_env_var_and_is_not_retried(monkeypatch):
    monkeypatch.setenv("MY_TEST_KEY", "wrong-key")
    with FakeOpenAIServer(require_key="right-key") as srv:
        lm = client(srv, api_key_env="MY_TEST_KEY", on_error="record")  # auth errors raise even when recording
        with pytest.raises(LMAuthError, match=r"MY_TEST_KEY"):
            lm.generate(["x"])
        assert srv.calls == 1
        monkeypatch.delenv("MY_TEST_KEY")
        with pytest.raises(LMAuthError, match=r"no API key was sent: set \$MY_TEST_KEY"):
            client(srv, api_key_env="MY_TEST_KEY").generate(["x"])
        monkeypatch.setenv("MY_TEST_KEY", "right-key")
        assert client(srv, api_key_env="MY_TEST_KEY").generate(["x"])[0][0].text.startswith("echo[x]")
        assert srv.headers[-1]["Authorization"] == "Bearer right-key"


def test_bad_request_is_clear_and_not_retried(server):
    server.inject(400)
    with pytest.raises(LMRequestError, match=r"HTTP 400.*fake-model.*injected HTTP 400") as ei:
        client(server).generate(["x"])
    assert ei.value.status == 400 and server.calls == 1


@pytest.mark.parametrize(
    "fault,match", [("non_json", "not JSON"), ("empty", "empty body"), ("no_choices", "without choices")]
)
def test_unusable_replies_raise_or_are_recorded(server, fault, match):
    server.inject(fault)
    with pytest.raises(LMResponseError, match=match):
        client(server).generate(["x"])
    server.inject(fault)
    lm = client(server, on_error="record")
    out = lm.generate(["x", "y"])  # one bad reply: recorded, the other prompt still answered
    texts = sorted((o[0].finish_reason, o[0].text) for o in out)
    assert texts[0][0] == "error" and texts[1][1].startswith("echo[")
    bad = [o[0] for o in out if o[0].finish_reason == "error"][0]
    assert match in bad.error and bad.text == ""
    again = lm.generate(["x", "y"])  # the failure was not cached: it is asked again and now succeeds
    assert all(o[0].finish_reason == "stop" for o in again)


def test_null_content_is_an_empty_completion_not_cached(server):
    server.inject("null_content")
    lm = client(server)
    out = lm.generate(["x"])
    assert out[0][0].text == "" and out[0][0].finish_reason == "stop"
    assert lm.generate(["x"])[0][0].text.startswith("echo[x]")  # empty texts are never cached
    assert server.calls == 2


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit(limit, seed):
    with FakeOpenAIServer(delay=0.05) as srv:
        lm = client(srv, max_concurrency=limit)
        k = 3 * limit + 1 + seed % 3
        # several caller threads share the client's limit
        threads = [threading.Thread(target=lm.generate, args=(prompts(seed + t, k),)) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert srv.calls == 2 * k
        assert srv.max_concurrent == limit


def test_cache_hits_make_no_http_calls(server, tmp_path, seed):
    ps = prompts(seed, 5)
    path = tmp_path / "c.sqlite"
    lm = client(server, cache=str(path))
    first = lm.generate(ps, n=3, temperature=0.8, seed=seed)
    assert server.calls == 15
    assert len({c.text for c in first[0]}) == 3  # distinct samples at temperature > 0
    # a new client (fresh memory layer) on the same file: all hits, zero HTTP calls
    ledger = UsageLedger()
    lm2 = OpenAIClient(server.url, "fake-model", cache=str(path), ledger=ledger)
    second = lm2.generate(ps, n=3, temperature=0.8, seed=seed)
    assert server.calls == 15
    assert [[c.text for c in r] for r in second] == [[c.text for c in r] for r in first]
    assert all(c.cached and c.usage.cache_hits == 1 and c.usage.calls == 0 for r in second for c in r)
    assert ledger.total.cache_hits == 15 and ledger.total.calls == 0
    lm2.generate(ps[:1], n=4, temperature=0.8, seed=seed)  # one more sample: only it is requested
    assert server.calls == 16


def test_greedy_samples_share_one_request(server):
    out = client(server).generate(["x", "x"], n=4)
    assert server.calls == 1
    assert len({c.text for r in out for c in r}) == 1
    assert sum(c.usage.calls for r in out for c in r) == 1


def test_cache_key_tells_servers_apart_without_credentials():
    a = OpenAIClient("http://user:hunter2@127.0.0.1:8000/v1?token=s3cret", "default", cache=False)
    b = OpenAIClient("http://127.0.0.1:8001/v1/", "default", cache=False)
    same = OpenAIClient("http://127.0.0.1:8000/v1", "default", cache=False)
    ida, idb = json.dumps(a.cache_identity()), json.dumps(b.cache_identity())
    assert ida != idb and a.cache_identity() == same.cache_identity()
    assert "hunter2" not in ida and "s3cret" not in ida and "user" not in ida


def test_api_key_never_reaches_the_cache(server, tmp_path, monkeypatch):
    secret = "sk-test-" + "".join(random.choices("abcdef0123456789", k=24))
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    path = tmp_path / "c.sqlite"
    lm = client(server, cache=str(path))
    lm.generate(["x"])
    assert secret not in repr(lm) and secret not in json.dumps(lm.cache_identity())
    lm.cache.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret.encode() not in blob and b"echo[x]" in blob
    rows = sqlite3.connect(path).execute("SELECT key, value FROM completions").fetchall()
    assert len(rows) == 1 and secret not in rows[0][0] + rows[0][1]


def test_constructor_rejects_bad_arguments(server):
    bad = [
        dict(base_url="ftp://x"),
        dict(base_url=""),
        dict(model=""),
        dict(max_concurrency=0),
        dict(max_retries=-1),
        dict(timeout=0),
        dict(mode="edit"),
        dict(extra_body=[1]),
        dict(on_error="ignore"),
        dict(cache=3.5),
    ]
    for kw in bad:
        args = {"base_url": server.url, "model": "m", **kw}
        with pytest.raises(
            (ValueError, TypeError), match=next(iter(kw)) if next(iter(kw)) != "extra_body" else "extra_body"
        ):
            OpenAIClient(args.pop("base_url"), args.pop("model"), **args)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n=0), "n must"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=[1]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_generate_rejects_bad_arguments(server, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        client(server).generate(["x"], **kw)
    assert server.calls == 0


@pytest.mark.parametrize(
    "bad,match",
    [
        ("just a string", "list of prompts"),
        ([3], r"prompts\[0\]"),
        ([[]], "empty list"),
        ([[{"role": "robot", "content": "x"}]], "role"),
        ([[{"role": "user", "content": 5}]], "content"),
        ([["x"]], r"prompts\[0\]\[0\]"),
    ],
)
def test_generate_rejects_bad_prompts(server, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        client(server).generate(bad)


def test_make_lm_openai_spec(server):
    lm = make_lm(f"openai:fake-model@{server.url}", cache=":memory:", ledger=UsageLedger())
    assert isinstance(lm, OpenAIClient) and lm.model == "fake-model" and not lm.priced  # loopback: $0
    assert lm.generate(["hi"])[0][0].text.startswith("echo[hi]")
    lm2 = make_lm({"backend": "openai", "model": "m2", "base_url": server.url, "max_concurrency": 2, "cache": False})
    assert lm2.max_concurrency == 2 and lm2.cache is None
    assert make_lm(lm2) is lm2
    with pytest.raises(ValueError, match="cannot parse"):
        make_lm("gpt4")
    with pytest.raises(ValueError, match="openai:<model>"):
        make_lm("openai:m@")
    with pytest.raises(ValueError, match="backend"):
        make_lm({"model": "m"})
    with pytest.raises(TypeError, match="spec must be"):
        make_lm(42)
