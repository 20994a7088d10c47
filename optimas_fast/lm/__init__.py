"""Language-model layer: one interface (LM.generate), several backends, a persistent cache, usage/cost."""
from optimas_fast.lm.base import LM, Completion, Usage

__all__ = ["LM", "Completion", "Usage"]
