"""Settings of the Optimas loop: one dataclass tree, built from YAML/JSON dicts with strict key checks.

``OptimasConfig.from_dict(d)`` rejects unknown keys and wrong values with a ``ConfigError`` naming the full
key (``"loop.collect.strategy"``) and what is allowed, so a typo in a YAML file never silently falls back to
a default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optimas_fast._validate import check_int, check_number, is_int, is_number
from optimas_fast.lm.usage import Budget
from optimas_fast.optimizers.choice import ChoiceConfig
from optimas_fast.optimizers.prompt import PromptConfig
from optimas_fast.optimizers.weights import WeightsConfig
from optimas_fast.preference.collect import CollectConfig

__all__ = ["ConfigError", "BudgetConfig", "MOVED_KEYS", "OptimasConfig", "from_dict", "moved_key_message", "to_dict"]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the allowed values."""


# loop settings that moved to the reward model's training settings (one home per knob: TrainConfig), so that an
# old YAML file or script stops with where the key lives now rather than "unknown key"
MOVED_KEYS = ("lr", "head_lr", "batch_pairs")


def moved_key_message(where: str, key: str) -> str:
    """``where`` (the key as the user wrote it, e.g. ``loop.lr``) moved to the reward model's TrainConfig."""
    return (
        f"{where} moved to reward.train.{key} (the reward model's training settings, "
        f"optimas_fast.reward.TrainConfig: RewardModel(..., train_config=TrainConfig({key}=...)) in Python)"
    )


@dataclass
class BudgetConfig:
    """The user's spending limits for a whole run (``loop.budget:`` in YAML): configuration, read at the start (and
    again at a resume, which may raise them). The loop enforces them through runtime trackers, each with one job:
    the LM limits become the ``optimas_fast.lm.Budget`` of the run's ``UsageLedger`` (``lm_budget()``; the ledger
    reserves the worst case before each LM request), ``max_metric_calls`` a ``optimize.budget.MetricCounter`` in
    front of the metric (charged before each scored run), ``max_seconds`` the wall clock checked at iteration
    boundaries. ``optimizers.base.OptimizerBudget`` is something else: per-call caps on one optimizer's search
    (candidates, inputs, rows), not a spending limit."""

    max_calls: int | None = None  # LM backend requests over the whole run (cache hits are free)
    max_tokens: int | None = None  # LM prompt + completion tokens over the whole run
    max_usd: float | None = None  # dollars over the whole run (hosted LMs; local models cost 0)
    max_seconds: float | None = None  # wall time; checked at iteration boundaries
    # metric calls over the whole run: runs of the system (or of the part downstream of a component) on one
    # example scored by the metric (rollouts, gate passes; GEPA's max_metric_calls); never exceeded
    max_metric_calls: int | None = None

    def validate(self, prefix: str = "budget.") -> None:
        """ConfigError naming the bad field as ``{prefix}{field}``."""
        for name in ("max_calls", "max_tokens", "max_usd", "max_seconds"):
            check_number(
                getattr(self, name),
                f"{prefix}{name}",
                min=0,
                finite=True,
                allow_none=True,
                none="null",
                error=ConfigError,
            )
        check_int(
            self.max_metric_calls, f"{prefix}max_metric_calls", min=1, allow_none=True, none="null", error=ConfigError
        )

    def lm_budget(self) -> Budget:
        """The LM part of these limits, as the ``UsageLedger``'s hard cap."""
        return Budget(max_calls=self.max_calls, max_tokens=self.max_tokens, max_usd=self.max_usd)


@dataclass
class OptimasConfig:
    """The Optimas loop's settings (``loop:`` in a run's YAML). The reward model's training settings (learning
    rates, pairs per step, replay) are not here: they are the model's ``TrainConfig`` (``reward.train:``), which the
    loop trains it with; the loop decides when and on how many pairs the LRF trains (epochs, steps)."""

    # every random draw of the run derives from it (no global RNG is touched); a run also seeds the reward model
    # (its initialisation, data order and replay draws) and, unless data.seed is given, the data split with it
    seed: int = 0
    iterations: int = 10  # loop iterations after the initial LRF training
    batch_size: int = 8  # training examples per iteration's fresh preference collection
    initial_examples: int | None = None  # examples per component for the initial pairs (None: all train)
    initial_epochs: int = 3  # epochs of the initial LRF training
    adapt_steps: int = 4  # LRF optimizer steps per iteration (online adaptation)
    selection_temperature: float = 0.1  # softmax temperature over preference gaps (lower: greedier)
    cooldown: int = 1  # a component picked at iteration t is not picked again before t + 1 + cooldown
    gap_ema: float = 0.5  # weight of the fresh gap in each component's running preference gap
    optimizer_inputs: int = 8  # stored inputs the optimizers score candidates on
    alignment_threshold: float = 0.55  # a head whose held-out pairwise accuracy falls below this is re-trained
    # ... or whose alignment (mean within-input Spearman rho between its scores and the measured global
    # rewards of held-out candidates) falls below this; None judges by accuracy only
    min_spearman: float | None = 0.1
    min_alignment_pairs: int = 4  # held-out pairs a head needs before the monitor judges it
    retrain_epochs: int = 2  # epochs of the re-training of a misaligned head on its stored pairs
    holdout_fraction: float = 0.2  # share of training examples whose pairs are held out for the monitor
    max_groups: int = 512  # stored candidate groups per component (FIFO)
    val_workers: int = 4  # threads of the validation evaluation
    # validation gate: None = accept any strictly higher mean; a number in (0.5, 1) = also require that a
    # paired bootstrap over the validation examples finds the change better in at least that share of
    # resamples (e.g. 0.9: guards small validation sets against noise-level "gains")
    gate_confidence: float | None = None
    components: list | None = None  # components to optimize (None: every component with a variable)
    collect: CollectConfig = field(default_factory=CollectConfig)  # preference collection
    prompt: PromptConfig = field(default_factory=PromptConfig)  # prompt optimizer
    choice: ChoiceConfig = field(default_factory=ChoiceConfig)  # choice optimizer
    weights: WeightsConfig = field(default_factory=WeightsConfig)  # weights optimizer
    budget: BudgetConfig = field(default_factory=BudgetConfig)  # stops the run at an iteration boundary

    def validate(self, prefix: str = "") -> None:
        """ConfigError naming the bad field as ``{prefix}{field}`` (a run's loader passes ``"loop."``)."""
        p = prefix

        def pos_int(name, lo=1):
            check_int(getattr(self, name), f"{p}{name}", min=lo, error=ConfigError)

        for name in ("iterations",):
            pos_int(name, 0)
        for name in (
            "batch_size",
            "initial_epochs",
            "adapt_steps",
            "optimizer_inputs",
            "retrain_epochs",
            "max_groups",
            "val_workers",
            "min_alignment_pairs",
        ):
            pos_int(name)
        pos_int("cooldown", 0)
        check_int(self.seed, f"{p}seed", error=ConfigError)
        if self.initial_examples is not None:
            pos_int("initial_examples")
        check_number(self.selection_temperature, f"{p}selection_temperature", gt=0, finite=True, error=ConfigError)
        check_number(self.gap_ema, f"{p}gap_ema", gt=0, max=1, error=ConfigError)
        check_number(self.alignment_threshold, f"{p}alignment_threshold", min=0, max=1, error=ConfigError)
        check_number(
            self.gate_confidence, f"{p}gate_confidence", min=0.5, lt=1, allow_none=True, none="null", error=ConfigError
        )
        check_number(
            self.min_spearman, f"{p}min_spearman", min=-1, max=1, allow_none=True, none="null", error=ConfigError
        )
        check_number(self.holdout_fraction, f"{p}holdout_fraction", min=0, lt=1, error=ConfigError)
        if self.components is not None and (
            not isinstance(self.components, list) or not all(isinstance(c, str) for c in self.components)
        ):
            raise ConfigError(f"{p}components must be a list of component names or null, got {self.components!r}")
        for sub in ("collect", "prompt", "choice", "weights"):
            try:
                getattr(self, sub).validate()
            except ValueError as exc:
                # the sections' own checks name their field with or without the section ("weights.lora_lr",
                # "num_candidates"): give every message the full key
                msg = str(exc)
                raise ConfigError(f"{p}{msg}" if msg.startswith(f"{sub}.") else f"{p}{sub}.{msg}") from None
        self.budget.validate(f"{p}budget.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str = "") -> OptimasConfig:
        for key in MOVED_KEYS:
            if isinstance(data, Mapping) and key in data:
                raise ConfigError(moved_key_message(f"{prefix}{key}", key))
        cfg = from_dict(cls, data or {}, prefix)
        cfg.validate(prefix)
        return cfg

    def to_dict(self) -> dict:
        return to_dict(self)


def _type_ok(value: Any, tp: Any) -> bool:
    """Loose check of a YAML value against a field's annotation (ints are fine for floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return is_number(value)
    if tp is int:
        return is_int(value)
    if tp in (str, bool):
        return isinstance(value, tp)
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """A ``cls`` dataclass from a dict: unknown keys and wrongly typed values raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(prefix + k) for k in unknown)}; allowed keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)}"
        )
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v if v is not None else {}, f"{prefix}{k}.")
        else:
            if not _type_ok(v, tp):
                raise ConfigError(f"{prefix}{k} must be of type {getattr(tp, '__name__', tp)}, got {v!r}")
            if isinstance(v, list) and (tp is tuple or typing.get_origin(tp) is tuple):
                v = tuple(v)  # YAML has lists only; a tuple field gets the tuple its code expects
            kwargs[k] = v
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
