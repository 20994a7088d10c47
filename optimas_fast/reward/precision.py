"""Precision: which path runs in bf16 (training, scoring; per device), its autocast, and the bf16 copy of the
backbone that scoring uses with ``score_weights="cast"``.

Nothing here knows about rows, batches or heads: the encoder asks ``Precision`` for the backbone and context
of one encoding call (``forward_backbone``) and the trainer frees the copy before a step (``release_copy``).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from .config import RewardModelConfig

# ------------------------------------------------------------------------------------------- hardware
_NATIVE_BF16: bool | None = None
_AMX_BF16: bool | None = None


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (avx512_bf16 or AMX-BF16 in /proc/cpuinfo's flags).

    Plain AVX-512 only emulates bf16 (oneDNN converts to fp32), which is slower than fp32 itself, so it does
    not count. Non-Linux hosts (no /proc/cpuinfo) report False: amp="auto" then stays in fp32."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        flags = _cpu_flags()
        _NATIVE_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return _NATIVE_BF16


def cpu_has_amx_bf16() -> bool:
    """True when the CPU has AMX tiles for bf16 (``amx_bf16``: Intel Sapphire Rapids and later), whose bf16
    GEMMs and CPU flash attention run several times faster than fp32; avx512_bf16 alone (AMD Zen 4, Intel
    Cooper Lake) gives bf16 dot products at about twice fp32's GEMM rate and a slower bf16 attention."""
    global _AMX_BF16
    if _AMX_BF16 is None:
        _AMX_BF16 = "amx_bf16" in _cpu_flags()
    return _AMX_BF16


# ------------------------------------------------------------------------------------------- the policy
class Precision:
    """The precision policy of one encoder (``config`` is read live) and its bf16 scoring copy.

    ``weights_version`` is bumped by whoever changes parameters in place without bumping their version
    counters (fused AdamW's kernel does not): part of the bf16 copy's key, next to the counters."""

    def __init__(self, config: RewardModelConfig, device: torch.device):
        self.config = config
        self.device = device
        self.weights_version = 0
        self.cast_copy: tuple[tuple, nn.Module] | None = None  # (weight versions, bf16 copy) for scoring

    def uses_bf16(self, inference: bool) -> bool:
        """Whether training (inference=False, config.amp) or scoring (config.score_amp) runs in bf16."""
        amp = self.config.score_amp if inference else self.config.amp
        if amp != "auto":
            return amp == "bf16"
        if self.device.type == "cuda":
            return True
        if self.device.type != "cpu":
            return False
        if not inference:
            # training: bf16 wherever the CPU has native bf16 GEMMs, measured faster there at the same held-out
            # accuracy (RESULTS.md: MiniLM on unique 367-token pairs, avx512_bf16 EPYC, 1.44x the pairs/s of
            # fp32, 0.83 accuracy either way); fp32 where bf16 is emulated and slower
            return cpu_has_native_bf16()
        # scoring: bf16 only with AMX. Measured per CPU kind on held-out unique PubMedQA pairs
        # (benchmarks/bench_pair_scoring.py, RESULTS.md "Pair scoring precision"): with AMX (2-core Xeon) bf16
        # scores 2.8x faster than fp32 on MiniLM-L6 and on SmolLM2-135M with the same pair decisions (98.8% /
        # 100% agreement); with avx512_bf16 alone (2-core EPYC, issue 18's table) bf16 gained MiniLM 4% and
        # cost SmolLM2 13% (its CPU attention is slower in bf16 there), so scoring stays in fp32 on such CPUs
        return cpu_has_amx_bf16()

    def autocast(self, inference: bool = False):
        if self.uses_bf16(inference):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backbone(self, backbone: nn.Module, inference: bool):
        """(backbone, context) for one encoding call: in bf16 scoring with ``score_weights="cast"`` the bf16
        copy of the backbone and no autocast; otherwise the trained backbone under ``autocast()``."""
        if not (inference and self.config.score_weights == "cast" and self.uses_bf16(True)):
            return backbone, self.autocast(inference)
        # every in-place change of a parameter through a torch op (load_state's copy_, a user's edit) bumps its
        # version counter; fused AdamW does not, so the trainer bumps weights_version after each step. Comparing
        # them all costs microseconds and never serves stale weights
        key = (self.weights_version, tuple((id(p), p._version) for p in backbone.parameters()))
        if self.cast_copy is None or self.cast_copy[0] != key:
            self.cast_copy = None  # free the old copy before making the new one
            with torch.no_grad():
                copy_ = copy.deepcopy(backbone).to(torch.bfloat16).eval()
            self.cast_copy = (key, copy_)
        return self.cast_copy[1], contextlib.nullcontext()

    def release_copy(self) -> None:
        """Free the bf16 scoring copy of the backbone (``score_weights="cast"``). The trainer calls it before each
        step: the step changes the weights, so the copy would be re-made at the next score anyway, and holding it
        through the step's forward and backward only adds its size to the peak (SmolLM2-135M: 270 MB)."""
        self.cast_copy = None
