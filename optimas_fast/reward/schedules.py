"""Learning-rate schedules of every reward training loop (``RewardModel.train``, the TRL-style ``RewardTrainer``,
``optimas-fast reward train``): one multiplier of the peak learning rate per optimizer step.

The formulas are transformers' (``optimization.py``: ``get_constant_schedule``,
``get_constant_schedule_with_warmup``, ``get_linear_schedule_with_warmup``, ``get_cosine_schedule_with_warmup``
with ``num_cycles=0.5``), evaluated at the 0-based step of the loop, so a loop here and a transformers
``LambdaLR`` give the same learning rate at every step:

    warm-up (step < warmup):  step / max(1, warmup)           (0 at step 0, as transformers)
    constant:                 1
    linear:                   max(0, (total - step) / max(1, total - warmup))
    cosine:                   max(0, 0.5 * (1 + cos(pi * (step - warmup) / max(1, total - warmup))))

``min_lr_ratio`` (the engine's own loop; 0 = transformers exactly) lifts the decay to end at that fraction of
the peak instead of 0: ``factor * (1 - min_lr_ratio) + min_lr_ratio`` after the warm-up, which is transformers'
``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)`` for cosine.
"""

from __future__ import annotations

import math

from optimas_fast._validate import is_int, is_number

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def lr_factor(kind: str, step: int, warmup_steps: int = 0, total_steps: int = 1, min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based) of a loop of ``total_steps``
    steps whose first ``warmup_steps`` warm up linearly from 0.

    kind: "constant" (no warm-up, as transformers' ``get_constant_schedule``: ``warmup_steps`` must be 0),
    "constant_with_warmup", "linear" or "cosine". Raises ValueError naming the argument that is wrong."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {kind!r}")
    if not is_int(step) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not (is_number(min_lr_ratio, finite=True) and 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}")
    if kind == "constant":
        if warmup_steps:
            raise ValueError(
                f"schedule 'constant' has no warm-up (as transformers' get_constant_schedule), got "
                f"warmup_steps={warmup_steps}: use 'constant_with_warmup'"
            )
        return 1.0
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if kind == "constant_with_warmup":
        return 1.0
    progress_left = float(total_steps - step) / float(max(1, total_steps - warmup_steps))  # 1 -> 0 over the decay
    if kind == "linear":
        factor = max(0.0, progress_left)
    else:  # cosine, half a cycle (transformers' num_cycles=0.5)
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    # past the last step transformers' linear stays at 0, its cosine would climb back: hold the end value
    if step >= total_steps:
        factor = 0.0
    return factor * (1.0 - min_lr_ratio) + min_lr_ratio


def warmup_steps_of(warmup: float, total_steps: int) -> int:
    """Warm-up steps from transformers' ``warmup_steps`` argument: an int >= 1 is a number of steps, a float in
    [0, 1) a ratio of ``total_steps`` (rounded up, as ``TrainingArguments.get_warmup_steps``)."""
    if not (is_number(warmup, finite=True) and warmup >= 0 and (warmup < 1 or float(warmup).is_integer())):
        raise ValueError(f"warmup_steps must be an int >= 0 or a ratio in [0, 1), got {warmup!r}")
    return int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)
