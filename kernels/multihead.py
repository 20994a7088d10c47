"""Per-row head selection (BGMV-style): scores[n] = x[n] . W[ids[n]] + b[ids[n]], never an N x C product."""

import triton
import triton.language as tl


@triton.jit
def _multihead_fwd_kernel(X, IDS, W, BIAS, OUT, H, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.load(IDS + row)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        x = tl.load(X + row * H + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + c * H + offs, mask=m, other=0.0)
        acc += x * w
    tl.store(OUT + row, tl.sum(acc, axis=0) + tl.load(BIAS + c))


@triton.jit
def _multihead_dx_kernel(G, IDS, W, DX, H, BLOCK_H: tl.constexpr):
    """dx[n] = g[n] * W[ids[n]]  (one program per row)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.load(IDS + row)
    g = tl.load(G + row)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        w = tl.load(W + c * H + offs, mask=m, other=0.0)
        tl.store(DX + row * H + offs, (g * w).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _segment_dw_kernel(XA, GA, XB, GB, ORDER, OFFSETS, DW, H, SPLIT, HAS_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """dW[c, hblock] += sum over rows r of head c (rows sorted by head: ORDER[OFFSETS[c]:OFFSETS[c+1]]),
    taking every SPLIT-th row from this program's start, of ga[r]*xa[r] (+ gb[r]*xb[r]).

    Grid (C, cdiv(H, BLOCK_H), SPLIT): each program owns a slice of one head's rows and one column block,
    so atomics happen once per program (SPLIT per output element), not once per row."""
    c = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    part = tl.program_id(2)
    start = tl.load(OFFSETS + c)
    end = tl.load(OFFSETS + c + 1)
    offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    m = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(start + part, end, SPLIT):
        r = tl.load(ORDER + k).to(tl.int64)
        acc += tl.load(GA + r) * tl.load(XA + r * H + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            acc += tl.load(GB + r) * tl.load(XB + r * H + offs, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(DW + c * H + offs, acc, mask=m)
