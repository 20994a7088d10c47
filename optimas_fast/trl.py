"""TRL's names for the engine's TRL-style trainer, so that a TRL reward-training script changes only its import:

    from trl import RewardConfig, RewardTrainer            # before
    from optimas_fast.trl import RewardConfig, RewardTrainer  # after

``RewardConfig`` here is ``optimas_fast.reward.RewardTrainingArguments`` (TRL's field names and defaults), not the
engine's ``optimas_fast.reward.RewardConfig`` (template, pooling, scoring settings of a RewardModel).
"""
from optimas_fast.reward.trl_trainer import RewardTrainer, RewardTrainingArguments
from optimas_fast.reward.trl_trainer import RewardTrainingArguments as RewardConfig

__all__ = ["RewardConfig", "RewardTrainer", "RewardTrainingArguments"]
