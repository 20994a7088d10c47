"""A TRL-style face for the reward engine: ``RewardTrainer(model, args, train_dataset, eval_dataset)``.

    args = RewardConfig(output_dir="rm", per_device_train_batch_size=16, num_train_epochs=1)
    trainer = RewardTrainer(model="minilm", args=args, train_dataset=ds, eval_dataset=held_out)
    trainer.train()                       # checkpoint-N/ + trainer_state.json under output_dir, like TRL
    trainer.evaluate()                    # eval_loss, eval_accuracy, eval_margin (+ per component)
    trainer.save_model("rm/final")        # a RewardModel checkpoint (RewardModel.load reads it)

``optimas_fast.trl`` exports the two classes under TRL's names (``RewardConfig``, ``RewardTrainer``), so a TRL
script changes only its import line.

What matches TRL 1.16 / transformers' Trainer (same meaning, same defaults):
- the loss: mean(-log sigmoid(r+ - r- - margin)) (+ center_rewards_coefficient * mean((r+ + r-)^2)), margin
  only when the data has a ``margin`` column; uniform pair weights; one learning rate for backbone and heads;
- the LR schedule: transformers' ``get_{constant,linear,cosine}_schedule_with_warmup`` formulas (schedules.py),
  evaluated per optimizer step (warm-up from 0 at step 0, decay to 0 at the last step);
- AdamW (betas 0.9/0.999, eps 1e-8), grad-norm clipping at ``max_grad_norm``, pairs longer than
  ``max_length`` dropped before batching (so the step count is TRL's), dropout off (``disable_dropout``);
- steps: global batch = per_device_train_batch_size * gradient_accumulation_steps pairs (one process);
  steps per epoch = ceil(pairs / global batch); total = max_steps if > 0 else ceil(num_train_epochs * that);
- the output directory: ``checkpoint-N/`` (here: the reward checkpoint + ``trainer_state.json``), logging /
  eval / save by "steps" or "epoch", a final save at the last step, ``save_total_limit`` rotation that keeps the
  newest and the best checkpoint, ``load_best_model_at_end`` with ``metric_for_best_model`` (default "loss").

The text, as TRL tokenises it: TRL-format data (prompt/chosen/rejected) is rendered as prompt + response with
the EOS token appended (``TemplateConfig.append_eos``, on by default for such data on a decoder whose tokenizer
has an EOS; ``RewardTrainer(append_eos=False)`` turns it off), so a decoder's score is read at the EOS, as TRL's
*ForSequenceClassification does; the EOS counts toward ``max_length``, as in TRL's length filter.

What differs (on purpose): the engine renders each row with its template (component description + inputs
as the prefix, the response as the suffix; decoders encode a shared prompt once), pools like the engine
(decoders: last token, as HF's *ForSequenceClassification; encoders: mean pooling, where HF's BERT uses the
tanh pooler), ``bf16=None`` means the engine's default (bf16 on CUDA, as TRL, and on CPUs with native bf16 matmul),
a data set with a ``component`` column trains one head per component (TRL allows one), and ``eval_accuracy``
counts a tie (r+ == r-) as one half, TRL's as wrong (``metrics.pair_metrics``: the package's one definition). Any
argument that is not implemented is a TypeError that lists the supported ones: nothing is silently ignored.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from optimas_fast._io import atomic_write_text, fsync_dir
from optimas_fast._validate import is_int, is_number
from optimas_fast.backbones import resolve_backbone

from . import schedules
from .data import PreferencePair, as_pairs, pair_weights
from .formats import PairSet, load_pairs
from .model import RewardModel, RewardModelConfig
from .rows import Rows
from .template import TemplateConfig
from .trainer import PairBatch, TrainConfig, pair_rows

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
STRATEGIES = ("no", "steps", "epoch")
OVERLONG = ("drop", "truncate_prefix", "error")


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class RewardConfig:
    """TRL ``RewardConfig`` / transformers ``TrainingArguments`` names for what reward training needs, as one
    plain dataclass (the same kind of object as TRL's): an unknown keyword is Python's own TypeError naming it,
    ``from_dict`` also lists the supported names, every value is checked in ``__post_init__``.

    Defaults are TRL 1.16's (which overrides transformers 5's for learning_rate, logging_steps, bf16). Not to be
    confused with the engine's ``optimas_fast.reward.RewardModelConfig`` (template, pooling, scoring)."""

    output_dir: str | None = None  # where checkpoint-N/ go (TRL: "<model name>-Reward" when args is None)
    per_device_train_batch_size: int = 8  # pairs per micro-batch (transformers default 8)
    per_device_eval_batch_size: int = 8  # pairs per evaluation batch (scoring is scheduled by tokens anyway)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (run as one batch: same gradient)
    learning_rate: float = 1e-4  # peak AdamW learning rate, backbone and heads alike (TRL 1.16 default 1e-4)
    num_train_epochs: float = 3.0  # passes over the data (fractional allowed, as in transformers)
    max_steps: int = -1  # > 0: total optimizer steps, overriding num_train_epochs
    lr_scheduler_type: str = "linear"  # constant | constant_with_warmup | linear | cosine (transformers formulas)
    warmup_ratio: float = 0.0  # transformers 4 name: warm-up steps = ceil(ratio * total steps)
    warmup_steps: float = 0  # int >= 1: steps; float in [0, 1): a ratio of the total (transformers 5 meaning)
    weight_decay: float = 0.0  # AdamW decoupled weight decay (backbone; heads get none)
    max_grad_norm: float | None = 1.0  # global grad-norm clip; 0 or None disables it
    max_length: int | None = 1024  # longest row (prompt + response) in tokens; longer pairs are dropped (TRL)
    center_rewards_coefficient: float | None = None  # lambda of lambda * mean((r+ + r-)^2); None = off
    disable_dropout: bool = True  # dropout off in the backbone (TRL default True)
    bf16: bool | None = None  # bf16 autocast training; None = the engine's (bf16 on CUDA / native-bf16 CPUs)
    seed: int = 42  # head initialisation and data order
    logging_steps: float = 10  # log the mean train loss every N steps (float < 1: ratio of total steps)
    eval_strategy: str = "no"  # "no" | "steps" | "epoch"
    eval_steps: float | None = None  # for "steps": every N steps (None: logging_steps; float < 1: ratio)
    save_strategy: str = "steps"  # "no" | "steps" | "epoch"; "steps" also saves at the last step
    save_steps: float = 500  # for "steps": every N steps (float < 1: ratio of total steps)
    save_total_limit: int | None = None  # keep at most N checkpoints (the newest and the best always stay)
    load_best_model_at_end: bool = False  # load the best checkpoint's weights when training ends
    metric_for_best_model: str | None = None  # e.g. "loss" / "accuracy" ("eval_" prefix optional)
    greater_is_better: bool | None = None  # None: False for metrics ending in "loss", else True
    report_to: str | list[str] | None = "none"  # "none" | "tensorboard" (transformers 5 default "none")
    logging_dir: str | None = None  # tensorboard event files (None: <output_dir>/runs)
    disable_tqdm: bool | None = None  # no progress bar (None: a bar on stderr, as transformers)

    def __post_init__(self):
        _check_args(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> RewardConfig:
        """From a mapping of TRL names (a YAML file's, a saved training_args.json's): an unknown name is a
        TypeError naming it and listing the supported ones."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in settings if k not in names]
        if unknown:
            raise TypeError(
                f"RewardConfig got unsupported argument(s) {', '.join(map(repr, unknown))}; supported "
                f"(TRL RewardConfig names): {', '.join(names)}"
            )
        return cls(**settings)


# a NaN or infinite setting is a mistake: every number here must be finite
_is_num = functools.partial(is_number, finite=True)


def _check_args(a: RewardConfig) -> None:
    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ValueError(f"RewardConfig.{name} must be {what}, got {getattr(a, name)!r}")

    need(a.output_dir is None or isinstance(a.output_dir, (str, os.PathLike)), "output_dir", "a path or None")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(is_int(getattr(a, name)) and getattr(a, name) >= 1, name, "an int >= 1")
    need(_is_num(a.learning_rate) and a.learning_rate > 0, "learning_rate", "a positive finite number")
    need(_is_num(a.num_train_epochs) and a.num_train_epochs > 0, "num_train_epochs", "a number > 0")
    need(is_int(a.max_steps) and (a.max_steps == -1 or a.max_steps >= 1), "max_steps", "-1 or an int >= 1")
    need(a.lr_scheduler_type in schedules.SCHEDULES, "lr_scheduler_type", f"one of {list(schedules.SCHEDULES)}")
    need(_is_num(a.warmup_ratio) and 0 <= a.warmup_ratio <= 1, "warmup_ratio", "a number in [0, 1]")
    need(
        _is_num(a.warmup_steps) and a.warmup_steps >= 0 and (a.warmup_steps < 1 or float(a.warmup_steps).is_integer()),
        "warmup_steps",
        "an int >= 0 or a ratio in [0, 1)",
    )
    if a.warmup_ratio > 0 and a.warmup_steps > 0:
        raise ValueError(
            f"RewardConfig: warmup_ratio={a.warmup_ratio!r} and warmup_steps={a.warmup_steps!r} both set; give one"
        )
    if a.lr_scheduler_type == "constant" and (a.warmup_ratio > 0 or a.warmup_steps > 0):
        # transformers' "constant" ignores warm-up; ignoring it silently here would be worse
        raise ValueError(
            "RewardConfig.lr_scheduler_type='constant' has no warm-up (as in transformers): "
            "use 'constant_with_warmup' or set warmup_steps / warmup_ratio to 0"
        )
    need(_is_num(a.weight_decay) and a.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(
        a.max_grad_norm is None or (_is_num(a.max_grad_norm) and a.max_grad_norm >= 0),
        "max_grad_norm",
        "None or a finite number >= 0",
    )
    need(a.max_length is None or (is_int(a.max_length) and a.max_length >= 4), "max_length", "None or an int >= 4")
    need(
        a.center_rewards_coefficient is None
        or (_is_num(a.center_rewards_coefficient) and a.center_rewards_coefficient >= 0),
        "center_rewards_coefficient",
        "None or a finite number >= 0",
    )
    for name in ("disable_dropout", "load_best_model_at_end"):
        need(isinstance(getattr(a, name), bool), name, "a bool")
    for name in ("bf16", "greater_is_better", "disable_tqdm"):
        need(getattr(a, name) is None or isinstance(getattr(a, name), bool), name, "a bool or None")
    need(is_int(a.seed), "seed", "an int")
    for name in ("logging_steps", "save_steps"):
        v = getattr(a, name)
        need(_is_num(v) and v > 0 and (v < 1 or float(v).is_integer()), name, "an int >= 1 or a ratio in (0, 1)")
    need(
        a.eval_steps is None
        or (_is_num(a.eval_steps) and a.eval_steps > 0 and (a.eval_steps < 1 or float(a.eval_steps).is_integer())),
        "eval_steps",
        "None, an int >= 1 or a ratio in (0, 1)",
    )
    for name in ("eval_strategy", "save_strategy"):
        need(getattr(a, name) in STRATEGIES, name, f"one of {list(STRATEGIES)}")
    need(
        a.save_total_limit is None or (is_int(a.save_total_limit) and a.save_total_limit >= 1),
        "save_total_limit",
        "None or an int >= 1",
    )
    need(
        a.metric_for_best_model is None or isinstance(a.metric_for_best_model, str),
        "metric_for_best_model",
        "a metric name or None",
    )
    need(a.logging_dir is None or isinstance(a.logging_dir, (str, os.PathLike)), "logging_dir", "a path or None")
    reports = [a.report_to] if isinstance(a.report_to, str) or a.report_to is None else a.report_to
    need(
        isinstance(reports, (list, tuple)) and all(r in (None, "none", "tensorboard") for r in reports),
        "report_to",
        "'none', 'tensorboard' or a list of those (other integrations are not implemented)",
    )
    if a.load_best_model_at_end:
        if a.eval_strategy == "no" or a.eval_strategy != a.save_strategy:
            raise ValueError(
                "RewardConfig.load_best_model_at_end requires eval_strategy and save_strategy "
                f"to match and not be 'no', got eval_strategy={a.eval_strategy!r}, "
                f"save_strategy={a.save_strategy!r}"
            )
        ev = a.eval_steps if a.eval_steps is not None else a.logging_steps
        if a.eval_strategy == "steps" and (a.save_steps >= 1) == (ev >= 1) and a.save_steps >= 1 and a.save_steps % ev:
            raise ValueError(
                f"RewardConfig.load_best_model_at_end requires save_steps ({a.save_steps}) to be "
                f"a multiple of eval_steps ({ev})"
            )
    if a.metric_for_best_model is None and a.load_best_model_at_end:
        a.metric_for_best_model = "loss"  # transformers' default
    if a.greater_is_better is None and a.metric_for_best_model is not None:
        a.greater_is_better = not a.metric_for_best_model.endswith("loss")


def _steps_of(v: float, total: int) -> int:
    """An interval given as steps (>= 1) or as a ratio of the total (< 1), as transformers reads it."""
    return int(v) if v >= 1 else max(1, math.ceil(total * v))


def warmup_steps_of(args: RewardConfig, total: int) -> int:
    """transformers' get_warmup_steps (warmup_steps: int or ratio) plus the transformers-4 warmup_ratio."""
    if args.warmup_steps > 0 or args.warmup_ratio == 0:
        return schedules.warmup_steps_of(args.warmup_steps, total)
    return math.ceil(total * args.warmup_ratio)


# ------------------------------------------------------------------------------------------------ data
def to_pairs(
    source: Any,
    what: str,
    tokenizer: Any = None,
    components: Any = None,
    data_format: str = "auto",
    component: str | None = None,
) -> PairSet:
    """A PairSet from PreferencePairs / tuples (the engine's own pairs), a PairSet, a ``datasets.Dataset`` /
    ``DatasetDict``, rows, or files / folders (``formats.load_pairs``: TRL, reference-Optimas, own format)."""
    if source is None:
        raise ValueError(f"{what} is required")
    if isinstance(source, PairSet):
        return source
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (PreferencePair, tuple, list)):
        pairs = as_pairs(source, what)
        return PairSet(pairs, {p.component: p.component for p in pairs}, margin_kind="weight")
    return load_pairs(source, format=data_format, components=components, tokenizer=tokenizer, component=component)


def _tokenizer_of(model: Any) -> Any:
    """The tokenizer that goes with ``model`` (a RewardModel, or a backbone name / local directory)."""
    if isinstance(model, RewardModel):
        return model.encoder.tokenizer
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoTokenizer  # heavy optional import, only when a path is given

        path = resolve_backbone(model, where="RewardTrainer: model")
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return None


def filter_overlong(
    model: RewardModel,
    pairs: Sequence[PreferencePair],
    max_length: int | None,
    policy: str = "drop",
    what: str = "train_dataset",
) -> tuple[list[PreferencePair], int, int]:
    """(kept pairs, n dropped, n truncated). A row's length is its full template length (prefix + suffix,
    special tokens). drop: a pair with a row over ``max_length`` is left out (TRL filters so); truncate_prefix:
    the template shortens the prefix (counted); error: ValueError naming the pair."""
    if policy not in OVERLONG:
        raise ValueError(f"overlong must be one of {list(OVERLONG)}, got {policy!r}")
    if max_length is None:
        return list(pairs), 0, 0
    kept, dropped, truncated = [], 0, 0
    for i, p in enumerate(pairs):
        over, cut = 0, False
        for side in (p.chosen, p.rejected):
            try:
                t = model.tokenise(p.component, p.inputs, side)
            except ValueError as e:  # the response alone does not fit: never truncated
                if policy == "drop":
                    over = max(over, max_length + 1)
                    continue
                raise ValueError(f"{what} pair {i} (component {p.component!r}): {e}") from None
            n = len(t.prefix) + len(t.suffix) + t.truncated
            over = max(over, n)
            cut = cut or t.truncated > 0
        if over > max_length:
            if policy == "drop":
                dropped += 1
                continue
            if policy == "error":
                raise ValueError(
                    f"{what} pair {i} (component {p.component!r}): a row is {over} tokens > max_length="
                    f"{max_length} (overlong='error')"
                )
        truncated += int(cut and policy == "truncate_prefix")
        kept.append(p)
    return kept, dropped, truncated


# ------------------------------------------------------------------------------------------------ trainer
class TrainOutput(NamedTuple):
    global_step: int
    training_loss: float
    metrics: dict


class RewardTrainer:
    """TRL's RewardTrainer API over the engine (see the module docstring for what matches TRL).

    Args:
        model: a backbone ("minilm" or a local Hugging Face directory), a Hugging Face model object (a base
            model, or a *ForSequenceClassification whose base model is used and whose score layer is replaced by
            the engine's heads) with its tokenizer as ``processing_class``, or an existing ``RewardModel``.
        args: RewardConfig (None: defaults with output_dir "<model name>-Reward", as TRL).
        train_dataset / eval_dataset: a ``datasets.Dataset`` (TRL columns prompt/chosen/rejected[/margin],
            optional ``component``), a DatasetDict / path for the formats loader, or PreferencePairs.
        processing_class: the tokenizer (required with a model object).
        components: (ours) component name -> description, for the heads' template prefix.
        overlong: (ours) pairs longer than max_length: "drop" (TRL), "truncate_prefix" (the engine's way) or "error".
        data_format: (ours) the formats loader's ``format`` ("auto" | "trl" | "optimas" | "pairs").
        append_eos: (ours) end each row with the tokenizer's EOS (``TemplateConfig.append_eos``; decoders only).
            None (default): TRL's behaviour, i.e. on for TRL-format data (prompt + response text) on a decoder
            whose tokenizer has an EOS, off otherwise. True / False: as given (for an existing ``RewardModel``
            too, which otherwise keeps its own template).
    """

    def __init__(
        self,
        model: Any = None,
        args: RewardConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        components: Mapping[str, str] | None = None,
        overlong: str = "drop",
        data_format: str = "auto",
        append_eos: bool | None = None,
        **unsupported,
    ):
        if unsupported:
            raise TypeError(
                f"RewardTrainer got unsupported argument(s) {', '.join(map(repr, unsupported))}; "
                "supported: model, args, train_dataset, eval_dataset, processing_class, components, "
                "overlong, data_format, append_eos"
            )
        if append_eos is not None and not isinstance(append_eos, bool):
            raise TypeError(f"RewardTrainer: append_eos must be True, False or None, got {append_eos!r}")
        if model is None:
            raise ValueError("RewardTrainer: model is required (a backbone name/path, a model object or a RewardModel)")
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = RewardConfig(output_dir=f"{os.path.basename(os.path.normpath(name))}-Reward")
        if not isinstance(args, RewardConfig):
            raise TypeError(
                f"RewardTrainer: args must be a RewardConfig (optimas_fast.trl.RewardConfig), got {type(args).__name__}"
            )
        if overlong not in OVERLONG:
            raise ValueError(f"RewardTrainer: overlong must be one of {list(OVERLONG)}, got {overlong!r}")
        if train_dataset is None:
            raise ValueError("RewardTrainer: train_dataset is required")
        self.args = args
        self.overlong = overlong
        self.output_dir = os.fspath(args.output_dir) if args.output_dir is not None else "reward-trainer-output"
        # the tokenizer first: the loaders split implicit prompts on whole tokens and render chat rows with it
        tok = processing_class if processing_class is not None else _tokenizer_of(model)
        self._raw_train = to_pairs(train_dataset, "train_dataset", tok, components, data_format)
        self._raw_eval = (
            to_pairs(eval_dataset, "eval_dataset", tok, components, data_format) if eval_dataset is not None else None
        )
        # TRL's margin column is subtracted with uniform weights; Optimas / own margins weight pairs (the
        # reference's way); data without margins trains with uniform weights and no margin (TRL)
        self.margin_kind = self._raw_train.margin_kind
        self.subtract_margin = self.margin_kind == "subtract"
        descriptions = dict(self._raw_train.components)
        for c, d in self._raw_eval.components.items() if self._raw_eval is not None else ():
            descriptions.setdefault(c, d)
        self.prefix_format = self._raw_train.prefix_format
        # TRL appends EOS to prompt + response; only its own format has that text (the engine's component
        # template is ours), and only a tokenizer with an EOS can (no warning for the ones without)
        self.append_eos = (
            append_eos
            if append_eos is not None
            else (self.prefix_format == "{inputs}" and getattr(tok, "eos_token_id", None) is not None)
        )
        self._append_eos_given = append_eos is not None
        self.model = self._build_model(model, processing_class, descriptions)
        template = self.model.encoder.config.template
        if self.model.encoder.is_encoder and template.append_eos and not self._append_eos_given:
            template.append_eos = False  # encoders end with SEP: record what the rows are
        self.append_eos = self.model.encoder.tokens.appends_eos  # what the rows get
        self.processing_class = self.model.encoder.tokenizer
        self.train_pairs, self.pairs_dropped, self.pairs_truncated = filter_overlong(
            self.model, self._raw_train, args.max_length, overlong, "train_dataset"
        )
        if not self.train_pairs:
            raise ValueError(
                f"train_dataset: all {len(self._raw_train)} pairs are longer than max_length={args.max_length} tokens"
            )
        if self.pairs_dropped:
            logger.warning(
                "train_dataset: dropped %d of %d pairs longer than max_length=%s tokens",
                self.pairs_dropped,
                len(self._raw_train),
                args.max_length,
            )
        self.eval_pairs = None
        self.eval_dropped = 0
        if self._raw_eval is not None:
            self.eval_pairs, self.eval_dropped, _ = filter_overlong(
                self.model, self._raw_eval, args.max_length, overlong, "eval_dataset"
            )
        if args.eval_strategy != "no" and not self.eval_pairs:
            raise ValueError(f"RewardConfig.eval_strategy={args.eval_strategy!r} needs an eval_dataset")
        self.state = self._fresh_state()
        self._tb = None  # tensorboard writer, made on the first log when report_to has "tensorboard"
        self._order: tuple[int | None, list[int]] = (None, [])  # (epoch, its pair order), cached

    # --------------------------------------------------------------------------------------- building
    def _engine_config(self) -> RewardModelConfig:
        a = self.args
        template = TemplateConfig()
        if a.max_length is not None:
            template.max_length = a.max_length
        if self.prefix_format is not None:  # TRL rows: the prompt alone is the prefix, as TRL tokenises it
            template.prefix_format = self.prefix_format
        template.append_eos = self.append_eos
        amp = "auto" if a.bf16 is None else ("bf16" if a.bf16 else "none")
        return RewardModelConfig(template=template, disable_dropout=a.disable_dropout, amp=amp, seed=a.seed)

    def _build_model(self, model: Any, processing_class: Any, descriptions: dict[str, str]) -> RewardModel:
        a = self.args
        if isinstance(model, RewardModel):
            for c, d in descriptions.items():
                if c not in model.encoder.components:
                    logger.info("RewardTrainer: adding a head for component %r", c)
                    model.add_component(c, d)
            if a.max_length is not None:  # rows follow args.max_length, as they would in TRL
                model.encoder.config.template.max_length = a.max_length
            if self._append_eos_given:  # otherwise the model keeps the layout it was trained with
                model.encoder.config.template.append_eos = self.append_eos
            if self.prefix_format is not None and model.encoder.config.template.prefix_format != self.prefix_format:
                logger.warning(
                    "RewardTrainer: the model's template prefix %r differs from the data's %r; rows "
                    "are rendered with the model's",
                    model.encoder.config.template.prefix_format,
                    self.prefix_format,
                )
            if a.bf16 is not None:
                model.encoder.config.amp = "bf16" if a.bf16 else "none"
            if a.disable_dropout:
                for m in model.encoder.net.modules():
                    if isinstance(m, nn.Dropout):
                        m.p = 0.0
            return model
        if isinstance(model, nn.Module):
            base = getattr(model, "base_model", model)
            if base is not model:
                logger.warning(
                    "RewardTrainer: %s's score layer is replaced by the engine's per-component heads "
                    "(new, initialised with std %.3g)",
                    type(model).__name__,
                    RewardModelConfig().head_init_std,
                )
            if processing_class is None:
                raise ValueError("RewardTrainer: processing_class (the tokenizer) is required with a model object")
            model = base
        elif not isinstance(model, (str, os.PathLike)):
            raise TypeError(
                "RewardTrainer: model must be a backbone name/path, a Hugging Face model or a RewardModel, "
                f"got {type(model).__name__}"
            )
        else:
            model = os.fspath(model)
        torch.manual_seed(self.args.seed)  # as TRL's set_seed before building the model
        return RewardModel(model, descriptions, tokenizer=processing_class, config=self._engine_config())

    # ------------------------------------------------------------------------------------------ state
    def _fresh_state(self) -> dict:
        return {
            "global_step": 0,
            "epoch": 0.0,
            "max_steps": 0,
            "num_train_epochs": self.args.num_train_epochs,
            "logging_steps": None,
            "eval_steps": None,
            "save_steps": None,
            "train_batch_size": self.args.per_device_train_batch_size,
            "best_metric": None,
            "best_global_step": None,
            "best_model_checkpoint": None,
            "log_history": [],
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "total_flos": 0,
            "optimas_fast": {"loss_sum": 0.0, "pairs_seen": 0, "train_seconds": 0.0},
        }

    @property
    def global_batch(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    def plan(self) -> dict:
        """Steps per epoch, total steps and warm-up steps for the current data and arguments."""
        spe = math.ceil(len(self.train_pairs) / self.global_batch)
        total = self.args.max_steps if self.args.max_steps > 0 else math.ceil(self.args.num_train_epochs * spe)
        return {"steps_per_epoch": spe, "max_steps": total, "warmup_steps": warmup_steps_of(self.args, total)}

    def learning_rate_at(self, step: int) -> float:
        p = self.plan()
        return self.args.learning_rate * schedules.lr_factor(
            self.args.lr_scheduler_type, step, p["warmup_steps"], p["max_steps"]
        )

    def _epoch_order(self, epoch: int) -> list[int]:
        # a permutation per epoch from (seed, epoch) alone: a resumed run sees the same batches
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.train_pairs), generator=g).tolist())
        return self._order[1]

    def _batch(self, step: int, spe: int, rows: Rows) -> PairBatch:
        """The pairs of optimizer step ``step`` as the loss sees them (TRL's: uniform weights, the margin column
        subtracted; reference-Optimas / own margins weight the pairs instead)."""
        epoch, k = divmod(step, spe)
        idx = np.asarray(self._epoch_order(epoch)[k * self.global_batch : (k + 1) * self.global_batch])  # (b,)
        margins = [self.train_pairs[i].margin for i in idx]
        n = len(self.train_pairs)
        if self.margin_kind == "weight":
            # the engine's margin weighting, normalised by this batch's mean margin, floored as TrainConfig's default
            weights = pair_weights(margins, TrainConfig.margin_floor, float(np.mean(margins)))
        else:
            weights = [1.0] * len(idx)
        return PairBatch(
            rows.take(np.concatenate([idx, idx + n])),
            weights,
            margins if self.subtract_margin else None,
            self.args.center_rewards_coefficient or 0.0,
        )

    # ----------------------------------------------------------------------------------------- train
    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> TrainOutput:
        """Train to max_steps (or num_train_epochs); ``resume_from_checkpoint``: True (the last checkpoint in
        output_dir) or a checkpoint directory: weights, optimizer moments, step and log history continue."""
        a = self.args
        p = self.plan()
        spe, total, warm = p["steps_per_epoch"], p["max_steps"], p["warmup_steps"]
        if resume_from_checkpoint:
            path = (
                last_checkpoint(self.output_dir)
                if resume_from_checkpoint is True
                else os.fspath(resume_from_checkpoint)
            )
            if path is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no valid checkpoint found in output_dir {self.output_dir}"
                )
            self._load_checkpoint(path)
        else:
            self.state = self._fresh_state()
        st = self.state
        st.update(
            max_steps=total,
            logging_steps=_steps_of(a.logging_steps, total),
            eval_steps=_steps_of(a.eval_steps if a.eval_steps is not None else a.logging_steps, total),
            save_steps=_steps_of(a.save_steps, total),
            train_batch_size=a.per_device_train_batch_size,
        )
        os.makedirs(self.output_dir, exist_ok=True)
        extra = st["optimas_fast"]
        clip = a.max_grad_norm if a.max_grad_norm else None
        rows = pair_rows(self.model.encoder, self.train_pairs)  # every pair tokenised once, in batched calls
        logged_loss, logged_n = 0.0, 0
        t_start = time.perf_counter()
        start_step = st["global_step"]
        bar = self._progress(total, start_step)
        try:
            for step in range(start_step, total):
                batch = self._batch(step, spe, rows)
                lr = a.learning_rate * schedules.lr_factor(a.lr_scheduler_type, step, warm, total)
                rep = self.model.trainer.step(batch, lr, head_lr=lr, weight_decay=a.weight_decay, max_grad_norm=clip)
                dt, loss = rep.seconds, rep.loss
                st["global_step"] = step + 1
                st["epoch"] = (step + 1) / spe
                extra["loss_sum"] += loss
                extra["pairs_seen"] += rep.pairs
                extra["train_seconds"] += dt
                logged_loss, logged_n = logged_loss + loss, logged_n + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{rep.pairs / dt:.1f}", refresh=False)
                done = step + 1
                end_of_epoch = done % spe == 0
                if done % st["logging_steps"] == 0 or done == total:
                    # transformers' log entry: the interval's mean loss, the last step's grad norm and lr
                    self._log(
                        {
                            "loss": logged_loss / logged_n,
                            "grad_norm": rep.grad_norm,
                            "learning_rate": lr,
                            "epoch": st["epoch"],
                            "step": done,
                        }
                    )
                    logged_loss, logged_n = 0.0, 0
                metrics = None
                if (a.eval_strategy == "steps" and (done % st["eval_steps"] == 0 or done == total)) or (
                    a.eval_strategy == "epoch" and end_of_epoch
                ):
                    metrics = self.evaluate()
                if (a.save_strategy == "steps" and (done % st["save_steps"] == 0 or done == total)) or (
                    a.save_strategy == "epoch" and end_of_epoch
                ):
                    self._save_checkpoint(metrics)
        finally:
            if bar is not None:
                bar.close()
        run_seconds = time.perf_counter() - t_start
        if a.load_best_model_at_end and st["best_model_checkpoint"] and os.path.isdir(st["best_model_checkpoint"]):
            logger.info(
                "loading the best checkpoint %s (%s=%s)",
                st["best_model_checkpoint"],
                a.metric_for_best_model,
                st["best_metric"],
            )
            self.model.load_state(st["best_model_checkpoint"])
        steps = max(1, st["global_step"])
        train_loss = extra["loss_sum"] / steps
        done_here = st["global_step"] - start_step  # steps of this call (a resumed run did the rest before)
        metrics = {
            "train_runtime": run_seconds,  # transformers' meaning: this call's wall time, evals and saves in
            "train_samples_per_second": done_here * self.global_batch / max(run_seconds, 1e-9),
            "train_steps_per_second": done_here / max(run_seconds, 1e-9),
            "train_loss": train_loss,
            "epoch": st["epoch"],
            "pairs_used": len(self.train_pairs),
            "pairs_dropped": self.pairs_dropped,
            "pairs_truncated": self.pairs_truncated,
            "steps": st["global_step"],
            # ours: pairs per second of optimizer steps alone (no evaluation, no checkpoint writes)
            "pairs_per_s": extra["pairs_seen"] / max(extra["train_seconds"], 1e-9),
            # the last logged interval's mean loss (what TRL's log shows last)
            "final_loss": next((h["loss"] for h in reversed(st["log_history"]) if "loss" in h), train_loss),
        }
        self._log(
            {"train_runtime": run_seconds, "train_loss": train_loss, "epoch": st["epoch"], "step": st["global_step"]}
        )
        if self._tb is not None:
            self._tb.flush()
        return TrainOutput(st["global_step"], train_loss, metrics)

    def _progress(self, total: int, start: int):
        if self.args.disable_tqdm:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=start, desc="reward train", unit="step", dynamic_ncols=True)

    def _log(self, entry: dict) -> None:
        self.state["log_history"].append(entry)
        logger.info("%s", entry)
        if self._reports_tensorboard():
            writer = self._writer()
            step = entry.get("step", self.state["global_step"])
            for k, v in entry.items():
                if k in ("step", "epoch") or not isinstance(v, (int, float)):
                    continue
                tag = f"eval/{k[len('eval_') :]}" if k.startswith("eval_") else f"train/{k}"
                writer.add_scalar(tag, v, step)

    def _reports_tensorboard(self) -> bool:
        r = self.args.report_to
        return r == "tensorboard" or (isinstance(r, (list, tuple)) and "tensorboard" in r)

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (test extra)

            self._tb = SummaryWriter(log_dir=os.fspath(self.args.logging_dir or os.path.join(self.output_dir, "runs")))
        return self._tb

    # -------------------------------------------------------------------------------------- evaluate
    def evaluate(self, eval_dataset: Any = None, metric_key_prefix: str = "eval") -> dict:
        """TRL's eval metrics (``<prefix>_loss``, ``_accuracy``, ``_margin``; ours: ``_n`` and, with several
        components, ``<prefix>_<component>_accuracy`` / ``_margin`` / ``_loss``), logged into the history."""
        if eval_dataset is not None:
            loaded = to_pairs(eval_dataset, "eval_dataset", self.model.tokenizer)
            pairs, _, _ = filter_overlong(self.model, loaded, self.args.max_length, self.overlong, "eval_dataset")
            margin = loaded.margin_kind == "subtract"
        else:
            if not self.eval_pairs:
                raise ValueError("RewardTrainer.evaluate: no eval_dataset given here or at construction")
            pairs, margin = self.eval_pairs, self._raw_eval.margin_kind == "subtract"
        t0 = time.perf_counter()
        m = self.model.evaluate(pairs, subtract_margin=margin, center=self.args.center_rewards_coefficient or 0.0)
        p = metric_key_prefix
        out = {
            f"{p}_loss": m["loss"],
            f"{p}_accuracy": m["accuracy"],
            f"{p}_margin": m["margin"],
            f"{p}_n": m["n_pairs"],
        }
        if len(m["per_component"]) > 1:
            for c, cm in m["per_component"].items():
                out.update(
                    {f"{p}_{c}_accuracy": cm["accuracy"], f"{p}_{c}_margin": cm["margin"], f"{p}_{c}_loss": cm["loss"]}
                )
        out[f"{p}_runtime"] = time.perf_counter() - t0
        out["epoch"] = self.state["epoch"]
        self._log({**out, "step": self.state["global_step"]})
        return out

    # ------------------------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """The reward checkpoint (weights, heads, tokenizer, config; ``RewardModel.load`` reads it)."""
        out = os.fspath(output_dir) if output_dir is not None else self.output_dir
        self.model.save(out)
        atomic_write_text(os.path.join(out, TRAINING_ARGS_NAME), json.dumps(self.args.to_dict(), indent=2, default=str))

    def _metric_value(self, metrics: dict | None) -> float | None:
        name = self.args.metric_for_best_model
        if metrics is None or name is None:
            return None
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            raise KeyError(
                f"metric_for_best_model={name!r}: the evaluation has no {key!r}; available: "
                f"{sorted(k for k in metrics if k.startswith('eval_'))}"
            )
        return float(metrics[key])

    def _save_checkpoint(self, metrics: dict | None) -> str:
        st = self.state
        name = f"{PREFIX_CHECKPOINT_DIR}-{st['global_step']}"
        final = os.path.join(self.output_dir, name)
        value = self._metric_value(metrics)
        if value is not None:
            better = st["best_metric"] is None or (
                value > st["best_metric"] if self.args.greater_is_better else value < st["best_metric"]
            )
            if better:
                st.update(best_metric=value, best_global_step=st["global_step"], best_model_checkpoint=final)
        # written under a temporary name and renamed whole: a kill leaves the previous checkpoints intact
        tmp = os.path.join(self.output_dir, f".{name}.tmp")
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        self.save_model(tmp)
        atomic_write_text(os.path.join(tmp, TRAINER_STATE_NAME), json.dumps(st, indent=2))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.output_dir)
        self._rotate()
        return final

    def _rotate(self) -> None:
        limit = self.args.save_total_limit
        if limit is None:
            return
        ckpts = sorted_checkpoints(self.output_dir)
        protected = {ckpts[-1]} if ckpts else set()
        best = self.state["best_model_checkpoint"]
        if best is not None:
            protected.add(os.path.normpath(best))
        keep = max(limit, len(protected))
        for path in ckpts:
            if len(ckpts) <= keep:
                break
            if path in protected:
                continue
            logger.info("deleting older checkpoint %s (save_total_limit=%d)", path, limit)
            shutil.rmtree(path, ignore_errors=True)
            ckpts = [c for c in ckpts if c != path]

    def _load_checkpoint(self, path: str) -> None:
        state_file = os.path.join(path, TRAINER_STATE_NAME)
        if not os.path.isfile(state_file):
            raise ValueError(
                f"resume_from_checkpoint: {path} has no {TRAINER_STATE_NAME}: not a RewardTrainer checkpoint"
            )
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        self.model.load_state(path)
        fresh = self._fresh_state()
        fresh.update(state)
        self.state = fresh
        logger.info("resumed from %s at step %d", path, self.state["global_step"])


def sorted_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint-N directories (with trainer_state.json), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            found.append((int(m.group(1)), os.path.normpath(path)))
    return [p for _, p in sorted(found)]


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint in ``output_dir`` (None if there is none), as transformers'
    get_last_checkpoint."""
    ckpts = sorted_checkpoints(os.fspath(output_dir))
    return ckpts[-1] if ckpts else None


__all__ = [
    "RewardTrainer",
    "RewardConfig",
    "TrainOutput",
    "last_checkpoint",
    "filter_overlong",
    "to_pairs",
    "warmup_steps_of",
]
