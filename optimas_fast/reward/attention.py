"""The backbone's attention kernel when ``RewardConfig.attn_implementation == "sdpa"``.

It is torch's ``scaled_dot_product_attention`` (through transformers' own SDPA integration, masks included),
with one exception: bf16 inputs on the CPU with autograd recording (bf16 autocast training) run the attention
in fp32 and cast the output back to bf16. Why: the CPU SDPA kernels are slower in bf16 than in fp32 (no bf16
matmul inside them), most of all in the backward. Measured on a 2-core AMD EPYC with avx512_bf16, torch
2.13, one MiniLM-shaped call (8 rows x 12 heads x 356 tokens x 32 dims, padding mask), forward + backward:
81 ms in bf16, 59 ms in fp32; forward alone 18 ms either way. Whole MiniLM bf16 training on 356-token rows
goes about 10% faster (benchmarks/RESULTS.md). Forward-only calls (scoring) and every other device or dtype
take the plain SDPA path unchanged, so scores are identical to "sdpa"; in training the attention is computed
more precisely than in bf16, never less.

The kernel is registered with transformers under ``NAME`` (its mask function is SDPA's), so the backbone
dispatches to it through ``config._attn_implementation``; transformers does not write that field into a saved
``config.json``, so exported checkpoints still load anywhere with the loader's own default.

Shared-prefix scoring (``shared_prefix``): when a decoder scores many suffixes against a few prefixes, the
suffix call passes no KV cache. The kernel instead attends each suffix's queries to its own causal block and,
separately, to its prefix's keys/values held once per prefix, and merges the two softmaxes exactly by their
log-sum-exps. Why: expanding the prefix cache to every row (an index copy per layer), appending the suffix
keys (a cat per layer) and repeating grouped KV heads (a copy per layer) cost as much as the attention itself
on the CPU; here all rows of a prefix group attend to it as one long query block (rows x query heads per KV
head x suffix tokens), a large GEMM-shaped problem for the flash kernel, with no copy of the prefix at all.
Measured with SmolLM2-135M, 1 prompt (396 tokens) x 1024 candidates (44 tokens), bf16, 2-core EPYC: 20.6 vs
12.7 rows/s for the expanded path (benchmarks/RESULTS.md, "Shared-prefix kernel"). Inference on the CPU only (it reads the flash kernel's log-sum-exp, which autograd does
not differentiate); training and CUDA keep the expanded cache.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Sequence

import numpy as np
import torch

NAME = "optimas_sdpa"

_registered = False
_SHARED: contextvars.ContextVar = contextvars.ContextVar("optimas_shared_prefix", default=None)


def _cpu_flash():
    """torch's CPU flash-attention op (returns the log-sum-exp next to the output), or None if this torch lacks
    it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def shared_prefix_available(device: torch.device) -> bool:
    """Whether ``shared_prefix`` can run here: the CPU, with torch's CPU flash-attention op."""
    return device.type == "cpu" and _cpu_flash() is not None


class SharedPrefix:
    """The prefixes' keys/values for one suffix call, and where each suffix row's queries go.

    ``layers``: per decoder layer (keys, values), each (G, kv_heads, Lp, d), prefixes right-padded to Lp;
    ``group``: (R,) the prefix of each suffix row; ``prefix_lens``: (G,) real prefix lengths (all >= 1).
    Rows of a group attend to its prefix as one query block. Rows are laid out in G slots of ``rmax`` rows
    (the largest group) when that wastes little (G * rmax <= 1.5 R: pools, unique pairs); a run of very
    uneven groups instead gathers each row's prefix (R copies of the prefix keys, still no cat or repeat)."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], group: np.ndarray,
                 prefix_lens: np.ndarray):
        self.layers = list(layers)
        G, Lp = self.layers[0][0].shape[0], self.layers[0][0].shape[2]
        R = len(group)
        dev = self.layers[0][0].device
        if len(prefix_lens) != G or int(np.min(prefix_lens)) < 1:
            raise ValueError(f"prefix_lens must hold {G} lengths >= 1, got {list(prefix_lens)}")
        sizes = np.bincount(group, minlength=G)  # (G,)
        self.rmax = int(sizes.max())
        self.grouped = G * self.rmax <= 1.5 * R
        if self.grouped:
            order = np.argsort(group, kind="stable")  # (R,) rows by group, keeping their order inside
            start = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (G,)
            rank = np.empty(R, dtype=np.int64)
            rank[order] = np.arange(R) - start[group[order]]  # (R,) a row's place within its group
            slot = group.astype(np.int64) * self.rmax + rank  # (R,) slot of each row
            # identity layout (one group, or equal groups already in order): plain views, no gathers
            self.slot = None if np.array_equal(slot, np.arange(R)) and G * self.rmax == R else \
                torch.from_numpy(slot).to(dev)
            self.n_slots = G * self.rmax
            self.group = None
        else:
            self.slot = None
            self.n_slots = R
            self.group = torch.from_numpy(group.astype(np.int64)).to(dev)  # (R,)
        lens = torch.from_numpy(np.asarray(prefix_lens, dtype=np.int64)).to(dev)
        pad = torch.arange(Lp, device=dev)[None, :] >= lens[:, None]  # (G, Lp) True on prefix padding
        self._pad = pad if bool(pad.any()) else None
        self._masks: dict[torch.dtype, torch.Tensor] = {}

    def prefix_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask over the prefix keys, (G or R, 1, 1, Lp) in the queries' dtype, or None (no padding)."""
        if self._pad is None:
            return None
        if dtype not in self._masks:
            pad = self._pad if self.group is None else self._pad.index_select(0, self.group)
            m = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill_(pad, float("-inf"))
            self._masks[dtype] = m[:, None, None, :]
        return self._masks[dtype]


@contextlib.contextmanager
def shared_prefix(sp: SharedPrefix):
    """Within: every call of this kernel attends suffix queries to ``sp``'s prefixes too (see the module doc)."""
    token = _SHARED.set(sp)
    try:
        yield
    finally:
        _SHARED.reset(token)


def _shared_forward(sp: SharedPrefix, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scaling: float | None) -> torch.Tensor:
    """Attention of suffix queries over [its prefix ; its own causal block]: (R, Ls, heads, d)."""
    flash = _cpu_flash()
    if torch.is_autocast_enabled("cpu"):  # as autocast runs SDPA: every input in the autocast dtype (rotary
        dt = torch.get_autocast_dtype("cpu")  # embeddings leave q, k in fp32 beside a bf16 v)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    R, h, Ls, d = query.shape
    kvh = key.shape[1]
    g = h // kvh  # query heads per KV head (GQA); head i reads KV head i // g, as transformers' repeat_kv
    scale = scaling if scaling is not None else d ** -0.5
    kp, vp = sp.layers[module.layer_idx]  # (G, kvh, Lp, d)
    kp, vp = kp.to(query.dtype), vp.to(query.dtype)
    # own block: causal over the row's suffix (right padding sits after the real tokens, and only real tokens'
    # states are read, so no padding mask is needed); grouped KV repeated: a small (R, h, Ls, d) copy
    ks = key.repeat_interleave(g, dim=1) if g > 1 else key
    vs = value.repeat_interleave(g, dim=1) if g > 1 else value
    o_s, l_s = flash(query, ks, vs, 0.0, True, scale=scale)[:2]  # (R, h, Ls, d), (R, h, Ls) fp32
    mask = sp.prefix_mask(query.dtype)
    if sp.group is None:  # slots: each prefix once, its rows' queries as one block per KV head
        q = query if sp.slot is None else query.new_zeros(sp.n_slots, h, Ls, d).index_copy_(0, sp.slot, query)
        G, r = kp.shape[0], sp.n_slots // kp.shape[0]
        qg = q.reshape(G, r, kvh, g, Ls, d).permute(0, 2, 1, 3, 4, 5).reshape(G, kvh, r * g * Ls, d)
        o_p, l_p = flash(qg, kp, vp, 0.0, False, attn_mask=mask, scale=scale)[:2]  # (G, kvh, r g Ls, ...)
        o_p = o_p.reshape(G, kvh, r, g, Ls, d).permute(0, 2, 1, 3, 4, 5).reshape(G * r, h, Ls, d)
        l_p = l_p.reshape(G, kvh, r, g, Ls).permute(0, 2, 1, 3, 4).reshape(G * r, h, Ls)
        if sp.slot is not None:
            o_p, l_p = o_p.index_select(0, sp.slot), l_p.index_select(0, sp.slot)  # (R, h, Ls, d), (R, h, Ls)
    else:  # uneven groups: each row against its own prefix's keys (gathered)
        kr, vr = kp.index_select(0, sp.group), vp.index_select(0, sp.group)  # (R, kvh, Lp, d)
        o_p, l_p = flash(query.reshape(R, kvh, g * Ls, d), kr, vr, 0.0, False, attn_mask=mask, scale=scale)[:2]
        o_p, l_p = o_p.reshape(R, h, Ls, d), l_p.reshape(R, h, Ls)
    # exact merge of the two softmaxes: weights exp(lse_part - lse_all), in fp32
    lse = torch.logaddexp(l_p, l_s)  # (R, h, Ls)
    out = o_p.float() * (l_p - lse).exp_()[..., None] + o_s.float() * (l_s - lse).exp_()[..., None]
    return out.to(query.dtype).transpose(1, 2).contiguous()  # (R, Ls, h, d)


def _forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query/key/value: (B, heads, L, D) (key/value may have fewer heads: GQA); attention_mask: bool or additive
    sp = _SHARED.get()
    if sp is not None:  # a shared-prefix suffix call: the suffix-only mask transformers built is not needed
        return _shared_forward(sp, module, query, key, value, kwargs.get("scaling")), None
    if query.dtype == torch.bfloat16 and query.device.type == "cpu" and torch.is_grad_enabled():
        mask = attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask,
                                                  **kwargs)
        return out.to(query.dtype), weights  # out: (B, L, heads, D), transformers' layout
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Registers the kernel with transformers (idempotent) and returns its name."""
    global _registered
    if not _registered:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(NAME, _forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME
