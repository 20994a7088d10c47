"""Usage accounting per component and per run, prices, and hard budgets."""

import contextvars
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from optimas_fast.lm import (
    UNSCOPED,
    Budget,
    BudgetExceeded,
    LMError,
    OpenAIClient,
    UsageLedger,
    current_component,
    register_price,
    usage_scope,
    use_ledger,
)
from optimas_fast.lm.testing import FakeOpenAIServer
from optimas_fast.lm.usage import current_ledger, price_for


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


def client(srv, **kw):
    kw.setdefault("cache", ":memory:")
    return OpenAIClient(srv.url, kw.pop("model", "fake-model"), **kw)


def test_usage_is_attributed_to_components(server, seed):
    rng = random.Random(seed)
    ledger = UsageLedger()
    lm = client(server, ledger=ledger)
    k1, k2 = 1 + rng.randrange(4), 1 + rng.randrange(4)
    with usage_scope("rewriter"):
        assert current_component() == "rewriter"
        out1 = lm.generate([f"a{i}" for i in range(k1)])
        with usage_scope("solver"):
            out2 = lm.generate([f"b{i}" for i in range(k2)], n=2, temperature=0.5)
        lm.generate([f"a{i}" for i in range(k1)])  # all cache hits
    lm.generate(["outside"])
    assert current_component() == UNSCOPED
    comp = ledger.by_component()
    assert comp["rewriter"].calls == k1 and comp["rewriter"].cache_hits == k1
    assert comp["solver"].calls == 2 * k2 and comp[UNSCOPED].calls == 1
    assert comp["rewriter"].prompt_tokens == sum(c.usage.prompt_tokens for r in out1 for c in r)
    assert comp["solver"].completion_tokens == sum(c.usage.completion_tokens for r in out2 for c in r)
    assert ledger.total.calls == k1 + 2 * k2 + 1 == server.calls
    assert ledger.by_model()["openai:fake-model"].calls == ledger.total.calls
    assert "rewriter" in ledger.summary() and "TOTAL" in ledger.summary()


def test_scopes_are_per_thread(server):
    ledger = UsageLedger()
    lm = client(server, ledger=ledger)

    def work(name, k):
        with usage_scope(name):
            lm.generate([f"{name}{i}" for i in range(k)])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, ["c1", "c2", "c3", "c4"], [1, 2, 3, 4]))
    assert {k: v.calls for k, v in ledger.by_component().items()} == {"c1": 1, "c2": 2, "c3": 3, "c4": 4}


def test_use_ledger_and_copied_contexts(server):
    lm = client(server)  # no ledger of its own: uses the current one
    run = UsageLedger()
    with use_ledger(run), usage_scope("x"):
        assert current_ledger() is run
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(lm.generate, ["q"]))
        t.start()
        t.join()
    assert run.by_component()["x"].calls == 1
    assert current_ledger() is not run


def test_prices(server, seed):
    rng = random.Random(seed)
    model = f"paid-model-{rng.randrange(10**6)}"
    pin, pout = rng.uniform(0.1, 5), rng.uniform(0.1, 20)
    register_price(model, pin, pout)
    assert price_for(model + "-2025-01") == (pin, pout)  # prefix match
    ledger = UsageLedger()
    lm = client(server, model=model, ledger=ledger, priced=True)
    out = lm.generate(["one two three"])[0][0]
    want = (out.usage.prompt_tokens * pin + out.usage.completion_tokens * pout) / 1e6
    assert out.usage.cost_usd == pytest.approx(want) and want > 0
    assert ledger.total.cost_usd == pytest.approx(want)
    local = client(server, ledger=UsageLedger())  # loopback server: local, $0
    assert local.generate(["one two three"])[0][0].usage.cost_usd == 0.0
    with pytest.raises(ValueError, match="input_per_mtok"):
        register_price("m", -1, 1)
    with pytest.raises(TypeError, match="model"):
        register_price("", 1, 1)


def test_budget_max_calls_stops_before_sending(server, seed):
    limit = 3 + seed % 4
    ledger = UsageLedger(Budget(max_calls=limit))
    lm = client(server, ledger=ledger)
    for i in range(limit):
        lm.generate([f"q{i}"])
    lm.generate(["q0"])  # a cache hit is free, even at the limit
    with pytest.raises(BudgetExceeded, match="max_calls") as ei:
        lm.generate(["one more"])
    assert isinstance(ei.value, LMError) and ei.value.limit == "max_calls"
    assert server.calls == limit and ledger.total.calls == limit


def test_budget_whole_batch_is_refused(server):
    ledger = UsageLedger(Budget(max_calls=5))
    lm = client(server, ledger=ledger)
    lm.generate(["a", "b"])
    with pytest.raises(BudgetExceeded):
        lm.generate(["c", "d", "e", "f"])  # 2 + 4 > 5: nothing of it is sent
    assert server.calls == 2
    lm.generate(["c", "d", "e"])  # exactly reaches the limit
    assert ledger.total.calls == 5


def test_budget_tokens_and_usd(server, seed):
    ledger = UsageLedger(Budget(max_tokens=100))
    lm = client(server, ledger=ledger)
    lm.generate(["short"], max_tokens=20)
    with pytest.raises(BudgetExceeded, match="max_tokens"):
        lm.generate(["short"], max_tokens=200, temperature=1.0)  # the worst case would exceed
    model = f"pricey-{seed}"
    register_price(model, 1_000_000.0, 1_000_000.0)  # $1 a token
    paid = client(server, model=model, priced=True, ledger=UsageLedger(Budget(max_usd=50.0)))
    spent = paid.generate(["a"], max_tokens=30)[0][0].usage.cost_usd  # reserves <= $35, spends ~$7
    assert 0 < spent < 15
    with pytest.raises(BudgetExceeded, match="max_usd"):
        paid.generate(["b"], max_tokens=45)  # spent + ~$5 prompt + $45 worst-case completion > $50
    assert paid.ledger.total.cost_usd <= 50.0


def test_budget_is_safe_under_threads(server, seed):
    limit = 7 + seed % 5
    ledger = UsageLedger(Budget(max_calls=limit))
    lm = client(server, ledger=ledger)
    refused = []

    def work(i):
        try:
            lm.generate([f"t{i}"])
        except BudgetExceeded:
            refused.append(i)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(limit + 6)))
    assert server.calls == limit and len(refused) == 6


def test_ledger_state_round_trip(server):
    ledger = UsageLedger(Budget(max_calls=10))
    lm = client(server, ledger=ledger)
    with usage_scope("a"):
        lm.generate(["x", "y"])
    state = ledger.state_dict()
    resumed = UsageLedger()
    resumed.load_state_dict(state)
    assert resumed.total == ledger.total and resumed.by_component() == ledger.by_component()
    assert resumed.budget == Budget(max_calls=10)
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"total": {}})


@pytest.mark.parametrize(
    "kw,exc",
    [
        (dict(max_calls=-1), ValueError),
        (dict(max_calls=1.5), TypeError),
        (dict(max_tokens="10"), TypeError),
        (dict(max_usd=float("inf")), ValueError),
        (dict(max_usd=True), TypeError),
    ],
)
def test_budget_rejects_bad_limits(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        Budget(**kw)


def test_bad_scope_and_ledger_arguments():
    with pytest.raises(TypeError, match="component"):
        with usage_scope(""):
            pass
    with pytest.raises(TypeError, match="UsageLedger"):
        with use_ledger("nope"):
            pass
    with pytest.raises(TypeError, match="budget"):
        UsageLedger(budget={"max_calls": 3})
