"""Checkpoints of a RewardModel: a directory of

    model.safetensors    backbone weights ("backbone.<name>") and heads ("heads.<component>.weight|bias")
    trainer.safetensors  optimizer moments ("opt::<param>::<slot>") and RNG states (only once trained)
    tokenizer/           the tokenizer (save_pretrained), so ``RewardModel.load(dir)`` needs nothing else
    manifest.json        written last: format, backbone fingerprint and config, reward config, components and
                         descriptions, trainer meta (step, LR position, replay buffers), sha256 of every file

Every file is written atomically (temp file in the same directory, fsync, os.replace, fsync of the
directory), and the manifest (with the checksums) goes last: a crash leaves either the old checkpoint or the
new one, and a torn mixture is detected at load by its checksums. Parameters are addressed by stable names
(component names, not positions), so optimizer state survives heads being added or removed.

This module goes through public state only: ``Encoder.state_dict``/``load_state_dict`` (the backbone's weights,
and the heads, components and head-init RNG of its ``heads.HeadRegistry``) and ``Trainer.state_dict``/
``load_state_dict`` (optimizer moments, RNG, LR position, replay). It
imports neither the trainer nor the RewardModel facade; the format is unchanged since before the reward/
package split (tests/fixtures/reward_ckpt_v1 holds checkpoints written then).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from optimas_fast._io import atomic_write_bytes

from .config import RewardModelConfig
from .encoder import Encoder

logger = logging.getLogger(__name__)

FORMAT = "optimas-fast-reward/1"
MANIFEST = "manifest.json"


def backbone_fingerprint(encoder: Encoder) -> dict:
    """What must match for weights to be loadable: architecture numbers and every parameter's name + shape."""
    c = encoder.hf_config
    shapes = sorted((n, tuple(p.shape)) for n, p in encoder.net.backbone.state_dict().items())
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return {
        "model_type": getattr(c, "model_type", None),
        "hidden_size": encoder.net.hidden_size,
        "num_hidden_layers": getattr(c, "num_hidden_layers", None),
        "vocab_size": getattr(c, "vocab_size", None),
        "param_shapes_sha256": digest,
        "name_or_path": getattr(c, "_name_or_path", ""),
    }


def stable_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Parameters by position-independent names ("backbone.<name>", "heads.<component>.weight|bias") of an
    Encoder, or of anything holding one as ``.encoder`` (a RewardModel)."""
    return getattr(model, "encoder", model).stable_parameters()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    path: str | os.PathLike, encoder: Encoder, trainer: Any = None, config: RewardModelConfig | None = None
) -> None:
    """Write encoder (+ trainer, when given) state to ``path`` atomically; ``config`` defaults to the
    encoder's RewardModelConfig."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    enc = encoder.state_dict()
    files: dict[str, str] = {}
    blob = st_save(enc["tensors"])
    atomic_write_bytes(os.path.join(path, "model.safetensors"), blob)
    files["model.safetensors"] = _sha256(blob)
    trainer_meta = None
    tensors = {"model.head_rng": enc["head_rng"]}
    if trainer is not None:
        tr = trainer.state_dict()
        trainer_meta = tr["meta"]
        tensors.update(tr["tensors"])
    blob = st_save(tensors)
    atomic_write_bytes(os.path.join(path, "trainer.safetensors"), blob)
    files["trainer.safetensors"] = _sha256(blob)
    tok_dir = os.path.join(path, "tokenizer")
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-tok-", dir=path)
    try:
        encoder.tokenizer.save_pretrained(tmp_dir)
        if os.path.isdir(tok_dir):
            shutil.rmtree(tok_dir)
        os.replace(tmp_dir, tok_dir)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
    manifest = {
        "format": FORMAT,
        "backbone": {"fingerprint": backbone_fingerprint(encoder), "config": encoder.hf_config.to_dict()},
        "reward_config": asdict(config if config is not None else encoder.config),
        "components": enc["components"],
        "trainer": trainer_meta,
        "files": files,
    }
    atomic_write_bytes(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, default=str).encode())
    logger.info("saved reward checkpoint to %s (%d components)", path, len(enc["components"]))


def read_manifest(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{path!r} is not a reward checkpoint: {MANIFEST} is missing")
    with open(mpath, "rb") as f:
        manifest = json.loads(f.read())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: unsupported checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def _read_checked(path: str, name: str, manifest: dict) -> bytes:
    with open(os.path.join(path, name), "rb") as f:
        data = f.read()
    if _sha256(data) != manifest["files"][name]:
        raise ValueError(
            f"{os.path.join(path, name)} does not match the manifest's checksum: the checkpoint is torn or was modified"
        )
    return data


def load_checkpoint(path: str | os.PathLike, encoder: Encoder) -> dict | None:
    """Restore weights, heads and components into ``encoder`` exactly (ValueError for another backbone);
    returns the trainer state (``Trainer.load_state_dict`` input), or None when the checkpoint has none."""
    path = os.fspath(path)
    manifest = read_manifest(path)
    want, have = manifest["backbone"]["fingerprint"], backbone_fingerprint(encoder)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "param_shapes_sha256")
    diff = {k: (want.get(k), have.get(k)) for k in keys if want.get(k) != have.get(k)}
    if diff:
        raise ValueError(
            f"checkpoint {path!r} was written for another backbone "
            f"({want.get('name_or_path') or want.get('model_type')}); mismatched (checkpoint, this "
            f"model): {diff}"
        )
    saved_cfg, cfg = manifest["reward_config"], encoder.config
    if saved_cfg.get("pooling") != cfg.pooling or saved_cfg.get("architecture") != cfg.architecture:
        raise ValueError(
            f"checkpoint {path!r} used pooling={saved_cfg.get('pooling')!r}, architecture="
            f"{saved_cfg.get('architecture')!r}; this model has {cfg.pooling!r}, {cfg.architecture!r}"
        )
    _check_template(path, saved_cfg.get("template") or {}, cfg.template)
    weights = st_load(_read_checked(path, "model.safetensors", manifest))
    tensors = st_load(_read_checked(path, "trainer.safetensors", manifest))
    encoder.load_state_dict(
        {"tensors": weights, "components": manifest["components"], "head_rng": tensors["model.head_rng"]}
    )
    logger.info("loaded reward checkpoint %s", path)
    if manifest["trainer"] is None:
        return None
    return {"meta": manifest["trainer"], "tensors": {k: v for k, v in tensors.items() if k != "model.head_rng"}}


def _check_template(path: str, saved: dict, have) -> None:
    """The heads score text laid out by the template they were trained with: a different layout (prefix
    format, EOS after the outputs) is a ValueError naming the field; a different max_length or truncation
    side changes only over-long rows, so it is a warning. Fields a checkpoint predates are skipped (an old
    checkpoint without append_eos was trained without it)."""
    defaults = {"append_eos": False}  # absent from checkpoints written before the field existed
    layout = {
        k: (saved.get(k, defaults.get(k)), getattr(have, k))
        for k in ("prefix_format", "append_eos")
        if k in saved or k in defaults
    }
    wrong = {k: v for k, v in layout.items() if v[0] != v[1]}
    if wrong:
        raise ValueError(
            f"checkpoint {path!r} was trained with another text layout; mismatched template fields "
            f"(checkpoint, this model): {wrong}. Build the model with the checkpoint's template "
            "(RewardModel.load(path) does), or its scores would be for text it never saw"
        )
    length = {
        k: (saved[k], getattr(have, k))
        for k in ("max_length", "truncation_side")
        if k in saved and saved[k] != getattr(have, k)
    }
    if length:
        logger.warning(
            "checkpoint %s was trained with other truncation settings (checkpoint, this model): %s; "
            "rows longer than either limit score differently",
            path,
            length,
        )


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Components, backbone and trainer step of a checkpoint, without loading any weights."""
    m = read_manifest(path)
    return {
        "components": list(m["components"]),
        "backbone": m["backbone"]["fingerprint"],
        "step": (m["trainer"] or {}).get("step", 0),
    }
