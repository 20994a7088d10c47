"""Last-token gather (B, T, H) -> (B, H) and its scatter backward."""

import triton
import triton.language as tl


@triton.jit
def _last_token_fwd_kernel(X, POS, OUT, T, H, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p = tl.load(POS + row)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        tl.store(OUT + row * H + offs, tl.load(X + (row * T + p) * H + offs, mask=m), mask=m)


@triton.jit
def _last_token_bwd_kernel(G, POS, DX, T, H, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p = tl.load(POS + row)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        tl.store(DX + (row * T + p) * H + offs, tl.load(G + row * H + offs, mask=m), mask=m)
