"""TRL's names for the engine's TRL-style trainer, so that a TRL reward-training script changes only its import:

    from trl import RewardConfig, RewardTrainer            # before
    from optimas_fast.trl import RewardConfig, RewardTrainer  # after

``RewardConfig`` is the TRL face's arguments (TRL's field names and defaults; defined in
``optimas_fast.reward.trl_trainer``); the engine's own settings of a RewardModel (template, pooling, scoring) are
``optimas_fast.reward.RewardModelConfig``.
"""

from optimas_fast.reward.trl_trainer import RewardConfig, RewardTrainer

__all__ = ["RewardConfig", "RewardTrainer"]
