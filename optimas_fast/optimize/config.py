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
from optimas_fast.optimizers.choice import ChoiceConfig
from optimas_fast.optimizers.prompt import PromptConfig
from optimas_fast.optimizers.weights import WeightsConfig
from optimas_fast.preference.collect import CollectConfig
from optimas_fast.reward.trainer import TrainConfig

__all__ = ["ConfigError", "BudgetConfig", "OptimasConfig", "from_dict", "to_dict"]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the allowed values."""


@dataclass
class BudgetConfig:
    max_calls: int | None = None  # LM backend requests over the whole run (cache hits are free)
    max_tokens: int | None = None  # LM prompt + completion tokens over the whole run
    max_usd: float | None = None  # dollars over the whole run (hosted LMs; local models cost 0)
    max_seconds: float | None = None  # wall time; checked at iteration boundaries
    # metric calls over the whole run: runs of the system (or of the part downstream of a component) on one
    # example scored by the metric (rollouts, gate passes; GEPA's max_metric_calls); never exceeded
    max_metric_calls: int | None = None

    def validate(self) -> None:
        for name in ("max_calls", "max_tokens", "max_usd", "max_seconds"):
            check_number(
                getattr(self, name),
                f"budget.{name}",
                min=0,
                finite=True,
                allow_none=True,
                none="null",
                error=ConfigError,
            )
        check_int(
            self.max_metric_calls, "budget.max_metric_calls", min=1, allow_none=True, none="null", error=ConfigError
        )


@dataclass
class OptimasConfig:
    seed: int = 0  # every random draw of the run derives from it (no global RNG is touched)
    iterations: int = 10  # loop iterations after the initial LRF training
    batch_size: int = 8  # training examples per iteration's fresh preference collection
    initial_examples: int | None = None  # examples per component for the initial pairs (None: all train)
    initial_epochs: int = 3  # epochs of the initial LRF training
    lr: float = TrainConfig.lr  # LRF backbone learning rate (heads use 20x unless head_lr is set); the engine's default
    head_lr: float | None = TrainConfig.head_lr  # LRF head learning rate; the engine's default (TrainConfig)
    batch_pairs: int = TrainConfig.batch_pairs  # pairs per LRF optimizer step; the engine's default (TrainConfig)
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

    def validate(self) -> None:
        def pos_int(name, lo=1):
            check_int(getattr(self, name), name, min=lo, error=ConfigError)

        for name in ("iterations",):
            pos_int(name, 0)
        for name in (
            "batch_size",
            "initial_epochs",
            "batch_pairs",
            "adapt_steps",
            "optimizer_inputs",
            "retrain_epochs",
            "max_groups",
            "val_workers",
            "min_alignment_pairs",
        ):
            pos_int(name)
        pos_int("cooldown", 0)
        check_int(self.seed, "seed", error=ConfigError)
        if self.initial_examples is not None:
            pos_int("initial_examples")
        for name in ("lr", "selection_temperature"):
            check_number(getattr(self, name), name, gt=0, finite=True, error=ConfigError)
        check_number(self.head_lr, "head_lr", gt=0, allow_none=True, none="null", error=ConfigError)
        check_number(self.gap_ema, "gap_ema", gt=0, max=1, error=ConfigError)
        check_number(self.alignment_threshold, "alignment_threshold", min=0, max=1, error=ConfigError)
        check_number(
            self.gate_confidence, "gate_confidence", min=0.5, lt=1, allow_none=True, none="null", error=ConfigError
        )
        check_number(self.min_spearman, "min_spearman", min=-1, max=1, allow_none=True, none="null", error=ConfigError)
        check_number(self.holdout_fraction, "holdout_fraction", min=0, lt=1, error=ConfigError)
        if self.components is not None and (
            not isinstance(self.components, list) or not all(isinstance(c, str) for c in self.components)
        ):
            raise ConfigError(f"components must be a list of component names or null, got {self.components!r}")
        for sub in ("collect", "prompt", "choice", "weights"):
            try:
                getattr(self, sub).validate()
            except ConfigError:
                raise
            except ValueError as exc:
                msg = str(exc)
                raise ConfigError(msg if msg.startswith(f"{sub}.") else f"{sub}.{msg}") from None
        self.budget.validate()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str = "") -> OptimasConfig:
        cfg = from_dict(cls, data or {}, prefix)
        cfg.validate()
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
            kwargs[k] = v
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
