"""Preference collection: all ordered pairs, weights, PairStore, candidate sampling and rollouts."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from optimas_fast.preference import (
    CollectConfig,
    PairStore,
    build_pairs,
    collect_preferences,
    is_held_out,
    pair_weights,
    sample_variants,
)
from optimas_fast.system import Choice, Component, Prompt, System


def test_build_pairs_emits_every_ordered_pair(seed):
    rng = random.Random(seed)
    k = rng.randint(2, 8)
    cands = [(f"out {i}", rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()])) for i in range(k)]
    pairs = build_pairs("c", "x", cands)
    expected = {(a, b) for (a, sa), (b, sb) in itertools.permutations(cands, 2) if sa > sb}
    assert {(p.chosen, p.rejected) for p in pairs} == expected
    assert len(pairs) == len(expected)
    for p in pairs:
        assert p.margin == pytest.approx(dict(cands)[p.chosen] - dict(cands)[p.rejected]) and p.margin > 0
    # a later candidate that is better still yields a pair (the reference drops these)
    pairs = build_pairs("c", "x", [("worse", 0.0), ("better", 1.0)])
    assert [(p.chosen, p.rejected) for p in pairs] == [("better", "worse")]


def test_build_pairs_ties_and_bad_inputs():
    assert build_pairs("c", "x", [("a", 0.5), ("b", 0.5)]) == []
    with pytest.raises(ValueError, match="duplicate"):
        build_pairs("c", "x", [("a", 0.1), ("a", 0.2)])
    with pytest.raises(ValueError, match="reward nan"):
        build_pairs("c", "x", [("a", math.nan), ("b", 0.2)])


def test_pair_weights_never_zero_never_nan(seed):
    rng = random.Random(seed)
    margins = [rng.random() for _ in range(rng.randint(1, 50))] + [1e-12]
    w = pair_weights(margins, floor=0.05)
    assert all(x >= 0.05 and math.isfinite(x) for x in w)
    mean = sum(margins) / len(margins)
    assert w[0] == pytest.approx(max(margins[0] / mean, 0.05))
    assert pair_weights([0.3] * 5) == [1.0] * 5
    assert pair_weights([0.0, 0.0]) == [1.0, 1.0]
    assert pair_weights([]) == []
    with pytest.raises(ValueError, match="floor"):
        pair_weights([0.1], floor=0)
    with pytest.raises(ValueError, match="margins"):
        pair_weights([-0.1])


def test_pair_store_split_bounds_and_round_trip(seed):
    rng = random.Random(seed)
    store = PairStore(max_groups=10, holdout_fraction=0.3)
    for i in range(25):
        store.add_group("c", f"id:{i}", f"x{i}", [("a", rng.random()), ("b", rng.random() + 2)], raw_inputs={"x": i})
    assert len(store) == 10  # FIFO bound
    train, held = store.pairs("c"), store.pairs("c", held_out=True)
    assert len(train) + len(held) == 10
    assert all(not is_held_out(f"id:{p.inputs[1:]}", 0.3) for p in train)
    assert all(is_held_out(f"id:{p.inputs[1:]}", 0.3) for p in held)
    assert all(p.chosen == "b" for p in train + held)
    assert all(not is_held_out(f"id:{x['x']}", 0.3) for x in store.inputs("c"))
    again = PairStore.from_state(store.state_dict())
    assert again.pairs("c") == train and again.pairs("c", held_out=True) == held
    assert again.inputs("c") == store.inputs("c")
    assert len(store.candidates("c", held_out=True)) == 2 * len(held)
    with pytest.raises(ValueError, match="holdout_fraction"):
        PairStore(holdout_fraction=1.0)


def _system(counter):
    """a: picks a level; b: doubles it; metric: closeness of b to 6."""

    def fa(x, variable):
        return {"a": variable["level"]}

    def fb(a, variable):
        counter.append(a)
        return {"b": 2 * a}

    comps = [
        Component("a", inputs=["x"], outputs=["a"], variable=Choice(level=[0, 1, 2, 3, 4]), fn=fa),
        Component("b", inputs=["a"], outputs=["b"], variable=None, fn=fb),
    ]
    return System(comps, lambda ex, pred: 1.0 - abs(pred["b"] - 6) / 8, ["b"], inputs=["x"])


@pytest.mark.parametrize("workers", [1, 3])
def test_collect_pairs_follow_the_measured_reward(seed, workers):
    calls = []
    system = _system(calls)
    data = [{"id": i, "x": i} for i in range(6)]
    store = PairStore(holdout_fraction=0.0)
    cfg = CollectConfig(num_candidates=4, rollouts=3, workers=workers)
    res = collect_preferences(system, "a", data, random.Random(seed), cfg, store)
    assert res.n_groups == 6 and res.n_skipped == 0
    assert res.pairs and res.train_pairs == res.pairs
    for p in res.pairs:  # chosen is the level closer to 3
        ca, ra = int(p.chosen.split(": ")[1]), int(p.rejected.split(": ")[1])
        assert abs(ca - 3) < abs(ra - 3)
        assert p.margin == pytest.approx((abs(ra - 3) - abs(ca - 3)) * 2 / 8)
    # same rng seed, same pairs (threads never touch the rng)
    again = collect_preferences(_system([]), "a", data, random.Random(seed), cfg, PairStore(holdout_fraction=0.0))
    assert [(p.chosen, p.rejected) for p in again.pairs] == [(p.chosen, p.rejected) for p in res.pairs]


def test_last_component_is_scored_once_and_small_groups_skipped(seed):
    calls = []
    system = _system(calls)
    system.components["b"].variable = Choice(scale=[1])  # one option: no variant can differ
    res = collect_preferences(
        system, "b", [{"id": 0, "x": 0}], random.Random(seed), CollectConfig(num_candidates=3, rollouts=5, workers=1)
    )
    assert res.n_skipped == 1 and res.pairs == []
    # the last component with several candidates: each candidate scored once despite rollouts=5
    calls.clear()
    system2 = System(
        [
            Component(
                "a",
                inputs=["x"],
                outputs=["a"],
                variable=Choice(level=[0, 1, 2]),
                fn=lambda x, variable: {"a": variable["level"]},
            )
        ],
        lambda ex, pred: calls.append(1) or float(pred["a"]),
        ["a"],
        inputs=["x"],
    )
    res = collect_preferences(
        system2, "a", [{"id": 0, "x": 0}], random.Random(seed), CollectConfig(num_candidates=3, rollouts=5, workers=1)
    )
    # variants are sampled, so 2 or 3 distinct levels (seed 399 draws two): every ordered pair of them, once each
    k = len({p.chosen for p in res.pairs} | {p.rejected for p in res.pairs})
    assert res.n_groups == 1 and k >= 2 and len(res.pairs) == k * (k - 1) // 2
    assert len(calls) == 1 + k  # the initial run + one score per distinct candidate


def test_sample_variants_kinds(seed):
    rng = random.Random(seed)
    ch = Choice(a=[1, 2, 3], b=["x", "y"])
    vs = sample_variants(ch, 3, rng)
    assert len(vs) == 3 and all(v != ch for v in vs) and len(set(vs)) == 3
    assert sample_variants(Prompt("p"), 2, rng) == []
    ps = sample_variants(Prompt("p"), 2, rng, {"c": ["p", "q", "r"]}, address="c")
    assert ps and all(v.text in ("q", "r") for v in ps)
    multi = sample_variants({"p": Prompt("p"), "c": ch}, 2, rng, {"m.p": ["q"]}, address="m")
    assert multi and all(set(v) <= {"p", "c"} and v for v in multi)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("num_candidates", 1, ">= 2"),
        ("rollouts", 0, ">= 1"),
        ("strategy", "random", "['variables', 'resample', 'both']"),
        ("workers", 0, ">= 1"),
        ("weights_noise", -1.0, ">= 0"),
    ],
)
def test_collect_config_errors(field, value, allowed):
    cfg = CollectConfig(**{field: value})
    with pytest.raises(ValueError) as exc:
        cfg.validate()
    assert field in str(exc.value) and allowed in str(exc.value)


def test_collect_unknown_component():
    with pytest.raises(ValueError, match="no component 'zz'"):
        collect_preferences(_system([]), "zz", [{"x": 1}], random.Random(0))
