"""Argument checks for the public ops: every bad input becomes a ValueError/TypeError naming the argument,
before any kernel touches memory. Non-contiguous inputs are made contiguous (handled, not rejected)."""

from __future__ import annotations

import torch

from optimas_fast._validate import is_number

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")


def tensor(x, name: str, ndim: int, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, float16, float64), got {x.dtype}")
    if not floating and x.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")
    return x


def same_device(*named):
    dev = named[0][1].device
    for name, t in named[1:]:
        if t is not None and t.device != dev:
            raise ValueError(f"{name}: on {t.device}, expected {dev} like {named[0][0]}")


def size(name: str, got: int, want: int, what: str):
    if got != want:
        raise ValueError(f"{name}: {what} is {got}, expected {want}")


def nonempty(name: str, n: int):
    if n == 0:
        raise ValueError(f"{name}: empty batch (B = 0); a loss over no pairs is undefined")


def head_ids(ids: torch.Tensor, n: int, C: int) -> torch.Tensor:
    tensor(ids, "head_ids", 1, floating=False)
    size("head_ids", ids.shape[0], n, "length")
    if n:
        # One host-device sync on CUDA; a wrong id would otherwise read outside W.
        lo, hi = (int(v) for v in torch.aminmax(ids))  # one pass over the ids
        if lo < 0:
            raise ValueError(f"head_ids: negative head id {lo}")
        if hi >= C:
            raise ValueError(f"head_ids: head id {hi} out of range for C = {C} heads")
    return ids.to(torch.int64).contiguous()


def heads(W, b, H: int):
    tensor(W, "W", 2)
    tensor(b, "b", 1)
    if W.shape[0] == 0:
        raise ValueError("W: needs at least one head (C >= 1)")
    size("W", W.shape[1], H, "hidden size (dim 1)")
    size("b", b.shape[0], W.shape[0], "length (number of heads C)")


def optional_rows(x, name: str, B: int):
    if x is None:
        return None
    tensor(x, name, 1)
    size(name, x.shape[0], B, "length")
    return x


def weights(w, B: int, reduction: str):
    w = optional_rows(w, "weight", B)
    if w is not None and B:
        # one pass, one host-device sync on CUDA: min < 0 means a negative weight; with min >= 0 the sum is 0
        # exactly when max is 0; a NaN makes both NaN (aminmax propagates it), which passes: a NaN loss the
        # caller must see, not an error. (Three reductions stacked cost 23 us a call at B = 4096 on CPU.)
        lo, hi = torch.aminmax(w.detach())
        lo, hi = torch.stack([lo, hi]).float().tolist()
        if lo < 0:
            raise ValueError("weight: pair weights must be >= 0")
        if reduction == "mean" and hi == 0:
            raise ValueError("weight: weights sum to 0, so the weighted mean is undefined")
    return w


def reduction(r: str, allowed=REDUCTIONS):
    if r not in allowed:
        raise ValueError(f"reduction: must be one of {allowed}, got {r!r}")
    return r


def center(c) -> float:
    if not is_number(c):
        raise TypeError(f"center: expected a float, got {type(c).__name__}")
    c = float(c)
    if c < 0 or c != c:
        raise ValueError(f"center: must be a finite value >= 0, got {c}")
    return c


def lengths(lengths_, B: int, T: int) -> torch.Tensor:
    tensor(lengths_, "lengths", 1, floating=False)
    size("lengths", lengths_.shape[0], B, "length")
    if B:
        lo, hi = (int(v) for v in torch.aminmax(lengths_))
        if lo < 1:
            raise ValueError(f"lengths: every length must be >= 1, got {lo}")
        if hi > T:
            raise ValueError(f"lengths: length {hi} exceeds the sequence dimension T = {T}")
    return lengths_


def padding_side(side: str) -> str:
    if side not in ("right", "left"):
        raise ValueError(f"padding_side: must be 'right' or 'left', got {side!r}")
    return side
