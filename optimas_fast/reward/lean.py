"""Memory-lean training forms of a decoder's RMSNorm and SwiGLU MLP: the same outputs and gradients, fewer bytes
kept for the backward.

Why: in bf16 autocast training of a Llama-type decoder most of the memory a step keeps for its backward is not
attention but the per-token tensors of the norms and the MLP (SmolLM2-135M, a 2048-token chunk, measured with
``benchmarks/profile_reward_memory.py``: fp32 residual / RMSNorm tensors and the MLP's bf16 intermediates were
2.1 of 3.6 GiB saved a step). transformers' modules keep, per token:

- ``LlamaRMSNorm``: its fp32 input and its fp32 normalised output (``x`` and ``x * rstd``). Here: the input and
  one fp32 scalar per token (``rstd``); the normalised value is recomputed in the backward (one multiply).
- ``LlamaMLP`` (``down(silu(gate(x)) * up(x))``): the input cast to bf16 twice (autocast casts it for each of the
  two projections), ``gate``, ``silu(gate)``, ``up`` and their product. Here: the bf16 input once, ``gate``, ``up``
  and the product; ``silu(gate)`` is recomputed in the backward (one elementwise pass over the MLP width: keeping
  the product too costs one tensor but saves the second recompute pass, which measured ~10% of the block's time).

Both compute exactly what the module computes (same ops in the same dtypes: autocast's bf16 for the projections,
fp32 for the norm), so outputs are equal and gradients agree to rounding (tests/test_reward_lean.py). They only
take over while autograd records (training); scoring, and any module not recognised (another norm formula such
as Gemma's ``1 + w``, LoRA-wrapped or biased projections, another activation), runs the module's own forward.
Device-agnostic: plain torch ops, so the same code serves CUDA (where the memory saved is GPU memory).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# the RMSNorm / MLP classes whose forward is exactly Llama's formula (checked against transformers' source: the
# norm is w * (x * rsqrt(mean(x^2) + eps)) in fp32, cast back to the input dtype before the weight; the MLP is
# down(act(gate(x)) * up(x)))
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # x: (..., H) any float dtype; weight: (H,)
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # (..., H) fp32, recomputed
        dyf = dy.float()
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dyf * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # (H,)
        dxhat = dyf * weight.float()  # (..., H)
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (dxhat - xhat * mean(dxhat * xhat))
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


class _LeanSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, wu, wd, dtype: torch.dtype) -> torch.Tensor:
        # x: (..., H); wg, wu: (I, H); wd: (H, I); dtype: the compute dtype (autocast's, or the weights')
        xb = x.to(dtype)
        wg_, wu_, wd_ = wg.to(dtype), wu.to(dtype), wd.to(dtype)
        g = F.linear(xb, wg_)  # (..., I)
        u = F.linear(xb, wu_)  # (..., I)
        p = F.silu(g) * u  # (..., I)
        y = F.linear(p, wd_)  # (..., H)
        ctx.save_for_backward(xb, g, u, p, wg, wu, wd)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # the ops autograd would run for the module, in the same dtypes (torch's fused silu backward included), plus
        # the one that rebuilds silu(g): one elementwise pass over (..., I)
        xb, g, u, p, wg, wu, wd = ctx.saved_tensors
        dt = ctx.dtype
        wg_, wu_, wd_ = wg.to(dt), wu.to(dt), wd.to(dt)
        dy = dy.to(dt)
        a = F.silu(g)  # (..., I), recomputed
        dp = F.linear(dy, wd_.t())  # (..., I)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        dwd = flat(dy).t() @ flat(p) if ctx.needs_input_grad[3] else None  # (H, I)
        du = dp * a
        dg = torch.ops.aten.silu_backward(dp * u, g)  # (..., I)
        dwg = flat(dg).t() @ flat(xb) if ctx.needs_input_grad[1] else None  # (I, H)
        dwu = flat(du).t() @ flat(xb) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            # each projection's input gradient cast to x's dtype before the sum, as autograd does for the two
            # casts of x that autocast makes
            dx = F.linear(dg, wg_.t()).to(ctx.x_dtype) + F.linear(du, wu_.t()).to(ctx.x_dtype)  # (..., H)
        cast = lambda d, w: None if d is None else d.to(w.dtype)  # noqa: E731
        return dx, cast(dwg, wg), cast(dwu, wu), cast(dwd, wd), None


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    dev = hidden_states.device.type
    with torch.autocast(dev, enabled=False):  # the module's own math is fp32 whatever autocast says
        return _LeanRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.gate_proj.weight.dtype
    with torch.autocast(dev, enabled=False):
        return _LeanSwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, dtype)


def _plain_linear(m: Any) -> bool:
    return type(m) is nn.Linear and m.bias is None


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def apply_lean_modules(backbone: nn.Module, mlp: bool = True) -> dict[str, int]:
    """Gives every recognised RMSNorm (and, with ``mlp``, SwiGLU MLP) of ``backbone`` its lean training forward (an
    instance attribute: the class, the weights and the state dict are untouched, so exports and copies are
    standard). Idempotent. Returns how many of each were switched."""
    n = {"rmsnorm": 0, "mlp": 0}
    for m in backbone.modules():
        name = type(m).__name__
        if "forward" in vars(m):
            continue  # already switched (or given its own forward by someone else: left alone)
        if name in RMSNORM_CLASSES and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None:
            m.forward = types.MethodType(_norm_forward, m)
            n["rmsnorm"] += 1
        elif (
            mlp
            and name in MLP_CLASSES
            and all(_plain_linear(getattr(m, k, None)) for k in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(m, "act_fn", None))
        ):
            m.forward = types.MethodType(_mlp_forward, m)
            n["mlp"] += 1
    return n
