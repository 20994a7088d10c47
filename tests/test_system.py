"""System API: variables, components, DAG validation and order, runs, overrides under threads, state, evaluate."""

import contextvars
import json
import random
import threading
import time

import pytest
import torch

from optimas_fast.system import (
    Choice,
    Component,
    ComponentError,
    Prompt,
    System,
    Trace,
    Weights,
    variable_from_state,
)
from optimas_fast.system.testing import ScriptedLM


def exact(example, prediction):
    return float(prediction["out"] == example["gold"])


def comp(name, inputs, outputs, variable=None, fn=None):
    if fn is None:

        def fn(variable=None, **kw):
            return {o: f"{name}({','.join(str(kw[i]) for i in inputs)})" for o in outputs}

    return Component(name, inputs=inputs, outputs=outputs, description=f"{name} does things", variable=variable, fn=fn)


# --------------------------------------------------------------------------------------------------
# variables
def test_prompt_rejects_non_str():
    with pytest.raises(TypeError, match="text"):
        Prompt(3)
    assert Prompt("a").coerce("b") == Prompt("b")
    with pytest.raises(TypeError, match="Prompt override"):
        Prompt("a").coerce(1.5)


@pytest.mark.parametrize(
    "space, err, match",
    [
        ({}, ValueError, "empty"),
        ({"k": []}, ValueError, "no options"),
        ({"k": "abc"}, TypeError, "list of options"),
        ({"k": [1, 1]}, ValueError, "duplicate"),
        ({"k": [[1, 2]]}, TypeError, "JSON scalar"),
        ({"k": [float("nan")]}, TypeError, "JSON scalar"),
    ],
)
def test_choice_rejects_bad_space(space, err, match):
    with pytest.raises(err, match=match):
        Choice(**space)


def test_choice_values_candidates_and_sampling(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
    space = {f"k{i}": [f"v{i}_{j}" for j in range(s)] for i, s in enumerate(sizes)}
    c = Choice(**space)
    assert c.value == {k: v[0] for k, v in space.items()}
    cands = list(c.candidates())
    assert len(cands) == c.size() == len(set(cands))
    k = rng.randint(1, c.size())
    sampled = c.sample(k, random.Random(seed))
    assert len(sampled) == k == len(set(sampled)) and all(s in cands for s in sampled)
    assert sampled == c.sample(k, random.Random(seed))  # deterministic for a given rng state
    key = rng.choice(list(space))
    with pytest.raises(ValueError, match="not one of"):
        c.replace(**{key: "nope"})
    with pytest.raises(ValueError, match="unknown key"):
        c.replace(zzz=1)
    # 1, 1.0 and True are distinct options that survive a JSON round trip with their types
    d = Choice(x=[1, 1.0, True])
    for cand in d.candidates():
        back = variable_from_state(json.loads(json.dumps(cand.to_state())))
        assert back == cand and type(back["x"]) is type(cand["x"])


def test_weights_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        Weights()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Weights(42)
    assert Weights("some/dir").path == "some/dir"


# --------------------------------------------------------------------------------------------------
# components
def test_component_declaration_errors():
    with pytest.raises(ValueError, match="name"):
        comp("a.b", ["x"], ["y"])
    with pytest.raises(ValueError, match="not a valid identifier"):
        comp("a", ["x y"], ["y"])
    with pytest.raises(ValueError, match="duplicate"):
        comp("a", ["x", "x"], ["y"])
    with pytest.raises(ValueError, match="both inputs and outputs"):
        comp("a", ["x"], ["x"])
    with pytest.raises(ValueError, match="no outputs"):
        comp("a", ["x"], [])
    with pytest.raises(TypeError, match="variable must be"):
        comp("a", ["x"], ["y"], variable="a plain string")
    with pytest.raises(TypeError, match="list of field names"):
        comp("a", "x", ["y"])


@pytest.mark.parametrize(
    "result, match", [({"y": 1, "z": 2}, r"extra \['z'\]"), ({}, r"missing \['y'\]"), ("y", "must return a dict")]
)
def test_component_output_checks_name_the_component(result, match):
    c = comp("solver", ["x"], ["y"], fn=lambda x, variable: result)
    with pytest.raises(ComponentError, match=f"solver.*{match}"):
        c({"x": 1})


def test_component_missing_input_and_format(seed):
    rng = random.Random(seed)
    c = comp("reader", ["question", "scores"], ["answer"])
    with pytest.raises(ComponentError, match="reader.*missing input fields \\['scores'\\]"):
        c({"question": "q"})
    scores = [rng.random() for _ in range(3)]
    text = c.format_inputs({"question": "why?", "scores": scores})
    assert text.splitlines()[0] == "question: why?" and text.splitlines()[1].startswith("scores: [")
    assert c.format_outputs({"answer": "x" * 50}, max_chars=10) == "answer: xxxxxxx..."


def test_component_subclass_and_multi_variable():
    class Decider(Component):
        inputs = ("a",)
        outputs = ("b",)
        description = "decides"

        def forward(self, a, variable):
            return {"b": f"{variable['prompt'].text}:{variable['mode']['m']}:{a}"}

    d = Decider(variable={"prompt": Prompt("p"), "mode": Choice(m=["x", "y"])})
    assert d.name == "Decider"
    assert d({"a": 1}) == {"b": "p:x:1"}
    assert d({"a": 1}, variable={"mode": {"m": "y"}}) == {"b": "p:y:1"}
    assert set(d.variables()) == {"Decider.prompt", "Decider.mode"}
    with pytest.raises(TypeError, match="several variables"):
        d({"a": 1}, variable="text")
    with pytest.raises(ValueError, match="unknown variable key"):
        d({"a": 1}, variable={"nope": 1})


# --------------------------------------------------------------------------------------------------
# DAG validation and order
def test_dag_validation_errors():
    a = comp("a", ["x"], ["y"])
    with pytest.raises(ValueError, match="field 'y' is produced by both 'a' and 'b'"):
        System([a, comp("b", ["x"], ["y"])], exact, ["y"])
    with pytest.raises(ValueError, match="cycle.*'p', 'q'"):
        System([a, comp("p", ["y", "v"], ["u"]), comp("q", ["u"], ["v", "out"])], exact, ["out"])
    with pytest.raises(ValueError, match="reads \\['w'\\], which no component produces"):
        System([a, comp("b", ["y", "w"], ["out"])], exact, ["out"], inputs=["x"])
    with pytest.raises(ValueError, match="final outputs \\['zz'\\]"):
        System([a], exact, ["zz"])
    with pytest.raises(ValueError, match="two components are named 'a'"):
        System([a, comp("a", ["y"], ["out"])], exact, ["out"])
    with pytest.raises(ValueError, match="also produced"):
        System([a], exact, ["y"], inputs=["x", "y"])
    with pytest.raises(TypeError, match="metric"):
        System([a], "accuracy", ["y"])
    with pytest.raises(ValueError, match="non-empty list of Component"):
        System([], exact, ["y"])


def _reference_order(components, producers):
    """O(n^2) reference: repeatedly take the earliest-declared component whose producers have all run."""
    done, order = set(), []
    while len(order) < len(components):
        for c in components:
            if c.name not in done and all(producers[f] in done for f in c.inputs if f in producers):
                done.add(c.name)
                order.append(c.name)
                break
    return order


def test_topological_order_is_deterministic(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 11)
    comps = []
    for i in range(n):
        # component i reads the output of some earlier-created components and the example field "x"
        deps = rng.sample(range(i), k=rng.randint(0, min(i, 3)))
        comps.append(comp(f"c{i}", ["x"] + [f"f{d}" for d in deps], [f"f{i}"]))
    rng.shuffle(comps)  # declaration order is random; the DAG fixes only part of the order
    sys1 = System(comps, exact, [f"f{n - 1}"])
    sys2 = System(list(comps), exact, [f"f{n - 1}"])
    assert sys1.order == sys2.order == _reference_order(comps, sys1.producers)
    pos = {name: i for i, name in enumerate(sys1.order)}
    for c in comps:
        for f in c.inputs:
            if f in sys1.producers:
                assert pos[sys1.producers[f]] < pos[c.name]
    # independent components keep declaration order
    indep = System([comp("z", ["x"], ["o1"]), comp("a", ["x"], ["o2"]), comp("m", ["x"], ["o3"])], exact, ["o1"])
    assert indep.order == ["z", "a", "m"]


# --------------------------------------------------------------------------------------------------
# running
def make_chain(lm=None, sleep=None):
    """x -> a (Prompt) -> y -> b (Choice) -> out ; gold is what the default variables produce."""

    def fa(x, variable):
        if sleep:
            time.sleep(sleep())
        return {"y": f"{variable.text}|{x}"}

    def fb(y, variable):
        if lm is not None:
            cb.generate(lm, [y])
        if sleep:
            time.sleep(sleep())
        return {"out": f"{y}|{variable['k']}"}

    ca = Component("a", inputs=["x"], outputs=["y"], variable=Prompt("P0"), fn=fa)
    cb = Component("b", inputs=["y"], outputs=["out"], variable=Choice(k=[1, 2, 3]), fn=fb)
    return System([cb, ca], exact, ["out"], inputs=["x"], name="chain")


def test_run_records_trace(seed):
    rng = random.Random(seed)
    lm = ScriptedLM(lambda p, i: "reply with four words")
    system = make_chain(lm=lm)
    x = f"x{rng.randint(0, 10**6)}"
    trace = system.run({"x": x, "gold": f"P0|{x}|1"})
    assert trace.ok and trace.score == 1.0 and trace.prediction == {"out": f"P0|{x}|1"}
    assert [s.component for s in trace.steps] == ["a", "b"]
    assert trace["a"].inputs == {"x": x} and trace["a"].outputs == {"y": f"P0|{x}"}
    assert trace["a"].variable == Prompt("P0") and trace["b"].variable == Choice(k=[1, 2, 3])
    assert all(s.seconds >= 0 for s in trace.steps)
    # usage is attributed to the component that called the LM, and only to it
    assert trace["a"].usage.calls == 0 and trace["b"].usage.calls == 1
    assert trace["b"].usage.completion_tokens == 4 and trace.usage.calls == 1
    json.dumps(trace.to_dict())  # JSON-safe


def test_run_with_overrides_and_bad_overrides(seed):
    system = make_chain()
    x = str(random.Random(seed).random())
    t = system.run({"x": x, "gold": f"Q|{x}|3"}, overrides={"a": "Q", "b": {"k": 3}})
    assert t.score == 1.0 and t["a"].variable == Prompt("Q")
    assert system.components["a"].variable == Prompt("P0")  # nothing stored
    with pytest.raises(ValueError, match="no component named 'zz'"):
        system.run({"x": x}, overrides={"zz": "Q"})
    with pytest.raises(TypeError, match="Prompt override"):
        system.run({"x": x}, overrides={"a": 5})
    with pytest.raises(ValueError, match="not one of"):
        system.run({"x": x}, overrides={"b": {"k": 9}})
    with pytest.raises(ValueError, match="single variable"):
        system.run({"x": x}, overrides={"a.text": "Q"})
    with pytest.raises(TypeError, match="example"):
        system.run(["not", "a", "dict"])


def test_missing_example_field_is_a_recorded_failure():
    t = make_chain().run({"gold": "g"})
    assert not t.ok and t.failed_component == "a" and "missing input fields ['x']" in t.error
    assert t.score == 0.0
    with pytest.raises(RuntimeError, match="missing input"):
        t.raise_for_error()


def test_overrides_isolated_across_threads(seed):
    rng = random.Random(seed)
    system = make_chain(sleep=lambda: random.random() * 0.002)
    n_threads, per_thread = 12, 8
    results: dict[int, list[tuple[str, str, Trace]]] = {}
    errors = []

    def worker(tid):
        local = random.Random(seed + tid)
        out = []
        try:
            for j in range(per_thread):
                x = f"t{tid}j{j}"
                if local.random() < 0.3:
                    out.append(("P0", 1, system.run({"x": x, "gold": ""})))  # no override: defaults
                else:
                    p, k = f"P{tid}_{j}", local.choice([1, 2, 3])
                    out.append((p, k, system.run({"x": x, "gold": ""}, overrides={"a": Prompt(p), "b": {"k": k}})))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        results[tid] = out

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for tid, out in results.items():
        for j, (p, k, trace) in enumerate(out):
            assert trace.prediction == {"out": f"{p}|t{tid}j{j}|{k}"}
    assert system.components["a"].variable == Prompt("P0")
    assert system.components["b"].variable["k"] == 1
    _ = rng


def test_run_component_and_run_downstream():
    calls = {"a": 0, "b": 0, "c": 0}

    def counted(name, fn):
        def inner(variable=None, **kw):
            calls[name] += 1
            return fn(variable=variable, **kw)

        return inner

    a = Component(
        "a",
        inputs=["x"],
        outputs=["y"],
        variable=Prompt("A"),
        fn=counted("a", lambda x, variable: {"y": variable.text + x}),
    )
    b = Component("b", inputs=["y"], outputs=["z"], fn=counted("b", lambda y, variable: {"z": y + "!"}))
    c = Component("c", inputs=["x"], outputs=["w"], fn=counted("c", lambda x, variable: {"w": x * 2}))
    system = System([a, b, c], lambda e, p: float(p["z"] == e["gold"]), ["z", "w"])
    trace = system.run({"x": "1", "gold": "B1!"})
    assert trace.score == 0.0 and calls == {"a": 1, "b": 1, "c": 1}
    assert system.descendants("a") == ["b"] and system.descendants("c") == []

    out = system.run_component("a", trace["a"].inputs, variable="B")
    assert out == {"y": "B1"} and calls["a"] == 2
    roll = system.run_downstream("a", out, trace)
    assert roll.score == 1.0 and calls == {"a": 2, "b": 2, "c": 1}  # only b re-ran
    assert roll["a"].reused and roll["c"].reused and not roll["b"].reused
    assert roll.prediction == {"z": "B1!", "w": "11"}
    assert trace.prediction["z"] == "A1!"  # the original trace is untouched
    with pytest.raises(ComponentError, match="component 'a'.*extra"):
        system.run_downstream("a", {"y": 1, "q": 2}, trace)

    part = system.run({"x": "1", "gold": "Q!"}, start_from="b", given={"y": "Q", "w": "11"})
    assert part.score == 1.0 and [s.component for s in part.steps] == ["b"]
    incomplete = system.run({"x": "1", "gold": "Q!"}, start_from="b", given={"y": "Q"})
    assert incomplete.score == 0.0 and "final outputs ['w'] were not produced" in incomplete.error


def test_evaluate_error_accounting(seed):
    rng = random.Random(seed)
    n = rng.randint(9, 23)
    fail_comp = set(rng.sample(range(n), 3))
    remaining = [i for i in range(n) if i not in fail_comp]
    fail_metric = set(rng.sample(remaining, 2))
    not_dict = rng.choice([i for i in remaining if i not in fail_metric])

    def fa(x, variable):
        if x in fail_comp:
            raise RuntimeError(f"boom {x}")
        return {"y": x}

    def metric(example, prediction):
        if example["x"] in fail_metric:
            return float("nan")
        return float(prediction["out"] % 2 == 0)

    a = Component("a", inputs=["x"], outputs=["y"], fn=fa)
    b = Component("b", inputs=["y"], outputs=["out"], fn=lambda y, variable: {"out": y})
    system = System([a, b], metric, ["out"])
    examples = [{"x": i} for i in range(n)]
    examples[not_dict] = 12345
    result = system.evaluate(examples, workers=4)
    assert len(result) == n and result.n_failed == 3 + 2 + 1
    for i in range(n):
        if i in fail_comp:
            assert result.scores[i] == 0.0 and f"boom {i}" in result.errors[i]
            assert result.traces[i].failed_component == "a"
        elif i in fail_metric:
            assert result.scores[i] == 0.0 and result.errors[i].startswith("metric:")
        elif i == not_dict:
            assert result.scores[i] == 0.0 and result.errors[i].startswith("example:")
        else:
            assert result.errors[i] is None and result.scores[i] == float(i % 2 == 0)
    assert result.mean == pytest.approx(sum(result.scores) / n)
    assert result.summary()["failed"] == 6
    # contextvars set by the caller reach the worker threads (the LM layer's ledger and budget live there)
    marker = contextvars.ContextVar("marker", default=None)
    seen = []
    probe = Component(
        "p", inputs=["x"], outputs=["out"], fn=lambda x, variable: seen.append(marker.get()) or {"out": 0}
    )
    token = marker.set("caller")
    try:
        System([probe], metric, ["out"]).evaluate([{"x": i} for i in range(6)], workers=3)
    finally:
        marker.reset(token)
    assert seen == ["caller"] * 6
    with pytest.raises(ValueError, match="workers"):
        system.evaluate(examples, workers=0)


# --------------------------------------------------------------------------------------------------
# state
class TinyNet(torch.nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.lin = torch.nn.Linear(d, 3)
        self.register_buffer("scale", torch.ones(3))


def make_stateful(gen=None):
    net = TinyNet()
    if gen is not None:
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    a = Component("a", inputs=["x"], outputs=["y"], variable=Prompt("first"), fn=lambda x, variable: {"y": x})
    b = Component(
        "b", inputs=["y"], outputs=["z"], variable=Choice(k=[1, 2, 3], mode=["p", "q"]), fn=lambda y, variable: {"z": y}
    )
    c = Component("c", inputs=["z"], outputs=["w"], variable=Weights(net), fn=lambda z, variable: {"w": z})
    d = Component(
        "d",
        inputs=["w"],
        outputs=["out"],
        variable={"prompt": Prompt("dp"), "trust": Choice(t=["lm", "scorer"]), "adapter": Weights(path="ad/0")},
        fn=lambda w, variable: {"out": w},
    )
    return System([a, b, c, d], exact, ["out"], name="stateful")


def test_state_round_trip_every_variable_type(gen, tmp_path):
    src = make_stateful(gen)
    src.set_variable("a", "a new prompt with unicode ✓")
    src.set_variable("b", {"k": 3, "mode": "q"})
    src.set_variable("d.prompt", "decider prompt")
    src.set_variable("d.trust", {"t": "scorer"})
    src.set_variable("d.adapter", "ad/7")
    state = json.loads(json.dumps(src.state_dict()))  # must survive JSON

    dst = make_stateful()  # fresh random init of the net
    dst.load_state_dict(state)
    assert dst.variables()["a"] == Prompt("a new prompt with unicode ✓")
    assert dst.variables()["b"].value == {"k": 3, "mode": "q"}
    assert dst.variables()["d.prompt"] == Prompt("decider prompt")
    assert dst.variables()["d.trust"]["t"] == "scorer"
    assert dst.variables()["d.adapter"].path == "ad/7"
    for (k1, v1), (k2, v2) in zip(
        src.components["c"].variable.module.state_dict().items(),
        dst.components["c"].variable.module.state_dict().items(),
    ):
        assert k1 == k2 and torch.equal(v1, v2)

    path = tmp_path / "sub" / "state.json"
    src.save_state(path)
    again = make_stateful()
    again.load_state(path)
    assert again.state_dict() == src.state_dict()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        again.load_state(tmp_path / "bad.json")


def test_copy_has_independent_variables_and_shares_the_rest(gen):
    src = make_stateful(gen)
    lm = ScriptedLM(["hi"])
    src.components["a"].lm = lm  # a resource a component holds: shared, never copied
    before = json.dumps(src.state_dict(), sort_keys=True)
    dst = src.copy()
    assert dst.state_dict() == src.state_dict() and dst.order == src.order
    assert dst.components["a"] is not src.components["a"] and dst.components["a"].lm is lm
    # every kind of change to the copy: set a Prompt / Choice / multi-variable key, load Weights in place
    dst.set_variable("a", "changed")
    dst.set_variable("b", {"k": 2, "mode": "q"})
    dst.set_variable("d.trust", {"t": "scorer"})
    other = make_stateful(torch.Generator().manual_seed(gen.initial_seed() + 1))
    dst.load_state_dict(
        {**dst.state_dict(), "variables": {**dst.state_dict()["variables"], "c": other.state_dict()["variables"]["c"]}}
    )
    with torch.no_grad():
        next(dst.components["c"].variable.module.parameters()).add_(1.0)
    assert json.dumps(src.state_dict(), sort_keys=True) == before
    assert dst.state_dict()["variables"]["a"] != src.state_dict()["variables"]["a"]
    assert dst.components["c"].variable.module is not src.components["c"].variable.module
    assert dst.run({"x": "q", "gold": "q"}).score == 1.0 and src.run({"x": "q", "gold": "q"}).score == 1.0


def test_state_for_a_different_system_is_rejected(gen):
    state = make_stateful(gen).state_dict()
    other = make_chain()
    with pytest.raises(ValueError, match="different system.*missing from the state"):
        other.load_state_dict(state)
    target = make_stateful()
    before = target.state_dict()
    bad = json.loads(json.dumps(state))
    bad["variables"]["b"]["space"]["k"] = [1, 2, 4]
    bad["variables"]["b"]["value"]["k"] = 4
    with pytest.raises(ValueError, match="different space"):
        target.load_state_dict(bad)
    assert target.state_dict() == before  # a failed load changes nothing
    bad = json.loads(json.dumps(state))
    bad["format"] = "pickle"
    with pytest.raises(ValueError, match="format"):
        target.load_state_dict(bad)
    bad = json.loads(json.dumps(state))
    bad["signature"]["a"]["variable"] = "choice"
    with pytest.raises(ValueError, match="different system.*'a'"):
        target.load_state_dict(bad)
    with pytest.raises(TypeError, match="expected a dict"):
        target.load_state_dict("state")


def test_budget_stop_is_not_an_example_failure(seed):
    from optimas_fast.lm.errors import BudgetExceeded

    stop_at = random.Random(seed).randint(0, 4)

    def fa(x, variable):
        if x == stop_at:
            raise BudgetExceeded("max_calls", used=3, requested=1, maximum=3)
        return {"out": x}

    system = System([Component("a", inputs=["x"], outputs=["out"], fn=fa)], exact, ["out"])
    with pytest.raises(BudgetExceeded, match="max_calls"):
        system.run({"x": stop_at, "gold": 0})
    with pytest.raises(BudgetExceeded):
        system.evaluate([{"x": i, "gold": i} for i in range(5)], workers=2)
