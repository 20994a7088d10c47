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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from optimas_fast._io import atomic_write_bytes

if TYPE_CHECKING:
    from .model import RewardModel

logger = logging.getLogger(__name__)

FORMAT = "optimas-fast-reward/1"
MANIFEST = "manifest.json"


def backbone_fingerprint(model: "RewardModel") -> dict:
    """What must match for weights to be loadable: architecture numbers and every parameter's name + shape."""
    c = model.hf_config
    shapes = sorted((n, tuple(p.shape)) for n, p in model.net.backbone.state_dict().items())
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return {"model_type": getattr(c, "model_type", None), "hidden_size": model.net.hidden_size,
            "num_hidden_layers": getattr(c, "num_hidden_layers", None), "vocab_size": getattr(c, "vocab_size", None),
            "param_shapes_sha256": digest, "name_or_path": getattr(c, "_name_or_path", "")}


def stable_parameters(model: "RewardModel") -> dict[str, torch.nn.Parameter]:
    """Parameters by position-independent names: "backbone.<name>", "heads.<component>.weight|bias"."""
    out = {f"backbone.{n}": p for n, p in model.net.backbone.named_parameters()}
    for comp, key in zip(model.components, model.net.head_keys):
        out[f"heads.{comp}.weight"] = model.net.head_weight[key]
        out[f"heads.{comp}.bias"] = model.net.head_bias[key]
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(model: "RewardModel", path: str | os.PathLike) -> None:
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    weights = {f"backbone.{n}": t for n, t in model.net.backbone.state_dict().items()}
    for comp, key in zip(model.components, model.net.head_keys):
        weights[f"heads.{comp}.weight"] = model.net.head_weight[key]
        weights[f"heads.{comp}.bias"] = model.net.head_bias[key]
    # clone: safetensors refuses tensors sharing storage (tied weights), and we must not hold views of
    # parameters that keep training
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    files: dict[str, str] = {}
    blob = st_save(weights)
    atomic_write_bytes(os.path.join(path, "model.safetensors"), blob)
    files["model.safetensors"] = _sha256(blob)
    trainer_meta = None
    tensors = {"model.head_rng": model._gen.get_state()}
    if model.trainer is not None:
        trainer_meta, t_tensors = model.trainer.state(stable_parameters(model))
        tensors.update(t_tensors)
    blob = st_save(tensors)
    atomic_write_bytes(os.path.join(path, "trainer.safetensors"), blob)
    files["trainer.safetensors"] = _sha256(blob)
    tok_dir = os.path.join(path, "tokenizer")
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-tok-", dir=path)
    try:
        model.tokenizer.save_pretrained(tmp_dir)
        if os.path.isdir(tok_dir):
            shutil.rmtree(tok_dir)
        os.replace(tmp_dir, tok_dir)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
    manifest = {
        "format": FORMAT,
        "backbone": {"fingerprint": backbone_fingerprint(model), "config": model.hf_config.to_dict()},
        "reward_config": asdict(model.config),
        "components": {c: model.descriptions[c] for c in model.components},
        "trainer": trainer_meta,
        "files": files,
    }
    atomic_write_bytes(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, default=str).encode())
    logger.info("saved reward checkpoint to %s (%d components)", path, len(model.components))


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
        raise ValueError(f"{os.path.join(path, name)} does not match the manifest's checksum: the checkpoint is "
                         "torn or was modified")
    return data


def load_checkpoint(model: "RewardModel", path: str | os.PathLike) -> None:
    """Restore weights, heads, components and trainer state exactly; ValueError for another backbone."""
    path = os.fspath(path)
    manifest = read_manifest(path)
    want, have = manifest["backbone"]["fingerprint"], backbone_fingerprint(model)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "param_shapes_sha256")
    diff = {k: (want.get(k), have.get(k)) for k in keys if want.get(k) != have.get(k)}
    if diff:
        raise ValueError(f"checkpoint {path!r} was written for another backbone "
                         f"({want.get('name_or_path') or want.get('model_type')}); mismatched (checkpoint, this "
                         f"model): {diff}")
    saved_cfg = manifest["reward_config"]
    if saved_cfg.get("pooling") != model.config.pooling or saved_cfg.get("architecture") != model.config.architecture:
        raise ValueError(f"checkpoint {path!r} used pooling={saved_cfg.get('pooling')!r}, architecture="
                         f"{saved_cfg.get('architecture')!r}; this model has {model.config.pooling!r}, "
                         f"{model.config.architecture!r}")
    weights = st_load(_read_checked(path, "model.safetensors", manifest))
    tensors = st_load(_read_checked(path, "trainer.safetensors", manifest))
    # heads: rebuild in the checkpoint's order (components added since are dropped, missing ones added)
    for comp in list(model.components):
        model.remove_component(comp)
    model.trainer = None  # the trainer is restored below (or absent in the checkpoint)
    for comp, desc in manifest["components"].items():
        model.add_component(comp, desc)
        key = model.net.head_keys[-1]
        with torch.no_grad():
            model.net.head_weight[key].copy_(weights[f"heads.{comp}.weight"])
            model.net.head_bias[key].copy_(weights[f"heads.{comp}.bias"])
    body = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    model.net.backbone.load_state_dict(body, strict=True)
    model._gen.set_state(tensors["model.head_rng"])
    if manifest["trainer"] is not None:
        model._get_trainer().load_state(manifest["trainer"], tensors, stable_parameters(model))
    logger.info("loaded reward checkpoint %s", path)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Components, backbone and trainer step of a checkpoint, without loading any weights."""
    m = read_manifest(path)
    return {"components": list(m["components"]), "backbone": m["backbone"]["fingerprint"],
            "step": (m["trainer"] or {}).get("step", 0)}
