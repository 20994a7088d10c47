"""Fused per-component head + Bradley–Terry loss: one program per pair computes both scores, the loss
terms and the gradients of both hidden rows while W[c] is hot. dW comes from the segmented reduction in
multihead.py (rows sorted by head), which avoids per-row atomics on a few hot heads."""

import triton
import triton.language as tl

from .bt_loss import _bt_row_terms


@triton.jit
def _fused_head_bt_kernel(
    XC,
    XR,
    IDS,
    W,
    BIAS,
    WT,
    MU,
    LOSS,
    GD,
    NLS,
    GA,
    GB,
    DXC,
    DXR,
    H,
    center,
    scale,
    HAS_W: tl.constexpr,
    HAS_MU: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.load(IDS + row)
    acc_c = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        w = tl.load(W + c * H + offs, mask=m, other=0.0)
        acc_c += tl.load(XC + row * H + offs, mask=m, other=0.0).to(tl.float32) * w
        acc_r += tl.load(XR + row * H + offs, mask=m, other=0.0).to(tl.float32) * w
    bias = tl.load(BIAS + c)
    rc = tl.sum(acc_c, axis=0) + bias
    rr = tl.sum(acc_r, axis=0) + bias
    wt = tl.load(WT + row) if HAS_W else 1.0
    mu = tl.load(MU + row) if HAS_MU else 0.0
    loss, gd, nls, s = _bt_row_terms(rc, rr, wt, mu, center)
    tl.store(LOSS + row, loss)
    tl.store(GD + row, gd)
    tl.store(NLS + row, nls)
    if GRAD:
        ga = scale * (gd + 2.0 * center * s)  # dL/d r_chosen
        gb = scale * (-gd + 2.0 * center * s)  # dL/d r_rejected
        tl.store(GA + row, ga)
        tl.store(GB + row, gb)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            m = offs < H
            w = tl.load(W + c * H + offs, mask=m, other=0.0)
            tl.store(DXC + row * H + offs, (ga * w).to(DXC.dtype.element_ty), mask=m)
            tl.store(DXR + row * H + offs, (gb * w).to(DXR.dtype.element_ty), mask=m)


@triton.jit
def _fused_head_bt_sorted_kernel(
    XC,
    XR,
    IDS,
    ORDER,
    W,
    BIAS,
    WT,
    MU,
    LOSS,
    GD,
    NLS,
    GA,
    GB,
    DXC,
    DXR,
    DW,
    B,
    H,
    ROWS_PER_PROGRAM,
    center,
    scale,
    HAS_W: tl.constexpr,
    HAS_MU: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Loss, d h+, d h- AND dW in one pass over the hidden states, for rows that fit one column block
    (H <= BLOCK_H). Rows are visited in head order (ORDER = argsort(ids)); each program owns a contiguous
    run of ROWS_PER_PROGRAM sorted rows, keeps its current head's partial dW in registers while it reads
    each row once, and adds it to DW with one atomic per column when the head changes or its run ends.

    HBM traffic: h+ and h- read once, d h+ and d h- written once (4 B H bytes in half precision); the
    two-kernel path (fused kernel, then the segmented dW reduction) reads h+ and h- a second time (6 B H)."""
    pid = tl.program_id(0)
    start = pid * ROWS_PER_PROGRAM
    end = tl.minimum(start + ROWS_PER_PROGRAM, B)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)  # this program's partial dW row of its current head
    for k in range(start, end):
        r = tl.load(ORDER + k).to(tl.int64)
        c = tl.load(IDS + r)
        w = tl.load(W + c * H + offs, mask=m, other=0.0)
        xc = tl.load(XC + r * H + offs, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(XR + r * H + offs, mask=m, other=0.0).to(tl.float32)
        bias = tl.load(BIAS + c)
        rc = tl.sum(xc * w, axis=0) + bias
        rr = tl.sum(xr * w, axis=0) + bias
        wt = tl.load(WT + r) if HAS_W else 1.0
        mu = tl.load(MU + r) if HAS_MU else 0.0
        loss, gd, nls, s = _bt_row_terms(rc, rr, wt, mu, center)
        ga = scale * (gd + 2.0 * center * s)  # dL/d r_chosen
        gb = scale * (-gd + 2.0 * center * s)  # dL/d r_rejected
        tl.store(LOSS + r, loss)
        tl.store(GD + r, gd)
        tl.store(NLS + r, nls)
        tl.store(GA + r, ga)
        tl.store(GB + r, gb)
        tl.store(DXC + r * H + offs, (ga * w).to(DXC.dtype.element_ty), mask=m)
        tl.store(DXR + r * H + offs, (gb * w).to(DXR.dtype.element_ty), mask=m)
        acc += ga * xc + gb * xr
        # flush when the next sorted row belongs to another head, or this program's run ends
        c_next = tl.load(IDS + tl.load(ORDER + tl.minimum(k + 1, B - 1)).to(tl.int64))
        if (k + 1 == end) | (c_next != c):
            tl.atomic_add(DW + c * H + offs, acc, mask=m)
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
