"""The backbone's attention kernel when ``RewardModelConfig.attn_implementation == "sdpa"``.

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

Shared-prefix attention (``shared_prefix``): when a decoder scores or trains on many suffixes against a few
prefixes, the suffix call passes no KV cache. The kernel instead attends each suffix's queries to its own causal
block and, separately, to its prefix's keys/values held once per prefix, and merges the two softmaxes exactly by
their log-sum-exps; in training the backward runs the flash kernel's backward on each part with the merged output
and log-sum-exp (exact). Why: expanding the prefix cache to every row (an index copy per layer), appending the
suffix keys (a cat per layer) and repeating grouped KV heads (a copy per layer) cost as much as the attention
itself on the CPU; here all rows of a prefix group attend to it as one long query block (rows x query heads per KV
head x suffix tokens), a large GEMM-shaped problem for the flash kernel, with no copy of the prefix at all.
Measured with SmolLM2-135M, 1 prompt (396 tokens) x 1024 candidates (44 tokens), bf16, 2-core EPYC: 20.6 vs 12.7
rows/s for the expanded path (benchmarks/RESULTS.md, "Shared-prefix kernel").

Kernels (``_attend`` / ``_attend_backward``, the only device-specific lines): the CPU runs torch's CPU flash kernel;
CUDA runs torch's flash kernel (FlashAttention-2: bf16 / fp16, no mask) where a part needs no mask, else its
memory-efficient kernel (any dtype, additive mask), both with their own backward ops; each returns the log-sum-exp
the merge needs. The layouts, the merge and the backward's bookkeeping are one code path for every device, so the
CPU exactness tests (tests/test_reward.py) run all of it but the CUDA kernel calls; tests/test_gpu_attention.py runs
the CUDA branch too on the CPU, through CPU emulations of those calls' contracts (``_CudaOps`` is the seam), and the
real kernels on a GPU. flash-attn (the package) is not used: torch's flash kernel is the same algorithm, and
flash-attn is neither on the GPU image nor small enough to carry there, so a path for it could not be tested anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

NAME = "optimas_sdpa"

_registered = False
_SHARED: contextvars.ContextVar = contextvars.ContextVar("optimas_shared_prefix", default=None)
# a dict layer index -> (keys, values) that this kernel fills during a prefix call run without a KV cache
_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("optimas_kv_capture", default=None)


# Which CUDA kernel the shared-prefix parts use: "auto" (flash where a part qualifies, else memory-efficient), or
# "flash" / "efficient" to force one (tests/test_gpu_attention.py checks each; "flash" still falls back to
# memory-efficient for a part flash cannot run: fp32, a mask, head dim over 256 or not a multiple of 8).
CUDA_KERNEL = "auto"
# the memory-efficient kernel reads its additive bias in 16-element aligned rows (as torch's SDPA pads it)
_BIAS_ALIGN = 16


def _cpu_flash():
    """torch's CPU flash-attention op (returns the log-sum-exp next to the output), or None if this torch lacks
    it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def shared_prefix_available(device: torch.device) -> bool:
    """Whether ``shared_prefix`` can run here: the CPU with torch's CPU flash-attention op, or CUDA with torch's
    memory-efficient attention op (in every CUDA build of torch since 2.0)."""
    if device.type == "cpu":
        return _cpu_flash() is not None
    return device.type == "cuda" and hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention")


def _cuda_kernel(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    """ "flash" or "efficient" for one CUDA part (see CUDA_KERNEL)."""
    d = q.shape[-1]
    flash_ok = mask is None and q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0
    return "flash" if flash_ok and CUDA_KERNEL in ("auto", "flash") else "efficient"


def _aligned_bias(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, Lk) additive mask -> (B, h, Lq, Lk) view of 16-aligned storage, as the memory-efficient kernel
    reads it (broadcast dims as stride 0: no copy per head or query)."""
    B, h, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    n = -(-Lk // _BIAS_ALIGN) * _BIAS_ALIGN
    buf = mask.new_zeros(mask.shape[0], 1, 1, n)  # (B, 1, 1, n)
    buf[..., :Lk] = mask
    return buf[..., :Lk].expand(B, h, Lq, Lk)


class _CudaOps:
    """torch's CUDA attention ops that return the log-sum-exp, as one object: the seam through which
    tests/test_gpu_attention.py runs every other line of the CUDA path on the CPU (it swaps in CPU emulations of
    these ops' contracts: the log-sum-exp rounded up to 32 rows, the philox / sequence-length state passed back)."""

    @staticmethod
    def flash_fwd(q, k, v, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)

    @staticmethod
    def flash_bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, causal, seed, off, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed, off, scale=scale
        )

    @staticmethod
    def efficient_fwd(q, k, v, bias, causal, scale):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)

    @staticmethod
    def efficient_bwd(dout, q, k, v, bias, out, lse, seed, off, causal, scale):
        return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse, seed, off, 0.0, [True, True, True, False], causal, scale=scale
        )


_cuda_ops = _CudaOps()


def _kernel(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    """ "cpu", "flash" or "efficient": the kernel one part runs on."""
    return "cpu" if q.device.type == "cpu" else _cuda_kernel(q, mask)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Softmax attention (B, h, Lq, d) x (B, h, Lk, d) by the device's kernel: (out in q's dtype, log-sum-exp
    (B, h, Lq) fp32, state for ``_attend_backward``). ``mask``: additive, (B, 1, 1, Lk), or None."""
    Lq = q.shape[2]
    kind = _kernel(q, mask)
    if kind == "cpu":
        out, lse = _cpu_flash()(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)[:2]
        return out, lse, ("cpu",)
    if kind == "flash":
        out, lse, cq, ck, mq, mk, seed, off, _ = _cuda_ops.flash_fwd(q, k, v, causal, scale)
        state = ("flash", lse.shape[-1], cq, ck, mq, mk, seed, off)
    else:
        bias = None if mask is None else _aligned_bias(mask, q, k)
        out, lse, seed, off = _cuda_ops.efficient_fwd(q, k, v, bias, causal, scale)
        state = ("efficient", lse.shape[-1], bias, seed, off)
    # the kernels may round the log-sum-exp's length up (memory-efficient: to a multiple of 32); the merge and
    # the backward's saved copy use the real rows, and the backward pads back to the kernel's length
    return out, lse[..., :Lq], state


def _attend_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    scale: float,
    state: tuple,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``_attend`` given the MERGED output and log-sum-exp (see _SharedPrefixAttention)."""
    kind = state[0]
    if kind == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    n = state[1]
    lse = torch.nn.functional.pad(lse, (0, n - lse.shape[-1])).contiguous()  # (B, h, n) as the kernel made it
    if kind == "flash":
        _, _, cq, ck, mq, mk, seed, off = state
        return _cuda_ops.flash_bwd(dout, q, k, v, out, lse, cq, ck, mq, mk, causal, seed, off, scale)
    _, _, bias, seed, off = state
    dq, dk, dv, _ = _cuda_ops.efficient_bwd(dout, q, k, v, bias, out, lse, seed, off, causal, scale)
    return dq, dk, dv


class SharedPrefix:
    """The prefixes' keys/values for one suffix call, and where each suffix row's queries go.

    ``layers``: per decoder layer (keys, values), each (G, kv_heads, Lp, d), prefixes right-padded to Lp;
    ``group``: (R,) the prefix of each suffix row; ``prefix_lens``: (G,) real prefix lengths (all >= 1).
    Rows of a group attend to its prefix as one query block. Rows are laid out in G slots of ``rmax`` rows
    (the largest group) when that wastes little (G * rmax <= 1.5 R: pools, unique pairs); a run of very
    uneven groups instead gathers each row's prefix (R copies of the prefix keys, still no cat or repeat)."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], group: np.ndarray, prefix_lens: np.ndarray):
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
            self.slot = (
                None if np.array_equal(slot, np.arange(R)) and G * self.rmax == R else torch.from_numpy(slot).to(dev)
            )
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


@contextlib.contextmanager
def capture_kv():
    """Within: each layer's keys and values of the forward call that runs are collected into the yielded dict
    (layer index -> (keys, values), each (B, kv_heads, L, d), as a KV cache holds them). Why: under activation
    checkpointing transformers runs no KV cache, yet the shared-prefix kernel needs the prefix's keys and values;
    taken here they stay in the autograd graph, and the checkpointed layers that made them are recomputed in the
    backward like any other."""
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    token = _CAPTURE.set(layers)
    try:
        yield layers
    finally:
        _CAPTURE.reset(token)


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): a checkpointed layer's recompute in the backward
    runs in the shared-prefix context its forward ran in (a suffix call's ``SharedPrefix``: without it the recompute
    would attend to the suffix alone) and captures nothing (a prefix call's capture is over by then)."""
    sp = _SHARED.get()

    @contextlib.contextmanager
    def recompute():
        t_sp, t_cap = _SHARED.set(sp), _CAPTURE.set(None)
        try:
            yield
        finally:
            _CAPTURE.reset(t_cap)
            _SHARED.reset(t_sp)

    return contextlib.nullcontext(), recompute()


def _to_groups(sp: SharedPrefix, x: torch.Tensor, G: int, kvh: int) -> torch.Tensor:
    """(R, h, Ls, ...) per-row tensor -> (G, kvh, r * g * Ls, ...) with each prefix group's rows as one block
    per KV head (r = slots per group; empty slots hold zeros: finite, and they add nothing to a gradient)."""
    R, h, Ls, *tail = x.shape
    if sp.slot is not None:
        x = x.new_zeros((sp.n_slots, h, Ls, *tail)).index_copy_(0, sp.slot, x)
    r, g = sp.n_slots // G, h // kvh
    x = x.reshape(G, r, kvh, g, Ls, *tail).permute(0, 2, 1, 3, 4, *range(5, 5 + len(tail)))
    return x.reshape(G, kvh, r * g * Ls, *tail)


def _from_groups(sp: SharedPrefix, x: torch.Tensor, h: int, Ls: int) -> torch.Tensor:
    """Inverse of ``_to_groups``: (G, kvh, r * g * Ls, ...) -> (R, h, Ls, ...)."""
    G, kvh, _, *tail = x.shape
    r, g = sp.n_slots // G, h // kvh
    x = x.reshape(G, kvh, r, g, Ls, *tail).permute(0, 2, 1, 3, 4, *range(5, 5 + len(tail)))
    x = x.reshape(G * r, h, Ls, *tail)
    return x if sp.slot is None else x.index_select(0, sp.slot)


class _SharedPrefixAttention(torch.autograd.Function):
    """apply(sp, scale, query (R, h, Ls, d), key (R, kvh, Ls, d), value, prefix keys (G, kvh, Lp, d),
    prefix values) -> (R, h, Ls, d): softmax attention of each suffix query over [its prefix ; its own causal
    block]. Forward: the two parts by the device's kernel (``_attend``), merged by log-sum-exp. Backward: the same
    kernel's backward on each part with the MERGED output and log-sum-exp (each key block's probabilities are
    exp(s - lse) of the whole softmax, as flash attention's own backward works block by block), so the
    gradients are exact; a prefix's key/value gradient sums over all its rows inside the one call."""

    @staticmethod
    def forward(ctx, sp, scale, query, key, value, kp, vp):
        R, h, Ls, d = query.shape
        G, kvh = kp.shape[0], kp.shape[1]
        g = h // kvh  # query heads per KV head (GQA); head i reads KV head i // g, as transformers' repeat_kv
        # own block: causal over the row's suffix (right padding sits after the real tokens, and only real
        # tokens' states are read, so no padding mask is needed); KV heads repeated: a small (R, h, Ls, d) copy
        ks = key.repeat_interleave(g, dim=1) if g > 1 else key
        vs = value.repeat_interleave(g, dim=1) if g > 1 else value
        o_s, l_s, st_s = _attend(query, ks, vs, True, None, scale)  # (R, h, Ls, d), (R, h, Ls) fp32
        mask = sp.prefix_mask(query.dtype)
        if sp.group is None:  # slots: each prefix once, its rows' queries as one block per KV head
            o_p, l_p, st_p = _attend(_to_groups(sp, query, G, kvh), kp, vp, False, mask, scale)
            o_p, l_p = _from_groups(sp, o_p, h, Ls), _from_groups(sp, l_p, h, Ls)  # (R, h, Ls, d), (R, h, Ls)
        else:  # uneven groups: each row against its own prefix's keys (gathered)
            kr, vr = kp.index_select(0, sp.group), vp.index_select(0, sp.group)  # (R, kvh, Lp, d)
            o_p, l_p, st_p = _attend(query.reshape(R, kvh, g * Ls, d), kr, vr, False, mask, scale)
            o_p, l_p = o_p.reshape(R, h, Ls, d), l_p.reshape(R, h, Ls)
        # exact merge of the two softmaxes: weights exp(lse_part - lse_all), in fp32
        lse = torch.logaddexp(l_p, l_s)  # (R, h, Ls)
        out = (o_p.float() * (l_p - lse).exp_()[..., None] + o_s.float() * (l_s - lse).exp_()[..., None]).to(
            query.dtype
        )  # (R, h, Ls, d)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(query, ks, vs, kp, vp, out, lse)
            ctx.sp, ctx.scale, ctx.g, ctx.states = sp, scale, g, (st_s, st_p)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        query, ks, vs, kp, vp, out, lse = ctx.saved_tensors
        sp, scale, g = ctx.sp, ctx.scale, ctx.g
        st_s, st_p = ctx.states
        R, h, Ls, d = query.shape
        G, kvh = kp.shape[0], kp.shape[1]
        dout = dout.contiguous()
        dq, dks, dvs = _attend_backward(dout, query, ks, vs, out, lse, True, None, scale, st_s)  # own block
        dkey = dks.reshape(R, kvh, g, Ls, d).sum(2) if g > 1 else dks  # (R, kvh, Ls, d): repeated heads summed
        dvalue = dvs.reshape(R, kvh, g, Ls, d).sum(2) if g > 1 else dvs
        mask = sp.prefix_mask(query.dtype)
        if sp.group is None:
            dq_g, dkp, dvp = _attend_backward(
                _to_groups(sp, dout, G, kvh),
                _to_groups(sp, query, G, kvh),
                kp,
                vp,
                _to_groups(sp, out, G, kvh),
                _to_groups(sp, lse, G, kvh).contiguous(),
                False,
                mask,
                scale,
                st_p,
            )
            dq = dq + _from_groups(sp, dq_g, h, Ls)
        else:
            kr, vr = kp.index_select(0, sp.group), vp.index_select(0, sp.group)  # (R, kvh, Lp, d)
            dq_r, dkr, dvr = _attend_backward(
                dout.reshape(R, kvh, g * Ls, d),
                query.reshape(R, kvh, g * Ls, d),
                kr,
                vr,
                out.reshape(R, kvh, g * Ls, d),
                lse.reshape(R, kvh, g * Ls),
                False,
                mask,
                scale,
                st_p,
            )
            dq = dq + dq_r.reshape(R, h, Ls, d)
            dkp = torch.zeros_like(kp).index_add_(0, sp.group, dkr)  # (G, kvh, Lp, d): rows summed per prefix
            dvp = torch.zeros_like(vp).index_add_(0, sp.group, dvr)
        return None, None, dq, dkey, dvalue, dkp, dvp


def _shared_forward(
    sp: SharedPrefix, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Attention of suffix queries over [its prefix ; its own causal block]: (R, Ls, heads, d)."""
    # as autocast runs SDPA: inputs and output in the autocast dtype (rotary embeddings leave q, k in fp32
    # beside a bf16 v); bf16 CPU training computes in fp32, as _forward does (see the module doc); CUDA's kernels
    # are fast in bf16, so CUDA stays in it
    dev = query.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    dt = torch.float32 if out_dtype == torch.bfloat16 and torch.is_grad_enabled() and dev == "cpu" else out_dtype
    kp, vp = sp.layers[module.layer_idx]  # (G, kvh, Lp, d)
    with torch.autocast(dev, enabled=False):
        out = _SharedPrefixAttention.apply(
            sp,
            scaling if scaling is not None else query.shape[-1] ** -0.5,
            query.to(dt),
            key.to(dt),
            value.to(dt),
            kp.to(dt),
            vp.to(dt),
        )
    return out.to(out_dtype).transpose(1, 2).contiguous()  # (R, Ls, h, d)


def _forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query/key/value: (B, heads, L, D) (key/value may have fewer heads: GQA); attention_mask: bool or additive
    sp = _SHARED.get()
    captured = _CAPTURE.get()
    if captured is not None:  # a prefix call without a KV cache (activation checkpointing): keep its keys/values
        captured[module.layer_idx] = (key, value)
    if sp is not None:  # a shared-prefix suffix call: the suffix-only mask transformers built is not needed
        return _shared_forward(sp, module, query, key, value, kwargs.get("scaling")), None
    if query.dtype == torch.bfloat16 and query.device.type == "cpu" and torch.is_grad_enabled():
        mask = attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
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
