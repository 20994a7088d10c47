"""The trainable module: the shared backbone and one linear head per component.

Heads are separate parameters (one (H,) weight and one (1,) bias per component, keyed "h0", "h1", ... in the
order they were made) so that adding or removing a component never touches the others nor their optimizer
state. The encoder (encoder.py) keeps the component names, descriptions and head ids in the same order.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RewardNet(nn.Module):
    """The trainable part: backbone + per-component heads. Heads are separate parameters (one (H,) weight and
    one (1,) bias per component) so adding or removing a component never touches the others, nor their
    optimizer state; ``stacked_heads`` builds W (C,H), b (C,) for the fused ops (a C×H copy: negligible)."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.hidden_size = hidden_size
        self.head_weight = nn.ParameterDict()
        self.head_bias = nn.ParameterDict()
        self.head_keys: list[str] = []  # parameter keys in head-id order
        self._next_key = 0

    def add_head(self, weight: torch.Tensor, bias: torch.Tensor) -> str:
        key = f"h{self._next_key}"
        self._next_key += 1
        self.head_weight[key] = nn.Parameter(weight.detach().clone().float())  # (H,)
        self.head_bias[key] = nn.Parameter(bias.detach().clone().float().reshape(1))  # (1,)
        self.head_keys.append(key)
        return key

    def remove_head(self, index: int) -> None:
        key = self.head_keys.pop(index)
        del self.head_weight[key]
        del self.head_bias[key]

    def stacked_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        W = torch.stack([self.head_weight[k] for k in self.head_keys])  # (C, H)
        b = torch.cat([self.head_bias[k] for k in self.head_keys])  # (C,)
        return W, b
