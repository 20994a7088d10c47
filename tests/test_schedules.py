"""reward/schedules.py: the one LR schedule module of every training loop equals transformers' schedulers step by
step (random step counts), min_lr_ratio equals transformers' cosine-with-min-lr, bad arguments are named."""

from __future__ import annotations

import math
import random

import pytest
import torch

from optimas_fast.reward import schedules


def _transformers_lrs(kind: str, warm: int, total: int, min_ratio: float = 0.0) -> list[float]:
    """The lr a transformers LambdaLR gives at each of ``total`` optimizer steps (peak 1.0)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup, get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if min_ratio:
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warm, total, min_lr_rate=min_ratio)
    else:
        sched = get_scheduler(kind, opt, num_warmup_steps=warm, num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
def test_lr_factor_equals_transformers_schedulers(kind, seed):
    rng = random.Random(seed)
    for _ in range(4):  # random step counts, warm-up from none to all of them
        total = rng.randint(1, 60)
        warm = 0 if kind == "constant" else rng.randint(0, total)
        theirs = _transformers_lrs(kind, warm, total)
        ours = [schedules.lr_factor(kind, step, warm, total) for step in range(total)]
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15), (total, warm)


def test_min_lr_ratio_is_transformers_cosine_with_min_lr_and_lifts_linear(seed):
    rng = random.Random(seed)
    total, warm, ratio = rng.randint(5, 50), rng.randint(0, 4), rng.uniform(0.05, 0.9)
    theirs = _transformers_lrs("cosine", warm, total, ratio)
    ours = [schedules.lr_factor("cosine", s, warm, total, ratio) for s in range(total)]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    # linear: the same lift of transformers' linear decay (ends at the ratio, not 0); warm-up untouched
    plain = _transformers_lrs("linear", warm, total)
    lifted = [schedules.lr_factor("linear", s, warm, total, ratio) for s in range(total)]
    for s in range(total):
        want = plain[s] if s < warm else plain[s] * (1 - ratio) + ratio
        assert lifted[s] == pytest.approx(want, rel=1e-12), s
    # past the last step (adapt after train): the end value, not a cosine climbing back
    assert schedules.lr_factor("cosine", total + 3, warm, total, ratio) == pytest.approx(ratio)
    assert schedules.lr_factor("linear", total + 3, warm, total) == 0.0


def test_warmup_steps_of_follows_transformers():
    from transformers import TrainingArguments

    for w in (0, 1, 3, 0.25, 0.5):
        theirs = TrainingArguments(output_dir="unused", warmup_steps=w).get_warmup_steps(17)
        assert schedules.warmup_steps_of(w, 17) == theirs, w


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: schedules.lr_factor("polynomial", 0, 0, 5), "schedule"),
        (lambda: schedules.lr_factor("linear", -1, 0, 5), "step"),
        (lambda: schedules.lr_factor("linear", 0, 1.5, 5), "warmup_steps"),
        (lambda: schedules.lr_factor("linear", 0, 0, 0), "total_steps"),
        (lambda: schedules.lr_factor("linear", 0, 0, 5, min_lr_ratio=1.5), "min_lr_ratio"),
        (lambda: schedules.lr_factor("linear", 0, 0, 5, min_lr_ratio=math.nan), "min_lr_ratio"),
        (lambda: schedules.lr_factor("constant", 0, 2, 5), "constant_with_warmup"),
        (lambda: schedules.warmup_steps_of(2.5, 10), "warmup_steps"),
        (lambda: schedules.warmup_steps_of(-1, 10), "warmup_steps"),
    ],
)
def test_bad_arguments_are_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()
