"""Data out and in: a trained RewardModel as a standard Hugging Face checkpoint, and HF reward models in.

Two export layouts, chosen by what Hugging Face can reproduce exactly:

* ``seq-cls`` -- decoder backbones with last-token pooling. ``<Arch>ForSequenceClassification`` scores a
  sequence with a bias-free linear layer on the hidden state of its last non-pad token, which is exactly our
  ``W[c] · h_last + b[c]`` without ``b``. The export is ``save_pretrained`` output (``config.json`` with
  ``num_labels = C`` and ``id2label`` = component names, ``model.safetensors``, tokenizer files) that
  ``AutoModelForSequenceClassification.from_pretrained(dir)`` loads; logit ``c`` is head ``c``'s score.
  **The per-head bias is dropped**: the Bradley-Terry loss only sees score differences within one head, so
  a per-head constant changes no ranking and no pairwise probability; the dropped values are recorded in
  ``optimas_reward.json`` (tests check that rankings within each head are unchanged). LoRA adapters are
  merged into the weights.
* ``backbone+heads`` -- encoders (mean or [CLS] pooling) and decoders with non-last pooling, for which no
  HF head class pools the same way: the backbone as ``AutoModel`` ``save_pretrained`` output, the heads in
  ``reward_heads.safetensors`` (``weight`` (C, H), ``bias`` (C,)), the pooling in ``optimas_reward.json``.
  ``RewardModel.from_pretrained(dir)`` and a ten-line plain-transformers snippet (README) reproduce the
  scores.

Both layouts carry ``optimas_reward.json``: the text template (so a serving side renders rows the same
way), the components with their descriptions, and the pooling. How a row becomes tokens, exactly as the
engine does it (``template.TokenCache``)::

    prefix text = prefix_format.format(description=..., inputs=...)
    ids         = [BOS or CLS] + tok(prefix text) [+ SEP] + tok(outputs) [+ SEP] [+ EOS]   (two separate calls)

(SEP on encoders; EOS on decoders exported with ``template.append_eos`` true, TRL's layout, so the score is
read at the EOS token. When the tokenizer's pad id is its EOS id, a seq-cls export gets another pad id
(``pad_token_id`` in the meta, in config.json and in the saved tokenizer): HF pools the last token that is not
the pad id, which would otherwise skip the EOS.)

Tokenising ``prefix text + outputs`` in one call gives the same ids whenever the tokenizer splits at the
newline that ends the prefix (byte-level BPE and WordPiece tokenizers do); serving code that needs
bit-identical ids should tokenise the two halves separately.

Import: ``load_pretrained(dir)`` (``RewardModel.from_pretrained``) reads either export, and also a plain HF
decoder reward model (``*ForSequenceClassification`` with a ``score`` layer): its score layer becomes the
heads (one per label; bias 0) and the template is ``"{inputs}"`` (prompt text followed by the response), so an
existing reward model can be scored and adapted here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from optimas_fast._io import atomic_write_bytes

from .config import RewardModelConfig
from .heads import HeadRegistry
from .template import TemplateConfig


class Exportable(Protocol):
    """What export reads of a reward model (its ``Encoder`` is one: ``export_hf(rm.encoder, path)``). The facade
    calls into this module, never the other way round: export names the parts it reads here instead of importing
    the facade."""

    net: Any  # the RewardNet: backbone, stacked_heads(), head_keys, head_weight / head_bias
    components: HeadRegistry  # head names in head order, their descriptions (the template's prefix)
    tokenizer: Any  # the backbone's tokenizer
    tokens: Any  # the TokenCache: appends_eos, eos
    config: RewardModelConfig
    is_encoder: bool
    pooling: str


class Built(Protocol):
    """What ``load_pretrained``'s ``build`` returns (``RewardModel`` is one): a model whose encoder takes the heads."""

    encoder: Exportable


M = TypeVar("M", bound=Built)

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "optimas-fast-hf-export/1"
META = "optimas_reward.json"
HEADS = "reward_heads.safetensors"


# ------------------------------------------------------------------------------------------------ helpers
def _plain_backbone(model: Exportable) -> nn.Module:
    """A CPU fp32 copy of the backbone with LoRA adapters merged (the live model is not touched)."""
    backbone = copy.deepcopy(model.net.backbone).to("cpu").float()
    if hasattr(backbone, "merge_and_unload"):  # a peft model: fold the adapters into the base weights
        backbone = backbone.merge_and_unload()
    return backbone.eval()


def _pad_id(model: Exportable) -> int:
    pad = getattr(model, "pad_id", None)
    if pad is not None:
        return int(pad)
    tok = model.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def _export_pad_id(model: Exportable) -> int:
    """The seq-cls export's pad id: the engine's, unless it equals the EOS the rows end with (append_eos), which
    HF's last-non-pad pooling would then skip; then the tokenizer's UNK, else 0 (or 1 if EOS is 0). Any id other
    than EOS is exact: with append_eos every row's last real token is the EOS."""
    pad = _pad_id(model)
    if not model.tokens.appends_eos:
        return pad
    eos = model.tokens.eos[0]
    if pad != eos:
        return pad
    unk = model.tokenizer.unk_token_id
    new = unk if unk is not None and unk != eos else (1 if eos == 0 else 0)
    logger.info(
        "export: the pad id %d is the EOS that append_eos ends rows with; the export pads with id %d "
        "(HF pools the last non-pad token)",
        pad,
        new,
    )
    return int(new)


def export_layout(model: Exportable) -> str:
    """``"seq-cls"`` for last-token-pooled decoders (exact in HF), else ``"backbone+heads"``."""
    return "seq-cls" if (not model.is_encoder and model.pooling == "last") else "backbone+heads"


def _meta(model: Exportable, layout: str, biases: list[float], pad_id: int | None) -> dict:
    t = model.config.template
    eos = bool(model.tokens.appends_eos)  # what the engine does (not the flag alone: encoders ignore it)
    return {
        "format": EXPORT_FORMAT,
        "layout": layout,
        "architecture": "encoder" if model.is_encoder else "decoder",
        "pooling": model.pooling,
        "components": list(model.components),
        "descriptions": dict(model.components.descriptions),
        "template": {
            "prefix_format": t.prefix_format,
            "max_length": t.max_length,
            "truncation_side": t.truncation_side,
            "min_prefix_tokens": t.min_prefix_tokens,
            "append_eos": eos,
            "eos_token_id": model.tokens.eos[0] if eos else None,
            "tokenisation": "lead + tok(prefix text) [+ sep] + tok(outputs) [+ sep] [+ eos], two calls; "
            "lead = CLS (encoders) or BOS (decoders) when the tokenizer has one, "
            "sep = SEP on encoders only, eos = EOS on decoders when append_eos",
        },
        "pad_token_id": pad_id,
        # seq-cls: the heads' biases are dropped (BT training is invariant to a per-head constant)
        "dropped_bias": biases if layout == "seq-cls" else None,
    }


def _write_dir_atomically(out_dir: str, fill) -> None:
    """Build the export in a sibling temp dir, then swap it in, so a crash never leaves half an export."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        fill(tmp)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- export
def export_hf(model: Exportable, out_dir: str | os.PathLike) -> dict:
    """Write ``model`` as a Hugging Face checkpoint in ``out_dir`` (replaced atomically); returns the meta.

    Decoders with last-token pooling become ``<Arch>ForSequenceClassification`` (see the module docstring
    for what changes: the per-head bias is dropped); everything else is backbone + heads + pooling config.
    """
    if not all(hasattr(model, a) for a in ("net", "components", "tokenizer", "config")):
        raise TypeError(f"model must be a RewardModel, got {type(model).__name__}")
    if not model.components:
        raise ValueError("model has no components (heads): nothing to export")
    layout = export_layout(model)
    W, b = (t.detach().to("cpu", torch.float32).clone() for t in model.net.stacked_heads())  # (C, H), (C,)
    backbone = _plain_backbone(model)
    pad_id = _export_pad_id(model) if layout == "seq-cls" else None
    meta = _meta(model, layout, [float(x) for x in b], pad_id)
    names = list(model.components)

    def fill(tmp: str) -> None:
        if layout == "seq-cls":
            from transformers import AutoModelForSequenceClassification

            cfg = copy.deepcopy(backbone.config)
            cfg.num_labels = len(names)
            cfg.id2label = {i: n for i, n in enumerate(names)}
            cfg.label2id = {n: i for i, n in enumerate(names)}
            cfg.pad_token_id = pad_id  # HF pools the last non-pad token, and batches need one
            cfg.problem_type = "regression"  # reward scores are real numbers, not class logits
            seq = AutoModelForSequenceClassification.from_config(cfg)
            base = getattr(seq, seq.base_model_prefix)
            missing, unexpected = base.load_state_dict(backbone.state_dict(), strict=False)
            if unexpected or [k for k in missing if "rotary" not in k]:
                raise ValueError(
                    f"cannot place the backbone in {type(seq).__name__}: missing {missing}, unexpected {unexpected}"
                )
            head = getattr(seq, "score", None)
            if not isinstance(head, nn.Linear) or head.bias is not None:
                raise ValueError(f"{type(seq).__name__} has no bias-free `score` layer; cannot export as seq-cls")
            with torch.no_grad():
                head.weight.copy_(W)  # (C, H)
            seq.save_pretrained(tmp, safe_serialization=True)
            # transformers 5 derives num_labels from id2label and leaves it out of config.json; write it anyway
            # for readers that look for the key itself
            cpath = os.path.join(tmp, "config.json")
            with open(cpath) as f:
                written = json.load(f)
            written["num_labels"] = len(names)
            atomic_write_bytes(cpath, json.dumps(written, indent=2, sort_keys=True).encode())
        else:
            backbone.save_pretrained(tmp, safe_serialization=True)
            save_file({"weight": W.contiguous(), "bias": b.contiguous()}, os.path.join(tmp, HEADS))
        tok = copy.deepcopy(model.tokenizer)
        tok.truncation_side = model.config.template.truncation_side  # the engine cuts the prefix's start
        if pad_id is not None and tok.pad_token_id != pad_id:  # a serving side pads with what config.json pools
            tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        tok.save_pretrained(tmp)
        atomic_write_bytes(os.path.join(tmp, META), json.dumps(meta, indent=1).encode())

    _write_dir_atomically(os.fspath(out_dir), fill)
    logger.info("exported reward model (%s, %d heads) to %s", layout, len(names), out_dir)
    return meta


# ------------------------------------------------------------------------------------------------- import
def _set_heads(model: Exportable, W: torch.Tensor, b: torch.Tensor) -> None:
    """Overwrite the heads (in component order) with W (C, H) and b (C,)."""
    with torch.no_grad():
        for i, key in enumerate(model.net.head_keys):
            model.net.head_weight[key].copy_(W[i].to(model.net.head_weight[key]))
            model.net.head_bias[key].copy_(b[i : i + 1].to(model.net.head_bias[key]))


def _read_meta(path: str) -> dict | None:
    p = os.path.join(path, META)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        meta = json.load(f)
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{p}: unsupported export format {meta.get('format')!r} (expected {EXPORT_FORMAT})")
    return meta


def _template(meta: dict) -> TemplateConfig:
    t = meta["template"]
    return TemplateConfig(
        max_length=int(t["max_length"]),
        prefix_format=t["prefix_format"],
        truncation_side=t["truncation_side"],
        min_prefix_tokens=int(t["min_prefix_tokens"]),
        append_eos=bool(t.get("append_eos", False)),
    )  # absent in exports made before it


def _seq_cls_parts(path: str) -> tuple[nn.Module, nn.Linear, Any]:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(cfg, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"{path}: config.json names architectures {archs}: not a *ForSequenceClassification "
            "reward model, and there is no optimas_reward.json (not an optimas-fast export)"
        )
    seq = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    head = getattr(seq, "score", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{path}: {type(seq).__name__} has no `score` linear layer; only decoder reward models "
            "(a linear score on the last token) can be imported (encoder classifiers pool through "
            "their own pooler layer, which RewardModel does not reproduce)"
        )
    return getattr(seq, seq.base_model_prefix), head, cfg


def load_pretrained(
    path: str | os.PathLike,
    build: Callable[..., M],
    config: RewardModelConfig,
    config_given: bool,
    device: str | torch.device | None = None,
) -> M:
    """A RewardModel from an optimas-fast HF export or a plain HF decoder ``*ForSequenceClassification``.

    ``build(backbone, components, tokenizer=, config=, device=)`` constructs the model (the facade passes
    itself). ``config`` is the RewardModelConfig to start from: for plain HF models it applies as given
    (``config_given=False`` switches the template to ``"{inputs}"``); for exports the stored template and
    pooling replace its own.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory (expected a Hugging Face checkpoint)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json: not a Hugging Face checkpoint")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    meta = _read_meta(path)
    base_cfg = config
    if meta is None:  # a plain HF reward model: prompt text + response, scored at the last token
        backbone, head, hf_cfg = _seq_cls_parts(path)
        n = head.weight.shape[0]
        id2label = getattr(hf_cfg, "id2label", None) or {i: f"LABEL_{i}" for i in range(n)}
        names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
        cfg = copy.deepcopy(base_cfg)
        if not config_given:
            cfg.template = TemplateConfig(prefix_format="{inputs}")
        cfg.architecture, cfg.pooling = "decoder", "last"
        model = build(backbone, {c: c for c in names}, tokenizer=tok, config=cfg, device=device)
        bias = head.bias.detach() if head.bias is not None else torch.zeros(n)
        _set_heads(model.encoder, head.weight.detach().float(), bias.float())
        return model
    cfg = copy.deepcopy(base_cfg)
    cfg.template = _template(meta)
    cfg.architecture, cfg.pooling = meta["architecture"], meta["pooling"]
    comps = {c: meta["descriptions"].get(c, c) for c in meta["components"]}
    if meta["layout"] == "seq-cls":
        backbone, head, _ = _seq_cls_parts(path)
        model = build(backbone, comps, tokenizer=tok, config=cfg, device=device)
        _set_heads(model.encoder, head.weight.detach().float(), torch.zeros(head.weight.shape[0]))
        return model
    backbone = AutoModel.from_pretrained(path, local_files_only=True)
    heads = load_file(os.path.join(path, HEADS))
    model = build(backbone, comps, tokenizer=tok, config=cfg, device=device)
    _set_heads(model.encoder, heads["weight"].float(), heads["bias"].float())
    return model
