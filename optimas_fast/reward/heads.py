"""The reward heads: the trainable module (``RewardNet``: the shared backbone and one linear head per component)
and the registry that names its heads (``HeadRegistry``: component name -> head id, description).

Heads are separate parameters (one (H,) weight and one (1,) bias per component, keyed "h0", "h1", ... in the
order they were made) so that adding or removing a component never touches the others nor their optimizer
state. ``RewardNet`` holds the parameters and their order; ``HeadRegistry`` is the only code that adds or removes
them, so a component's position in the registry is always its head's position in ``RewardNet.head_keys`` (its
head id: the row of ``W`` (C, H) and ``b`` (C,) that ``stacked_heads`` builds, and what ``ops.multihead_score``
is given per row).

Both live in this one module because they keep one invariant between them (names parallel to head keys); the
registry needs nothing above it (no template, no tokenizer, no config object), so the encoder, the trainer, the
checkpoint and the HF export all reach the component names through it (``encoder.components``).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn


class RewardNet(nn.Module):
    """The trainable part: backbone + per-component heads. Heads are separate parameters (one (H,) weight and
    one (1,) bias per component) so adding or removing a component never touches the others, nor their
    optimizer state; ``stacked_heads`` builds W (C,H), b (C,) for the fused ops (a C×H copy: negligible).
    Add and remove heads through a ``HeadRegistry``, which names them."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.hidden_size = hidden_size
        self.head_weight = nn.ParameterDict()
        self.head_bias = nn.ParameterDict()
        self.head_keys: list[str] = []  # parameter keys in head-id order
        self._next_key = 0  # keys are never reused: a removed head's key (and its optimizer state) stays gone

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


class UnknownComponentError(KeyError, ValueError):
    """A component name that has no head. A ``KeyError`` (a failed lookup by name); also a ``ValueError``, which
    is what the lookup raised before the registry existed, so code catching that keeps working."""

    def __init__(self, name: Any, known: list[str]):
        super().__init__(f"unknown component {name!r}: known components are {known}")
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError's own __str__ would show the message in quotes


class HeadRegistry:
    """The components a reward model scores: name -> head id (its position among ``net``'s heads) and
    description (the template's prefix text), in head order.

    Reads like a sequence of the names: ``for name in reg``, ``len(reg)``, ``reg[0]``, ``name in reg``,
    ``list(reg)``; ``str(reg)`` is the list of names (``repr`` also shows the descriptions).

    ``add`` makes a head, initialised N(0, ``init_std``²) from the registry's own CPU generator seeded with
    ``seed`` (so the same seed gives the same heads on any device, whatever else draws random numbers), bias 0.
    ``remove`` deletes a head's parameters: the heads after it move up one id, keep their values and their keys
    (so their optimizer state), and the generator is not rewound (a head added later is a fresh draw). Every add
    or remove bumps ``version``, which a trainer compares with the version its optimizer was built for.

    Args:
        net: the RewardNet whose heads this registry names; it must have none yet (the registry makes them all).
        init_std: standard deviation of a new head's weights (``RewardModelConfig.head_init_std``).
        seed: seed of the head-initialisation generator (``RewardModelConfig.seed``).
        device: where new heads are placed (the net's device).
    """

    def __init__(self, net: RewardNet, init_std: float, seed: int, device: str | torch.device = "cpu"):
        if not isinstance(net, RewardNet):
            raise TypeError(f"net must be a RewardNet, got {type(net).__name__}")
        if net.head_keys:
            raise ValueError(f"net already has {len(net.head_keys)} heads: a HeadRegistry makes every head of its net")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std >= 0:
            raise ValueError(f"init_std must be a float >= 0, got {init_std!r}")
        self.net = net
        self.init_std = float(init_std)
        self.device = torch.device(device)
        self.rng = torch.Generator().manual_seed(seed)  # CPU: reproducible on any device
        self._names: list[str] = []  # head id -> name
        self._ids: dict[str, int] = {}  # name -> head id (looked up once per distinct row key by rows.prepare_rows)
        self._descriptions: dict[str, str] = {}  # name -> description, insertion (= head) order
        self.version = 0  # bumped by every add / remove

    # ----------------------------------------------------------------------------------------- changes
    def add(self, name: str, description: str | None = None) -> int:
        """A new head for component ``name`` (others, and their optimizer state, are untouched); returns its id.
        ``description`` defaults to the name."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"component name must be a non-empty str, got {name!r}")
        if name in self._ids:
            raise ValueError(f"component {name!r} already has a head")
        if description is not None and not isinstance(description, str):
            raise TypeError(
                f"description of component {name!r} must be a str or None, got {type(description).__name__}"
            )
        w = torch.randn(self.net.hidden_size, generator=self.rng) * self.init_std  # (H,)
        self.net.add_head(w.to(self.device), torch.zeros(1, device=self.device))
        self._ids[name] = len(self._names)
        self._names.append(name)
        self._descriptions[name] = description if description is not None else name
        self.version += 1
        return self._ids[name]

    def remove(self, name: str) -> None:
        """Delete component ``name``'s head; the heads after it move up one id (their order is kept)."""
        idx = self.head_id(name)
        self.net.remove_head(idx)
        self._names.pop(idx)
        del self._descriptions[name]
        self._ids = {n: i for i, n in enumerate(self._names)}
        self.version += 1

    # ----------------------------------------------------------------------------------------- lookup
    def head_id(self, name: str) -> int:
        """The head id (row of ``W``) of component ``name``; UnknownComponentError (a KeyError) names the
        unknown component and the known ones."""
        try:
            return self._ids[name]
        except KeyError:
            raise UnknownComponentError(name, list(self._names)) from None

    @property
    def descriptions(self) -> Mapping[str, str]:
        """name -> description, in head order (a read-only view: change components with ``add`` / ``remove``)."""
        return types.MappingProxyType(self._descriptions)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))  # a copy: removing while iterating must not skip a name

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._ids

    def __getitem__(self, head_id: int) -> str:
        """The name of the component with head id ``head_id``."""
        return self._names[head_id]

    def __str__(self) -> str:
        return str(self._names)

    def __repr__(self) -> str:
        return f"HeadRegistry({self._descriptions!r})"

    def stable_parameters(self) -> dict[str, nn.Parameter]:
        """The heads' parameters by position-independent names: "heads.<component>.weight" (H,), ".bias" (1,)."""
        out: dict[str, nn.Parameter] = {}
        for name, key in zip(self._names, self.net.head_keys, strict=True):
            out[f"heads.{name}.weight"] = self.net.head_weight[key]
            out[f"heads.{name}.bias"] = self.net.head_bias[key]
        return out

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """{"tensors": the heads as CPU copies ("heads.<component>.weight|bias"), "components": {name:
        description} in head order, "head_rng": the init generator's state} (the checkpoint's layout: the
        tensors go to model.safetensors, the components to the manifest, the generator to trainer.safetensors)."""
        return {
            # copies: a caller must not hold views of parameters that keep training
            "tensors": {k: v.detach().cpu().contiguous().clone() for k, v in self.stable_parameters().items()},
            "components": dict(self._descriptions),
            "head_rng": self.rng.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output: every head is rebuilt in its order (components added since are
        dropped, missing ones added, each head under a new key), then the generator's state is restored.
        ``state["tensors"]`` may hold other tensors (a checkpoint's backbone) besides "heads.*". Checked first
        (every head present, shape (H,) and (1,), no "heads.*" tensor of another component): a bad state is a
        ValueError naming the tensor, and leaves the registry as it was."""
        missing = [k for k in ("tensors", "components", "head_rng") if k not in state]
        if missing:
            raise ValueError(f"head state lacks {missing} (expected HeadRegistry.state_dict() output)")
        tensors, comps = state["tensors"], state["components"]
        if not isinstance(comps, Mapping):
            raise TypeError(f"head state 'components' must map name -> description, got {type(comps).__name__}")
        for name, desc in comps.items():
            if not isinstance(name, str) or not name or not isinstance(desc, str):
                raise ValueError(f"head state 'components': {name!r}: {desc!r} is not a (name, description) of str")
        rng = state["head_rng"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
            raise TypeError(f"head state 'head_rng' must be a torch.Generator state (uint8 tensor), got {rng!r:.60}")
        H = self.net.hidden_size
        want = {}
        for name in comps:
            want[f"heads.{name}.weight"] = (H,)
            want[f"heads.{name}.bias"] = (1,)
        for k, shape in want.items():
            if k not in tensors:
                raise ValueError(f"head state lacks tensor {k!r} (components: {list(comps)})")
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"head tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {shape}")
        stray = sorted(k for k in tensors if k.startswith("heads.") and k not in want)
        if stray:
            raise ValueError(f"head tensors {stray} belong to no component of {list(comps)}")
        for name in list(self._names):
            self.remove(name)
        for name, desc in comps.items():
            self.add(name, desc)  # draws from the generator like any add; its state is restored below
            key = self.net.head_keys[-1]
            with torch.no_grad():
                self.net.head_weight[key].copy_(tensors[f"heads.{name}.weight"])
                self.net.head_bias[key].copy_(tensors[f"heads.{name}.bias"])
        self.rng.set_state(rng)
