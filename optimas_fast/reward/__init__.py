"""Local reward functions: a shared-backbone, multi-head reward model with fast training, online adaptation,
prefix-shared scoring of large candidate pools, checkpoints and DDP.

    rm = RewardModel("minilm", {"answer": "Answers the question"})
    rm.train([PreferencePair("answer", inputs, chosen, rejected, margin)], epochs=2, lr=5e-5)
    rm.adapt(fresh_pairs, steps=4)
    scores = rm.score([("answer", inputs, candidate) for candidate in pool])
    rm.evaluate(held_out_pairs, candidates)        # accuracy, loss, alignment per component
    rm.save("ckpt/"); RewardModel.load("ckpt/")

Parts (each depends only on those above it): data, template, config, schedules, metrics -> heads (RewardNet, the
HeadRegistry of component names), precision, rows
-> encode -> encoder -> sharded -> trainer
(Trainer.step, the one training step; TrainLoops: train / adapt) -> checkpoint -> model (the RewardModel facade)
-> trl_trainer (the TRL-style RewardTrainer, another loop over Trainer.step).
"""

from .checkpoint import describe as describe_checkpoint
from .config import LoraSettings, RewardModelConfig
from .data import Candidate, PreferencePair, ScoreRequest, pair_weights
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .encoder import DEFAULT_BACKBONE, Encoder, backend_report, load_backbone
from .formats import LoadReport, PairFormatError, PairSet, load_pairs, save_pairs
from .heads import HeadRegistry, UnknownComponentError
from .metrics import spearman
from .model import RewardModel
from .precision import cpu_has_amx_bf16, cpu_has_native_bf16
from .rows import Rows
from .sharded import ScoreReport
from .template import TemplateConfig
from .trainer import OVERLONG_POLICIES, PairBatch, StepReport, TrainConfig, Trainer, TrainLoops, TrainReport
from .trl_trainer import RewardTrainer  # the TRL-style face; its arguments: optimas_fast.trl.RewardConfig

__all__ = [
    "LoadReport",
    "PairFormatError",
    "PairSet",
    "load_pairs",
    "save_pairs",
    "DEFAULT_BACKBONE",
    "OVERLONG_POLICIES",
    "Candidate",
    "DistInfo",
    "Encoder",
    "HeadRegistry",
    "LoraSettings",
    "PreferencePair",
    "RewardModelConfig",
    "RewardModel",
    "Rows",
    "ScoreReport",
    "ScoreRequest",
    "TemplateConfig",
    "TrainConfig",
    "TrainReport",
    "Trainer",
    "TrainLoops",
    "UnknownComponentError",
    "PairBatch",
    "StepReport",
    "backend_report",
    "cleanup_distributed",
    "cpu_has_amx_bf16",
    "cpu_has_native_bf16",
    "describe_checkpoint",
    "init_distributed",
    "load_backbone",
    "pair_weights",
    "spearman",
    "RewardTrainer",
]
