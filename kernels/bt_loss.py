"""Bradley–Terry loss rows (elementwise over pairs). Reduction happens in torch (O(B))."""

import triton
import triton.language as tl


@triton.jit
def _bt_row_terms(rc, rr, w, mu, center):
    """Per-pair (loss, d loss/d d, -log sigmoid(d), s) in fp32, stable for any |d|."""
    d = rc - rr - mu
    s = rc + rr
    e = tl.exp(-tl.abs(d))
    # log1p(e) to full relative precision (a confident pair's loss is ~e, and log(1 + e) keeps only the bits of
    # e above 1's: 1e-4 relative error at e = 2e-4): log(u) * e / (u - 1) with u = 1 + e cancels the rounding
    # of u (Goldberg), and is e itself where u rounds to 1
    u = 1.0 + e
    l1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    nls = l1p - tl.minimum(d, 0.0)  # -log sigmoid(d)
    # sigmoid(-d): e/(1+e) when d >= 0, 1/(1+e) when d < 0 (e = exp(-|d|) never overflows)
    sig_neg = tl.where(d >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
    loss = w * nls + center * s * s
    gd = -w * sig_neg
    return loss, gd, nls, s


@triton.jit
def _bt_loss_fwd_kernel(
    RC, RR, W, MU, LOSS, GD, NLS, B, center, HAS_W: tl.constexpr, HAS_MU: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < B
    rc = tl.load(RC + offs, mask=m, other=0.0).to(tl.float32)
    rr = tl.load(RR + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=m, other=1.0).to(tl.float32) if HAS_W else tl.full([BLOCK], 1.0, tl.float32)
    mu = tl.load(MU + offs, mask=m, other=0.0).to(tl.float32) if HAS_MU else tl.zeros([BLOCK], tl.float32)
    loss, gd, nls, s = _bt_row_terms(rc, rr, w, mu, center)
    tl.store(LOSS + offs, loss, mask=m)
    tl.store(GD + offs, gd, mask=m)
    tl.store(NLS + offs, nls, mask=m)
