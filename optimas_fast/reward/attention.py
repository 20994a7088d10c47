"""The backbone's attention kernel when ``RewardConfig.attn_implementation == "sdpa"``.

It is torch's ``scaled_dot_product_attention`` (through transformers' own SDPA integration, masks included),
with one exception: bf16 inputs on the CPU with autograd recording (bf16 autocast training) run the attention
in fp32 and cast the output back to bf16. Why: the CPU SDPA kernels are slower in bf16 than in fp32 (no bf16
matmul inside them), most of all in the backward. Measured on a 2-core AMD EPYC with avx512_bf16, torch
2.13, one MiniLM-shaped call (8 rows x 12 heads x 356 tokens x 32 dims, padding mask), forward + backward:
81 ms in bf16, 59 ms in fp32; forward alone 18 ms either way. Whole MiniLM bf16 training on 356-token rows
goes about 10% faster (benchmarks/RESULTS.md). Forward-only calls (scoring) and every other device or dtype
take the plain SDPA path unchanged, so scores are identical to "sdpa"; in training the attention is computed
more precisely than in bf16, never less.

The kernel is registered with transformers under ``NAME`` (its mask function is SDPA's), so the backbone
dispatches to it through ``config._attn_implementation``; transformers does not write that field into a saved
``config.json``, so exported checkpoints still load anywhere with the loader's own default.
"""
from __future__ import annotations

from typing import Any

import torch

NAME = "optimas_sdpa"

_registered = False


def _forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query/key/value: (B, heads, L, D) (key/value may have fewer heads: GQA); attention_mask: bool or additive
    if query.dtype == torch.bfloat16 and query.device.type == "cpu" and torch.is_grad_enabled():
        mask = attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask,
                                                  **kwargs)
        return out.to(query.dtype), weights  # out: (B, L, heads, D), transformers' layout
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Registers the kernel with transformers (idempotent) and returns its name."""
    global _registered
    if not _registered:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(NAME, _forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME
