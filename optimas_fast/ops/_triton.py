"""Launchers for the Triton kernels (optimas_fast.kernels); same contracts as _cpp.py.

Imported only when the triton backend is selected (importing triton costs ~1 s)."""

from __future__ import annotations

import functools

import torch
import triton

from optimas_fast.kernels._utils import elementwise_warps, row_block, row_launch, segment_launch, sorted_rows_launch
from optimas_fast.kernels.bt_loss import _bt_loss_fwd_kernel
from optimas_fast.kernels.fused_head_bt import _fused_head_bt_kernel, _fused_head_bt_sorted_kernel
from optimas_fast.kernels.last_token import _last_token_bwd_kernel, _last_token_fwd_kernel
from optimas_fast.kernels.multihead import _multihead_dx_kernel, _multihead_fwd_kernel, _segment_dw_kernel


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _multiprocessors(device: torch.device) -> int:
    """SMs of the tensors' GPU (read once per device, at first launch); 1 under the CPU interpreter, so that
    the tests' small batches still give each program a run of several rows and several heads."""
    if device.type != "cuda":
        return 1
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _f32(t):
    return None if t is None else t.detach().to(torch.float32).contiguous()


def bt_loss_rows(rc, rr, w, mu, center):
    rc, rr, w, mu = _f32(rc), _f32(rr), _f32(w), _f32(mu)
    B = rc.shape[0]
    loss, gd, nls = (torch.empty(B, dtype=torch.float32, device=rc.device) for _ in range(3))
    blk = row_block(B)
    _bt_loss_fwd_kernel[(triton.cdiv(B, blk),)](
        rc,
        rr,
        w if w is not None else rc,
        mu if mu is not None else rc,
        loss,
        gd,
        nls,
        B,
        center,
        HAS_W=w is not None,
        HAS_MU=mu is not None,
        BLOCK=blk,
        num_warps=elementwise_warps(blk),
    )
    return loss, gd, nls


def multihead_score_fwd(hidden, ids, W32, b32):
    N, H = hidden.shape
    out = torch.empty(N, dtype=torch.float32, device=hidden.device)
    if N:
        lc = row_launch(H)
        _multihead_fwd_kernel[(N,)](hidden, ids, W32, b32, out, H, BLOCK_H=lc.block_h, num_warps=lc.num_warps)
    return out


def _segment_dw(C, H, ids, xa, ga, xb=None, gb=None):
    """dW (C, H) f32 = sum over rows of ga[r] xa[r] (+ gb[r] xb[r]) into row ids[r], rows grouped by head."""
    N = ids.shape[0]
    dW = torch.zeros(C, H, dtype=torch.float32, device=xa.device)
    if N == 0:
        return dW
    order = torch.argsort(ids, stable=True)  # (N,) rows grouped by head
    offsets = torch.zeros(C + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(torch.bincount(ids, minlength=C), 0)
    lc = segment_launch(N, C, H)
    grid = (C, triton.cdiv(H, lc.block_h), lc.split)
    _segment_dw_kernel[grid](
        xa,
        ga,
        xb if xb is not None else xa,
        gb if gb is not None else ga,
        order,
        offsets,
        dW,
        H,
        lc.split,
        HAS_B=xb is not None,
        BLOCK_H=lc.block_h,
        num_warps=lc.num_warps,
    )
    return dW


def multihead_score_bwd(hidden, ids, W32, g, need_hidden, need_W, need_b):
    N, H = hidden.shape
    C = W32.shape[0]
    g = _f32(g)
    dh = dW = db = None
    if need_hidden:
        dh = torch.empty_like(hidden)
        if N:
            lc = row_launch(H)
            _multihead_dx_kernel[(N,)](g, ids, W32, dh, H, BLOCK_H=lc.block_h, num_warps=lc.num_warps)
    if need_W:
        dW = _segment_dw(C, H, ids, hidden, g)
    if need_b:
        db = torch.zeros(C, dtype=torch.float32, device=g.device).index_add_(0, ids, g)
    return dh, dW, db


def fused_head_bt(hc, hr, ids, W32, b32, w, mu, center, scale, need_grad):
    B, H = hc.shape
    C = W32.shape[0]
    dev = hc.device
    w, mu = _f32(w), _f32(mu)
    loss, gd, nls, ga, gb = (torch.empty(B, dtype=torch.float32, device=dev) for _ in range(5))
    dhc = torch.empty_like(hc) if need_grad else hc
    dhr = torch.empty_like(hr) if need_grad else hr
    lc = row_launch(H)
    if need_grad and H <= lc.block_h:
        # One pass over head-sorted rows: loss, d h+, d h- and dW while each row is read once (4 B H bytes
        # moved instead of the two-kernel path's 6 B H; the sort of B ids is small beside the rows).
        order = torch.argsort(ids, stable=True)  # (B,) rows grouped by head
        dW = torch.zeros(C, H, dtype=torch.float32, device=dev)
        sl = sorted_rows_launch(B, H, _multiprocessors(dev))
        _fused_head_bt_sorted_kernel[(sl.programs,)](
            hc,
            hr,
            ids,
            order,
            W32,
            b32,
            w if w is not None else loss,
            mu if mu is not None else loss,
            loss,
            gd,
            nls,
            ga,
            gb,
            dhc,
            dhr,
            dW,
            B,
            H,
            sl.rows_per_program,
            center,
            scale,
            HAS_W=w is not None,
            HAS_MU=mu is not None,
            BLOCK_H=sl.block_h,
            num_warps=sl.num_warps,
        )
        db = torch.zeros(C, dtype=torch.float32, device=dev).index_add_(0, ids, ga + gb)
        return loss, gd, nls, dhc, dhr, dW, db
    _fused_head_bt_kernel[(B,)](
        hc,
        hr,
        ids,
        W32,
        b32,
        w if w is not None else loss,
        mu if mu is not None else loss,
        loss,
        gd,
        nls,
        ga,
        gb,
        dhc,
        dhr,
        H,
        center,
        scale,
        HAS_W=w is not None,
        HAS_MU=mu is not None,
        GRAD=need_grad,
        BLOCK_H=lc.block_h,
        num_warps=lc.num_warps,
    )
    if not need_grad:
        return loss, gd, nls, None, None, None, None
    dW = _segment_dw(C, H, ids, hc, ga, hr, gb)
    db = torch.zeros(C, dtype=torch.float32, device=dev).index_add_(0, ids, ga + gb)
    return loss, gd, nls, dhc, dhr, dW, db


def last_token_fwd(hidden, pos):
    B, T, H = hidden.shape
    out = torch.empty(B, H, dtype=hidden.dtype, device=hidden.device)
    if B:
        lc = row_launch(H)
        _last_token_fwd_kernel[(B,)](hidden, pos, out, T, H, BLOCK_H=lc.block_h, num_warps=lc.num_warps)
    return out


def last_token_bwd(grad_out, pos, T):
    B, H = grad_out.shape
    grad = torch.zeros(B, T, H, dtype=grad_out.dtype, device=grad_out.device)
    if B:
        lc = row_launch(H)
        _last_token_bwd_kernel[(B,)](grad_out, pos, grad, T, H, BLOCK_H=lc.block_h, num_warps=lc.num_warps)
    return grad
