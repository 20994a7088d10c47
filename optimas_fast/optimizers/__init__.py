"""Optimizers, one per variable kind, one interface:
``optimize(component, inputs, reward_model, budget, address=None, rng=None) -> Proposal``.

- ``PromptOptimizer``: OPRO-style proposals from a proposer LM, candidates and incumbent scored by the LRF.
- ``ChoiceOptimizer``: the whole pool (or a sample) × inputs scored in one batched LRF call.
- ``WeightsOptimizer``: antithetic ES (a policy gradient against the LRF) + best-of-N for a torch module;
  best-of-N sampling + DPO for a LoRA adapter on a Hugging Face causal LM (``LoRAComponent``, ``LoRAPolicy``).
"""

from optimas_fast.optimizers.base import Optimizer, OptimizerBudget, Proposal, run_batch, score_matrix
from optimas_fast.optimizers.choice import ChoiceConfig, ChoiceOptimizer
from optimas_fast.optimizers.lora import LoRAAdapter, LoRAComponent, LoRAPolicy
from optimas_fast.optimizers.prompt import PromptConfig, PromptOptimizer, parse_instruction
from optimas_fast.optimizers.weights import WeightsConfig, WeightsOptimizer

__all__ = [
    "Optimizer",
    "OptimizerBudget",
    "Proposal",
    "run_batch",
    "score_matrix",
    "ChoiceConfig",
    "ChoiceOptimizer",
    "PromptConfig",
    "PromptOptimizer",
    "parse_instruction",
    "WeightsConfig",
    "WeightsOptimizer",
    "LoRAAdapter",
    "LoRAComponent",
    "LoRAPolicy",
]
