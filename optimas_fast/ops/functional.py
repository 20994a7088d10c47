"""Public ops: checked wrapper -> backend choice -> autograd Function (fast backends) or the reference.

Numerics: the fast backends (cpp, triton) read float32/bfloat16/float16 hidden states, compute and
accumulate in float32, return losses and scores in float32 (scores: the promotion of hidden and W
dtypes), and gradients in each input's dtype. NaN in any input propagates to the outputs (it is not
an error: a NaN reward is something the caller must see, not a crash). float64 runs on the reference.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from optimas_fast.ops import _checks as chk
from optimas_fast.ops import reference as ref
from optimas_fast.ops._backend import select


def _impl(name: str):
    # Lazy: the triton module imports triton (slow) and is only needed when that backend runs.
    return importlib.import_module(f"optimas_fast.ops._{name}")


def _is_one(g: torch.Tensor) -> bool:
    """Upstream grad == 1 (the usual loss.backward()); checked on CPU only, where it costs no sync."""
    return g.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0


def _grads(ctx, *grads):
    """What ``backward`` returns: None for the options object (every Function's first argument), then each
    tensor input's gradient in forward's order, None where autograd did not ask for it."""
    need = ctx.needs_input_grad[1:]
    if len(grads) != len(need):
        raise RuntimeError(f"backward produced {len(grads)} gradients for {len(need)} tensor inputs")
    return (None, *(g if n else None for g, n in zip(grads, need)))


def _mean_denominator(w, B, reduction):
    """(S, 1/S) for the mean (S = sum of weights, or B), (1, 1) for sum."""
    if reduction != "mean":
        return None, 1.0
    if w is None:
        return None, 1.0 / B
    S = w.detach().to(torch.float32).sum()
    return S, 1.0 / float(S)  # one host-device sync on CUDA


# --------------------------------------------------------------------------------------------------
# bt_loss
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BTOptions:
    """The non-tensor arguments of BTLossFunction, passed as one object so that backward returns one
    None for them instead of a run of Nones lined up by position."""

    center: float  # lambda >= 0
    reduction: str  # "mean" | "sum" | "none"
    impl: str  # backend module: "cpp" | "triton"


class BTLossFunction(torch.autograd.Function):
    """apply(opts, r_chosen (B,), r_rejected (B,), weight (B,) | None, margin (B,) | None)."""

    @staticmethod
    def forward(ctx, opts: BTOptions, rc, rr, w, mu):
        impl = _impl(opts.impl)
        rows, gd, nls = impl.bt_loss_rows(rc, rr, w, mu, opts.center)  # (B,) each, f32
        S, scale = _mean_denominator(w, rc.shape[0], opts.reduction)
        out = rows if opts.reduction == "none" else rows.sum().mul_(scale)
        s = (rc.detach().float() + rr.detach().float()) if opts.center else None  # (B,), only for centering
        ctx.save_for_backward(gd, nls, s, out if w is not None and opts.reduction == "mean" else None)
        ctx.opts, ctx.scale, ctx.dtypes = opts, scale, (rc.dtype, rr.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        gd, nls, s, L = ctx.saved_tensors
        # scalar upstream grad on the CPU (the usual loss.backward()): a Python float, so each gradient is one
        # op (small-B calls are op-count bound: ~4 us an op); (B,) for reduction="none", or on CUDA: a tensor
        f = float(g) * ctx.scale if g.device.type == "cpu" and g.dim() == 0 else g.float() * ctx.scale
        if s is not None:
            cs = 2.0 * ctx.opts.center * s  # (B,)
            ga, gb = f * (gd + cs), f * (cs - gd)
        else:
            ga, gb = gd * f, gd * (-f)
        ga, gb = ga.to(ctx.dtypes[0]), gb.to(ctx.dtypes[1])
        # d/dw_j of sum_i l_i / sum_i w_i = nls_j / S - L / S  (weighted mean); nls_j for sum/none
        gw = (f * (nls - L) if L is not None else f * nls) if ctx.needs_input_grad[3] else None
        gmu = -f * gd if ctx.needs_input_grad[4] else None
        return _grads(ctx, ga, gb, gw, gmu)


def bt_loss(
    r_chosen,
    r_rejected,
    weight=None,
    margin=None,
    center: float = 0.0,
    reduction: str = "mean",
    *,
    backend: str | None = None,
):
    """Pairwise Bradley–Terry loss.

    r_chosen, r_rejected: (B,) rewards of the preferred and the other output of each pair.
    weight: (B,) >= 0 or None; margin: (B,) or None (subtracted: mu); center: lambda >= 0.
    l_i = -w_i * log sigmoid(r+_i - r-_i - mu_i) + center * (r+_i + r-_i)^2
    reduction: "mean" (divides by sum(w) when weights are given, else B), "sum" or "none" (B,).
    Stable for any |r+ - r-| (no inf/NaN up to float32 range).
    """
    chk.tensor(r_chosen, "r_chosen", 1)
    chk.tensor(r_rejected, "r_rejected", 1)
    B = r_chosen.shape[0]
    chk.size("r_rejected", r_rejected.shape[0], B, "length")
    chk.nonempty("r_chosen", B)
    reduction = chk.reduction(reduction)
    weight = chk.weights(weight, B, reduction)
    margin = chk.optional_rows(margin, "margin", B)
    center = chk.center(center)
    chk.same_device(("r_chosen", r_chosen), ("r_rejected", r_rejected), ("weight", weight), ("margin", margin))
    name = select(r_chosen.device, torch.promote_types(r_chosen.dtype, r_rejected.dtype), backend)
    if name == "torch":
        return ref.bt_loss(r_chosen, r_rejected, weight, margin, center, reduction)
    return BTLossFunction.apply(BTOptions(center, reduction, name), r_chosen, r_rejected, weight, margin)


# --------------------------------------------------------------------------------------------------
# multihead_score
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class HeadOptions:
    """The non-differentiable arguments of MultiheadScoreFunction."""

    head_ids: torch.Tensor  # (N,) int64, contiguous, validated in [0, C)
    impl: str  # "cpp" | "triton"


class MultiheadScoreFunction(torch.autograd.Function):
    """apply(opts, hidden (N, H), W (C, H), b (C,)) -> scores (N,)."""

    @staticmethod
    def forward(ctx, opts: HeadOptions, hidden, W, b):
        impl = _impl(opts.impl)
        W32 = W.detach().to(torch.float32).contiguous()  # (C, H): heads are small, fp32 math
        b32 = b.detach().to(torch.float32).contiguous()  # (C,)
        out = impl.multihead_score_fwd(hidden, opts.head_ids, W32, b32)  # (N,) f32
        ctx.save_for_backward(hidden, opts.head_ids, W32)
        ctx.impl, ctx.w_dtype, ctx.b_dtype = opts.impl, W.dtype, b.dtype
        return out.to(torch.promote_types(hidden.dtype, W.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        hidden, ids, W32 = ctx.saved_tensors
        _, need_h, need_W, need_b = ctx.needs_input_grad
        dh, dW, db = _impl(ctx.impl).multihead_score_bwd(hidden, ids, W32, g, need_h, need_W, need_b)
        return _grads(
            ctx, dh, dW.to(ctx.w_dtype) if dW is not None else None, db.to(ctx.b_dtype) if db is not None else None
        )


def multihead_score(hidden, head_ids, W, b, *, backend: str | None = None):
    """Each row scored by its own head: scores[n] = hidden[n] . W[head_ids[n]] + b[head_ids[n]].

    hidden: (N, H); head_ids: (N,) integers in [0, C); W: (C, H); b: (C,) -> scores (N,).
    Never forms the (N, C) product. N = 0 gives an empty result.
    """
    chk.tensor(hidden, "hidden", 2)
    N, H = hidden.shape
    chk.heads(W, b, H)
    chk.same_device(
        ("hidden", hidden), ("head_ids", head_ids if isinstance(head_ids, torch.Tensor) else None), ("W", W), ("b", b)
    )
    ids = chk.head_ids(head_ids, N, W.shape[0])
    name = select(hidden.device, hidden.dtype, backend)
    if name == "torch":
        return ref.multihead_score(hidden, ids, W, b)
    return MultiheadScoreFunction.apply(HeadOptions(ids, name), hidden.contiguous(), W, b)


# --------------------------------------------------------------------------------------------------
# fused_head_bt_loss
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FusedOptions:
    """The non-differentiable arguments of FusedHeadBTFunction."""

    head_ids: torch.Tensor  # (B,) int64, contiguous, validated in [0, C)
    center: float  # lambda >= 0
    reduction: str  # "mean" | "sum"
    impl: str  # "cpp" | "triton"


class FusedHeadBTFunction(torch.autograd.Function):
    """apply(opts, h_chosen (B, H), h_rejected (B, H), W (C, H), b (C,), weight (B,) | None, margin (B,) | None).

    Forward computes the loss AND every gradient in one pass over the hidden states (the rows are
    in cache once); backward only scales them by the upstream gradient. Saved for backward: the
    gradients themselves (same size as the inputs, which are not saved) and O(B) row terms."""

    @staticmethod
    def forward(ctx, opts: FusedOptions, hc, hr, W, b, w, mu):
        impl = _impl(opts.impl)
        need_grad = any(ctx.needs_input_grad[1:5])  # h_chosen, h_rejected, W, b
        W32 = W.detach().to(torch.float32).contiguous()  # (C, H)
        b32 = b.detach().to(torch.float32).contiguous()  # (C,)
        _, scale = _mean_denominator(w, hc.shape[0], opts.reduction)
        rows, gd, nls, dhc, dhr, dW, db = impl.fused_head_bt(
            hc, hr, opts.head_ids, W32, b32, w, mu, opts.center, scale, need_grad
        )
        out = rows.sum() * scale  # () f32
        ctx.save_for_backward(dhc, dhr, dW, db, gd, nls, out if (w is not None and opts.reduction == "mean") else None)
        ctx.scale, ctx.w_dtype, ctx.b_dtype = scale, W.dtype, b.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        dhc, dhr, dW, db, gd, nls, L = ctx.saved_tensors
        if not _is_one(g):
            dhc, dhr, dW, db = (None if t is None else t * g.to(t.dtype) for t in (dhc, dhr, dW, db))
        f = g.float() * ctx.scale
        gw = (f * (nls - L) if L is not None else f * nls) if ctx.needs_input_grad[5] else None
        gmu = -f * gd if ctx.needs_input_grad[6] else None
        return _grads(
            ctx,
            dhc,
            dhr,
            None if dW is None else dW.to(ctx.w_dtype),
            None if db is None else db.to(ctx.b_dtype),
            gw,
            gmu,
        )


def fused_head_bt_loss(
    h_chosen,
    h_rejected,
    head_ids,
    W,
    b,
    weight=None,
    margin=None,
    center: float = 0.0,
    reduction: str = "mean",
    *,
    backend: str | None = None,
):
    """Per-component head + Bradley–Terry loss, fused: scalar loss with gradients for h_chosen,
    h_rejected, W and b (and weight/margin if they require grad).

    h_chosen, h_rejected: (B, H) hidden states of the preferred / other output of each pair;
    head_ids: (B,) component of each pair, in [0, C); W: (C, H); b: (C,);
    weight, margin: (B,) or None; center >= 0; reduction: "mean" or "sum".
    Equals bt_loss(multihead_score(h_chosen, ...), multihead_score(h_rejected, ...), ...).
    """
    chk.tensor(h_chosen, "h_chosen", 2)
    chk.tensor(h_rejected, "h_rejected", 2)
    B, H = h_chosen.shape
    if h_rejected.shape != h_chosen.shape:
        raise ValueError(f"h_rejected: shape {tuple(h_rejected.shape)} differs from h_chosen {tuple(h_chosen.shape)}")
    if h_rejected.dtype != h_chosen.dtype:
        raise TypeError(f"h_rejected: dtype {h_rejected.dtype} differs from h_chosen {h_chosen.dtype}")
    chk.nonempty("h_chosen", B)
    chk.heads(W, b, H)
    reduction = chk.reduction(reduction, ("mean", "sum"))
    weight = chk.weights(weight, B, reduction)
    margin = chk.optional_rows(margin, "margin", B)
    center = chk.center(center)
    chk.same_device(
        ("h_chosen", h_chosen),
        ("h_rejected", h_rejected),
        ("head_ids", head_ids if isinstance(head_ids, torch.Tensor) else None),
        ("W", W),
        ("b", b),
        ("weight", weight),
        ("margin", margin),
    )
    ids = chk.head_ids(head_ids, B, W.shape[0])
    name = select(h_chosen.device, h_chosen.dtype, backend)
    if name == "torch":
        return ref.fused_head_bt_loss(h_chosen, h_rejected, ids, W, b, weight, margin, center, reduction)
    return FusedHeadBTFunction.apply(
        FusedOptions(ids, center, reduction, name), h_chosen.contiguous(), h_rejected.contiguous(), W, b, weight, margin
    )


# --------------------------------------------------------------------------------------------------
# last_token_hidden
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GatherOptions:
    """The non-differentiable arguments of LastTokenFunction."""

    positions: torch.Tensor  # (B,) int64: each row's last real token
    sparse_grad: bool  # return the gradient of hidden as a sparse COO tensor
    impl: str  # "torch" | "cpp" | "triton"


class LastTokenFunction(torch.autograd.Function):
    """apply(opts, hidden (B, T, H)) -> (B, H)."""

    @staticmethod
    def forward(ctx, opts: GatherOptions, hidden):
        B, T, H = hidden.shape
        pos = opts.positions
        if opts.impl == "torch":
            out = hidden[torch.arange(B, device=hidden.device), pos]  # (B, H)
        else:
            out = _impl(opts.impl).last_token_fwd(hidden, pos)  # (B, H)
        ctx.save_for_backward(pos)
        ctx.shape, ctx.sparse, ctx.impl = (B, T, H), opts.sparse_grad, opts.impl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (pos,) = ctx.saved_tensors
        B, T, H = ctx.shape
        g = g.contiguous()
        if ctx.sparse:
            # (B, T, H) hybrid COO: B sparse (row, position) entries with dense H-vectors; no B*T*H buffer.
            idx = torch.stack([torch.arange(B, device=g.device), pos])  # (2, B)
            grad = torch.sparse_coo_tensor(idx, g, (B, T, H), is_coalesced=True, check_invariants=False)
        elif ctx.impl == "torch":
            grad = g.new_zeros(B, T, H)
            grad[torch.arange(B, device=g.device), pos] = g
        else:
            grad = _impl(ctx.impl).last_token_bwd(g, pos, T)  # (B, T, H)
        return _grads(ctx, grad)


def last_token_hidden(
    hidden, lengths, padding_side: str = "right", *, sparse_grad: bool = False, backend: str | None = None
):
    """Hidden state at each row's last real token.

    hidden: (B, T, H); lengths: (B,) integers in [1, T] -> (B, H).
    padding_side="right": real tokens at [0, length), last at length-1;
    padding_side="left": real tokens at [T-length, T), last at T-1 (lengths still validated).
    sparse_grad=True returns the gradient of `hidden` as a sparse COO tensor (B non-zero rows) instead of a
    dense (B, T, H) zero-filled one: use it when `hidden` is a leaf; most backbone backward passes need
    the dense form.
    """
    chk.tensor(hidden, "hidden", 3)
    B, T, H = hidden.shape
    padding_side = chk.padding_side(padding_side)
    chk.same_device(("hidden", hidden), ("lengths", lengths if isinstance(lengths, torch.Tensor) else None))
    lengths = chk.lengths(lengths, B, T)
    pos = ref.last_token_positions(lengths, T, padding_side).contiguous()  # (B,) int64
    name = select(hidden.device, hidden.dtype, backend)
    if name == "torch" and not sparse_grad:
        return ref.last_token_hidden(hidden, lengths, padding_side)
    return LastTokenFunction.apply(GatherOptions(pos, sparse_grad, name), hidden.contiguous())
