"""Fast primitives for local reward functions: one entry point per op, three backends each.

    bt_loss(r_chosen, r_rejected, weight=None, margin=None, center=0.0, reduction="mean")
    multihead_score(hidden, head_ids, W, b)
    fused_head_bt_loss(h_chosen, h_rejected, head_ids, W, b, weight=None, margin=None, center=0.0)
    last_token_hidden(hidden, lengths, padding_side="right")
    backend_info()

Backends: "torch" (reference, ops/reference.py), "cpp" (CPU, csrc/cpu_ops.cpp), "triton" (CUDA, kernels/).
OPTIMAS_FAST_BACKEND=torch|cpp|triton|auto or the per-call `backend=` argument chooses.
"""

from optimas_fast.ops._backend import BACKENDS, BackendUnavailableError, backend_info
from optimas_fast.ops.functional import bt_loss, fused_head_bt_loss, last_token_hidden, multihead_score

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_info",
    "bt_loss",
    "fused_head_bt_loss",
    "last_token_hidden",
    "multihead_score",
]
