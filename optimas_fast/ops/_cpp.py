"""Thin wrappers from checked, contiguous CPU tensors to optimas_fast._C (pointers + sizes).

Callers (ops/functional.py) have already validated shapes, ranges and devices."""

from __future__ import annotations

import torch

from optimas_fast._native import native

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _code(t: torch.Tensor) -> int:
    try:
        return _CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the cpp backend takes float32, bfloat16 or float16 hidden states, got {t.dtype}") from None


def _p(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A contiguous float32 view of ``t`` for its data pointer (``t`` itself when it already is one: the three
    calls of the general path cost ~1.7 us a tensor, a fifth of a small bt_loss)."""
    if t is None:
        return None
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.detach().to(torch.float32).contiguous()


def bt_loss_rows(rc, rr, w, mu, center):
    """-> loss (B,), gd (B,), nls (B,) in float32 (see csrc/cpu_ops.h)."""
    rc, rr, w, mu = _f32(rc), _f32(rr), _f32(w), _f32(mu)
    B = rc.shape[0]
    loss, gd, nls = torch.empty(3, B, dtype=torch.float32).unbind(0)  # one allocation, three contiguous rows
    native().bt_loss_rows(B, _p(rc), _p(rr), _p(w), _p(mu), center, _p(loss), _p(gd), _p(nls))
    return loss, gd, nls


def multihead_score_fwd(hidden, ids, W32, b32):
    N, H = hidden.shape
    out = torch.empty(N, dtype=torch.float32)
    if N:
        native().multihead_score_fwd(_code(hidden), N, H, W32.shape[0], _p(hidden), _p(ids), _p(W32), _p(b32), _p(out))
    return out


def multihead_score_bwd(hidden, ids, W32, g, need_hidden, need_W, need_b):
    N, H = hidden.shape
    C = W32.shape[0]
    dh = torch.empty_like(hidden) if need_hidden else None
    dW = torch.empty(C, H, dtype=torch.float32) if need_W else None
    db = torch.empty(C, dtype=torch.float32) if need_b else None
    g = g.detach().to(torch.float32).contiguous()
    native().multihead_score_bwd(_code(hidden), N, H, C, _p(hidden), _p(ids), _p(W32), _p(g), _p(dh), _p(dW), _p(db))
    return dh, dW, db


def fused_head_bt(hc, hr, ids, W32, b32, w, mu, center, scale, need_grad):
    """-> loss_rows, gd, nls (B,) and, if need_grad, dhc, dhr (like hc), dW (C,H) f32, db (C,) f32."""
    B, H = hc.shape
    C = W32.shape[0]
    w, mu = _f32(w), _f32(mu)
    loss, gd, nls = (torch.empty(B, dtype=torch.float32) for _ in range(3))
    if need_grad:
        dhc, dhr = torch.empty_like(hc), torch.empty_like(hr)
        dW, db = torch.empty(C, H, dtype=torch.float32), torch.empty(C, dtype=torch.float32)
    else:
        dhc = dhr = dW = db = None
    native().fused_head_bt(
        _code(hc),
        B,
        H,
        C,
        _p(hc),
        _p(hr),
        _p(ids),
        _p(W32),
        _p(b32),
        _p(w),
        _p(mu),
        center,
        scale,
        _p(loss),
        _p(gd),
        _p(nls),
        _p(dhc),
        _p(dhr),
        _p(dW),
        _p(db),
    )
    return loss, gd, nls, dhc, dhr, dW, db


def last_token_fwd(hidden, pos):
    B, T, H = hidden.shape
    out = torch.empty(B, H, dtype=hidden.dtype)
    if B:
        native().last_token_fwd(B, T, H, hidden.element_size(), _p(hidden), _p(pos), _p(out))
    return out


def last_token_bwd(grad_out, pos, T):
    B, H = grad_out.shape
    grad = torch.zeros(B, T, H, dtype=grad_out.dtype)
    if B:
        native().last_token_bwd(B, T, H, grad_out.element_size(), _p(grad_out), _p(pos), _p(grad))
    return grad
