"""Variables: the optimizable configuration of a component.

Three kinds, one per optimizer family:

- ``Prompt(text)``: an instruction string (optimized by proposing and scoring new instructions).
- ``Choice(**space)``: discrete hyperparameters, each a list of allowed values; the current value is one
  entry per key (by default the first option of each). A model choice is a ``Choice`` over LM names.
- ``Weights(module)`` or ``Weights(path=...)``: a local trainable torch model, or the path of an adapter
  managed outside (e.g. a LoRA directory).

Prompt and Choice are immutable values: "changing" one means building a new one (``Prompt.replace``,
``Choice.replace``), which is what makes run-scoped overrides safe to share between threads. A Weights
variable holds a live module (training mutates it in place); overriding it swaps in another module.

Serialization is JSON only (no pickle). ``Weights`` tensors are stored as the bytes of a safetensors file,
base64-encoded inside the JSON, so that one state dict is one self-contained JSON document.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import math
import os
import random
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["Variable", "Prompt", "Choice", "Weights", "variable_from_state"]


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


class Variable:
    """Base class. Subclasses define ``kind``, ``to_state``, ``from_state``, ``coerce`` and ``describe``."""

    kind: str = "variable"

    def to_state(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: Mapping) -> Variable:
        raise NotImplementedError

    def coerce(self, value: Any) -> Variable:
        """A new variable of this kind from an override value (a Variable or a raw value)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Short text form for traces, logs and LRF templates."""
        raise NotImplementedError


class Prompt(Variable):
    """An instruction text."""

    kind = "prompt"
    __slots__ = ("_text",)

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"Prompt(text): expected a str, got {type(text).__name__}")
        self._text = text

    @property
    def text(self) -> str:
        return self._text

    def replace(self, text: str) -> Prompt:
        return Prompt(text)

    def coerce(self, value: Any) -> Prompt:
        if isinstance(value, Prompt):
            return value
        if isinstance(value, str):
            return Prompt(value)
        raise TypeError(f"a Prompt override must be a Prompt or a str, got {type(value).__name__}")

    def to_state(self) -> dict:
        return {"kind": self.kind, "text": self._text}

    @classmethod
    def from_state(cls, state: Mapping) -> Prompt:
        text = state.get("text")
        if not isinstance(text, str):
            raise ValueError("Prompt state: field 'text' must be a str")
        return cls(text)

    def describe(self) -> str:
        return self._text

    def __eq__(self, other) -> bool:
        return isinstance(other, Prompt) and other._text == self._text

    def __hash__(self) -> int:
        return hash(("prompt", self._text))

    def __repr__(self) -> str:
        short = self._text if len(self._text) <= 60 else self._text[:57] + "..."
        return f"Prompt({short!r})"


class Choice(Variable):
    """Discrete hyperparameters: ``Choice(model=["a", "b"], temperature=[0.0, 0.7])``.

    ``space`` maps each key to its list of allowed values (JSON scalars, so that states stay JSON);
    ``value`` maps each key to the current one (the first option of each key unless given).
    Access the current values as ``choice["model"]`` or ``choice.value``.
    """

    kind = "choice"
    __slots__ = ("_space", "_value")

    def __init__(self, _value: Mapping[str, Any] | None = None, **space: list):
        if not space:
            raise ValueError("Choice(**space): the space is empty; give at least one key with a list of options")
        checked: dict[str, tuple] = {}
        for key, options in space.items():
            if isinstance(options, (str, bytes)) or not hasattr(options, "__iter__"):
                raise TypeError(f"Choice space '{key}': expected a list of options, got {type(options).__name__}")
            options = tuple(options)
            if not options:
                raise ValueError(f"Choice space '{key}': no options")
            for opt in options:
                if not _is_json_scalar(opt):
                    raise TypeError(
                        f"Choice space '{key}': option {opt!r} is not a JSON scalar (str, int, float, bool, None)"
                    )
            if len(set(map(_option_key, options))) != len(options):
                raise ValueError(f"Choice space '{key}': duplicate options in {list(options)}")
            checked[key] = options
        self._space = checked
        value = {key: opts[0] for key, opts in checked.items()}
        if _value is not None:
            value.update(self._check_value(_value))
        self._value = value

    def _check_value(self, values: Mapping[str, Any]) -> dict:
        out = {}
        for key, val in values.items():
            if key not in self._space:
                raise ValueError(f"Choice: unknown key '{key}' (space keys: {sorted(self._space)})")
            if _option_key(val) not in {_option_key(o) for o in self._space[key]}:
                raise ValueError(f"Choice: value {val!r} for '{key}' is not one of {list(self._space[key])}")
            out[key] = val
        return out

    @property
    def space(self) -> dict[str, list]:
        return {k: list(v) for k, v in self._space.items()}

    @property
    def value(self) -> dict[str, Any]:
        return dict(self._value)

    def __getitem__(self, key: str) -> Any:
        return self._value[key]

    def replace(self, **values) -> Choice:
        """Same space, some keys set to new values (each must be an allowed option)."""
        new = Choice.__new__(Choice)
        new._space = self._space
        new._value = {**self._value, **self._check_value(values)}
        return new

    def size(self) -> int:
        """Number of distinct configurations in the space."""
        return math.prod(len(v) for v in self._space.values())

    def candidates(self) -> Iterator[Choice]:
        """Every configuration of the space, in a deterministic order (row-major over the keys)."""
        keys = list(self._space)
        for combo in itertools.product(*(self._space[k] for k in keys)):
            yield self.replace(**dict(zip(keys, combo)))

    def sample(self, k: int, rng: random.Random) -> list[Choice]:
        """``k`` distinct configurations drawn without replacement (all of them if ``k`` >= size)."""
        size = self.size()
        if k >= size:
            return list(self.candidates())
        keys = list(self._space)
        radices = [len(self._space[key]) for key in keys]
        out = []
        for flat in rng.sample(range(size), k):
            idx = []
            for r in reversed(radices):  # mixed-radix decode, last key fastest like candidates()
                idx.append(flat % r)
                flat //= r
            idx.reverse()
            out.append(self.replace(**{key: self._space[key][i] for key, i in zip(keys, idx)}))
        return out

    def coerce(self, value: Any) -> Choice:
        if isinstance(value, Choice):
            if value._space != self._space:
                raise ValueError("a Choice override must have the same space as the component's Choice")
            return value
        if isinstance(value, Mapping):
            return self.replace(**value)  # partial dicts keep the other keys' current values
        raise TypeError(f"a Choice override must be a Choice or a dict of values, got {type(value).__name__}")

    def to_state(self) -> dict:
        return {"kind": self.kind, "space": self.space, "value": self.value}

    @classmethod
    def from_state(cls, state: Mapping) -> Choice:
        space, value = state.get("space"), state.get("value")
        if not isinstance(space, Mapping) or not isinstance(value, Mapping):
            raise ValueError("Choice state: fields 'space' and 'value' must be objects")
        return cls(dict(value), **space)

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._value.items())

    def __eq__(self, other) -> bool:
        return isinstance(other, Choice) and other._space == self._space and other._value == self._value

    def __hash__(self) -> int:
        return hash(("choice", tuple(sorted((k, _option_key(v)) for k, v in self._value.items()))))

    def __repr__(self) -> str:
        return f"Choice({self.describe()})"


def _option_key(value: Any) -> tuple:
    # 1 == 1.0 == True in Python; keep them distinct as options so JSON round-trips stay exact.
    return (type(value).__name__, value)


class Weights(Variable):
    """A local trainable model: ``Weights(module)`` or ``Weights(path="adapter/dir")``.

    With a module, the state holds every tensor of ``module.state_dict()`` (safetensors bytes, base64) and
    loading copies them into the component's module (same architecture required). With a path, the state
    holds the path only: the files are managed by whoever wrote them (e.g. a LoRA adapter directory).
    """

    kind = "weights"
    __slots__ = ("_module", "_path")

    def __init__(self, module: torch.nn.Module | None = None, *, path: str | os.PathLike | None = None):
        if (module is None) == (path is None):
            raise ValueError("Weights: give exactly one of module (a torch.nn.Module) or path")
        if module is not None and not isinstance(module, torch.nn.Module):
            if isinstance(module, (str, os.PathLike)):
                module, path = None, module
            else:
                raise TypeError(f"Weights(module): expected a torch.nn.Module, got {type(module).__name__}")
        self._module = module
        self._path = None if path is None else os.fspath(path)

    @property
    def module(self) -> torch.nn.Module | None:
        return self._module

    @property
    def path(self) -> str | None:
        return self._path

    def copy(self) -> Weights:
        """An independent deep copy (for candidates that train without touching the incumbent)."""
        if self._module is not None:
            return Weights(copy.deepcopy(self._module))
        return Weights(path=self._path)

    def coerce(self, value: Any) -> Weights:
        if isinstance(value, Weights):
            return value
        if isinstance(value, torch.nn.Module):
            return Weights(value)
        if isinstance(value, (str, os.PathLike)):
            return Weights(path=value)
        raise TypeError(f"a Weights override must be Weights, a torch.nn.Module or a path, got {type(value).__name__}")

    def to_state(self) -> dict:
        if self._module is None:
            return {"kind": self.kind, "path": self._path}
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self._module.state_dict().items()}
        blob = save(tensors) if tensors else b""
        return {
            "kind": self.kind,
            "format": "safetensors+base64",
            "module": type(self._module).__name__,
            "tensors": base64.b64encode(blob).decode("ascii"),
        }

    @classmethod
    def from_state(cls, state: Mapping) -> Weights:
        """Only path states can be rebuilt alone; module states load into an existing module (``load_state``)."""
        if state.get("path") is not None:
            return cls(path=state["path"])
        raise ValueError("Weights state holds tensors: load it into a module with Weights.load_state(state)")

    def load_state(self, state: Mapping) -> Weights:
        """A Weights with ``state`` applied: tensors are copied into this module in place (same architecture)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"Weights.load_state: state kind is {state.get('kind')!r}, expected 'weights'")
        if self._module is None:
            if state.get("path") is None:
                raise ValueError("Weights.load_state: this variable is path-based but the state holds tensors")
            return Weights(path=state["path"])
        if "tensors" not in state:
            raise ValueError("Weights.load_state: this variable holds a module but the state has no 'tensors'")
        if state.get("module") != type(self._module).__name__:
            raise ValueError(
                f"Weights.load_state: state is for module {state.get('module')!r}, "
                f"this variable holds {type(self._module).__name__!r}"
            )
        from safetensors.torch import load

        blob = base64.b64decode(state["tensors"])
        tensors = load(blob) if blob else {}
        missing, unexpected = self._module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"Weights.load_state: tensor names differ (missing {missing}, unexpected {unexpected})")
        return self

    def describe(self) -> str:
        if self._module is None:
            return f"weights at {self._path}"
        n = sum(p.numel() for p in self._module.parameters())
        return f"{type(self._module).__name__} ({n} parameters)"

    def __repr__(self) -> str:
        return f"Weights({self.describe()})"


_KINDS = {"prompt": Prompt, "choice": Choice, "weights": Weights}


def variable_from_state(state: Mapping) -> Variable:
    """Rebuild a Prompt or Choice (or path-based Weights) from its JSON state."""
    if not isinstance(state, Mapping) or state.get("kind") not in _KINDS:
        raise ValueError(f"variable state: 'kind' must be one of {sorted(_KINDS)}, got {state!r:.80}")
    return _KINDS[state["kind"]].from_state(state)


def to_json(state: Mapping) -> str:
    """Canonical JSON text (sorted keys) of a state."""
    return json.dumps(state, sort_keys=True)
