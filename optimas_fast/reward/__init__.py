"""Local reward functions: a shared-backbone, multi-head reward model with fast training, online adaptation,
prefix-shared scoring of large candidate pools, checkpoints and DDP.

    rm = RewardModel("minilm", {"answer": "Answers the question"})
    rm.train([PreferencePair("answer", inputs, chosen, rejected, margin)], epochs=2, lr=5e-5)
    rm.adapt(fresh_pairs, steps=4)
    scores = rm.score([("answer", inputs, candidate) for candidate in pool])
    rm.evaluate(held_out_pairs, candidates)        # accuracy, loss, alignment per component
    rm.save("ckpt/"); RewardModel.load("ckpt/")
"""
from ._backend import backend_report
from .checkpoint import describe as describe_checkpoint
from .data import Candidate, PreferencePair, ScoreRequest
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .metrics import spearman
from .model import (
    DEFAULT_BACKBONE, LoraSettings, RewardConfig, RewardModel, ScoreReport, cpu_has_native_bf16, load_backbone,
)
from .template import TemplateConfig
from .trainer import TrainConfig

__all__ = [
    "DEFAULT_BACKBONE", "Candidate", "DistInfo", "LoraSettings", "PreferencePair", "RewardConfig", "RewardModel",
    "ScoreReport", "ScoreRequest", "TemplateConfig", "TrainConfig", "backend_report", "cleanup_distributed",
    "cpu_has_native_bf16", "describe_checkpoint", "init_distributed", "load_backbone", "spearman",
]
