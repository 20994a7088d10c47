"""RewardModel: the facade of the reward engine. One shared Hugging Face backbone + one linear head per
component (W[C,H], b[C]), trained, adapted, scored, evaluated and checkpointed through one object.

    rm = RewardModel("minilm", {"answer": "Answers the question"})
    rm.train(pairs, epochs=2, lr=5e-5); rm.last_train_report
    scores = rm.score([("answer", inputs, candidate) for candidate in pool])

The parts it joins depend only downward and never import it back:

    config.py     RewardModelConfig, LoraSettings
    template.py   text layout, token cache
    heads.py      RewardNet: backbone + per-component head parameters; HeadRegistry: component name -> head
    precision.py  bf16 or fp32 per path, autocast, the bf16 scoring copy
    rows.py       tokenising (batched), dedupe, truncation -> Rows
    encode.py     one function per batch layout (padded, shared-prefix, packed) -> pooled states
    encoder.py    the Encoder composing them: backbone + heads + policies, planning (C++ scheduler)
    sharded.py    score: rewards, the planned batches sharded across torchrun ranks
    trainer.py    Trainer.step (the one training step), TrainLoops (train / adapt: schedule, replay), evaluate
    checkpoint.py save / load through Encoder and TrainLoops (+ Trainer) state_dicts
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from . import hf_export
from .checkpoint import load_checkpoint, read_manifest, save_checkpoint
from .config import LoraSettings, RewardModelConfig, reward_config_from_dict, reward_config_to_dict
from .encoder import DEFAULT_BACKBONE, Encoder, backend_report, load_backbone
from .heads import RewardNet
from .precision import cpu_has_native_bf16
from .rows import Rows
from .sharded import ScoreReport, score
from .template import Tokenised
from .trainer import TrainConfig, Trainer, TrainLoops, TrainReport, evaluate

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BACKBONE",
    "LoraSettings",
    "RewardModelConfig",
    "RewardModel",
    "RewardNet",
    "ScoreReport",
    "backend_report",
    "cpu_has_native_bf16",
    "load_backbone",
    "reward_config_from_dict",
    "reward_config_to_dict",
]


class RewardModel:
    """Shared-backbone multi-head local reward function.

    Args:
        backbone: "minilm" (default, offline MiniLM-L6), a local model directory, or a Hugging Face
            ``PreTrainedModel`` (base model, e.g. from ``AutoModel``) together with ``tokenizer``.
        components: component names, or a mapping name -> description (used in the template prefix).
        tokenizer: the backbone's tokenizer (required when ``backbone`` is a module).
        config: RewardModelConfig.
        train_config: TrainConfig, the defaults of ``train`` / ``adapt`` (None: TrainConfig()).
        device: where the backbone runs (default: CUDA if available, else CPU).

    Training: ``train`` and ``adapt`` are loops (``self.loops``, trainer.TrainLoops) over the one training step
    ``self.trainer.step``, as is the TRL-style ``RewardTrainer``. Their defaults are ``self.loops.config`` (a
    TrainConfig, saved in checkpoints); a call's keyword overrides apply to that call alone.

    Everything else has one name, on its part: ``rm.encoder`` (reward/encoder.py) holds the configuration,
    the backbone and heads (``encoder.net``), the component registry (``encoder.components``, a
    heads.HeadRegistry: names in head order, head ids, descriptions), the tokenizer and token cache, the device
    and the policies (``encoder.config``, ``encoder.device``, ...).
    """

    def __init__(
        self,
        backbone: Any = DEFAULT_BACKBONE,
        components: Sequence[str] | Mapping[str, str] = (),
        tokenizer: Any = None,
        config: RewardModelConfig | None = None,
        device: str | torch.device | None = None,
        train_config: TrainConfig | None = None,
    ):
        config = config if config is not None else RewardModelConfig()
        if train_config is not None and not isinstance(train_config, TrainConfig):
            raise TypeError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
        if train_config is not None:
            train_config.validate()
        if not isinstance(config, RewardModelConfig):
            raise TypeError(f"config must be a RewardModelConfig, got {type(config).__name__}")
        config.validate()
        if isinstance(backbone, str):
            backbone, loaded_tok = load_backbone(backbone)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        self.encoder = Encoder(backbone, tokenizer, config, device)
        # the training step (optimizer, steps taken), shared by every loop over this model; the engine's own loops
        # (train / adapt: their default settings, data-order RNG, replay buffers)
        self.trainer = Trainer(self.encoder)
        self.loops = TrainLoops(self.trainer, seed=config.seed + 1, config=train_config)
        self.last_report: ScoreReport | None = None
        items = components.items() if isinstance(components, Mapping) else ((c, c) for c in components)
        for name, desc in items:
            self.add_component(name, desc)

    # ------------------------------------------------------------------------------------------- heads
    # the facade's verbs on the component registry, ``self.encoder.components`` (heads.HeadRegistry)
    def add_component(self, name: str, description: str | None = None) -> int:
        """Add a head for a new component (others, and their optimizer state, are untouched); returns its id."""
        return self.encoder.components.add(name, description)

    def remove_component(self, name: str) -> None:
        """Drop a component's head (and, at the trainer's next step, its replay buffer)."""
        self.encoder.components.remove(name)

    def head_id(self, name: str) -> int:
        """The head id of component ``name`` (UnknownComponentError, a KeyError, names the known ones)."""
        return self.encoder.components.head_id(name)

    def tokenise(self, component: str, inputs: str, outputs: str) -> Tokenised:
        return self.encoder.tokenise(component, inputs, outputs)

    def prepare(self, requests: Iterable[Any]) -> Rows:
        """(component, inputs, outputs) rows -> the encoder's prepared columns (tokenised, truncated)."""
        return self.encoder.prepare_requests(requests)

    def uses_bf16(self, inference: bool) -> bool:
        return self.encoder.precision.uses_bf16(inference)

    def prefix_sharing_status(self) -> str:
        return self.encoder.prefix_sharing_status()

    # ------------------------------------------------------------------------------------------- scoring
    def score(self, requests: Iterable[Any], shard: bool = True) -> torch.Tensor:
        """Rewards (N,) float32 on CPU for (component, inputs, outputs) rows of any mix of components.

        Under ``torchrun`` (world size > 1) with ``shard=True`` the planned batches are split across ranks by
        tokens and the scores gathered: a collective, so every rank must call it with the same requests.
        ``shard=False`` scores locally (e.g. on rank 0 only)."""
        return self.score_with_report(requests, shard=shard)[0]

    def score_with_report(self, requests: Iterable[Any], shard: bool = True) -> tuple[torch.Tensor, ScoreReport]:
        scores, report = score(self.encoder, requests, shard=shard)
        self.last_report = report
        return scores, report

    # ---------------------------------------------------------------------------------- training facade
    def train(
        self, pairs, epochs: int = 1, lr: float | None = None, overlong: str = "truncate_prefix", **overrides
    ) -> list[dict]:
        """Initial training on preference pairs. Settings: ``self.loops.config`` (a ``trainer.TrainConfig``) with
        the keyword overrides on top, for this call only.

        overlong: pairs longer than ``config.template.max_length``: "truncate_prefix" (default: the inputs are
        cut to fit), "drop" (left out, counted) or "error" (ValueError naming the pair and its lengths).
        Returns a list of per-step dicts (loss, pairs, seconds); ``last_train_report`` has the totals."""
        return self.loops.train(pairs, epochs=epochs, lr=lr, overlong=overlong, **overrides)

    @property
    def last_train_report(self) -> TrainReport | None:
        """What the last ``train()`` did: pairs used / dropped / truncated, steps, seconds, pairs/s, final loss."""
        return self.loops.last_report

    def adapt(self, pairs, steps: int = 1, **overrides):
        """Online adaptation: ``steps`` steps at a constant lr on fresh pairs + per-component replay, the
        optimizer's moments kept; settings as ``train``'s (``self.loops.config`` + this call's overrides)."""
        return self.loops.adapt(pairs, steps=steps, **overrides)

    def evaluate(self, pairs, candidates=None, subtract_margin: bool = False, center: float = 0.0) -> dict:
        """Per-component pairwise accuracy (ties count half), loss, margin and alignment on held-out data (see
        trainer.evaluate and metrics.pair_metrics)."""
        return evaluate(self.encoder, pairs, candidates, subtract_margin=subtract_margin, center=center)

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Atomic checkpoint: weights (safetensors), optimizer tensors (safetensors), config/heads/trainer (JSON)."""
        trained = self.trainer.optimizer is not None or self.trainer.global_step > 0 or bool(self.loops.replay)
        save_checkpoint(path, self.encoder, self.loops if trained else None, self.encoder.config)

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint into this model (same backbone architecture, else ValueError)."""
        trainer_state = load_checkpoint(path, self.encoder)
        self.trainer = Trainer(self.encoder)
        # a checkpoint without trainer state keeps this model's training settings (one with it brings its own)
        self.loops = TrainLoops(self.trainer, seed=self.encoder.config.seed + 1, config=self.loops.config)
        if trainer_state is not None:
            self.loops.load_state_dict(trainer_state)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> RewardModel:
        """Rebuild a model from a checkpoint directory alone (backbone config + tokenizer are stored in it)."""
        from transformers import AutoModel, AutoTokenizer

        manifest = read_manifest(path)
        hf_config = _config_from_dict(manifest["backbone"]["config"])
        backbone = AutoModel.from_config(hf_config)
        tok = AutoTokenizer.from_pretrained(os.path.join(os.fspath(path), "tokenizer"), local_files_only=True)
        config = reward_config_from_dict(manifest["reward_config"])
        model = cls(backbone, manifest["components"], tokenizer=tok, config=config, device=device)
        model.load_state(path)
        return model

    def export_hf(self, path: str | os.PathLike) -> dict:
        """A standard Hugging Face checkpoint (see reward/hf_export.py): decoders with last-token pooling as
        ``*ForSequenceClassification`` (per-head bias dropped, LoRA merged), others as backbone + heads."""
        return hf_export.export_hf(self.encoder, path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, config: RewardModelConfig | None = None
    ) -> RewardModel:
        """Load an ``export_hf`` directory, or a plain HF decoder ``*ForSequenceClassification`` reward model
        (its score layer becomes the heads; template ``"{inputs}"`` unless ``config`` says otherwise)."""
        return hf_export.load_pretrained(
            path,
            build=cls,
            config=config if config is not None else RewardModelConfig(),
            config_given=config is not None,
            device=device,
        )


def _config_from_dict(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)
