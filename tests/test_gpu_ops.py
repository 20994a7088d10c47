"""Every op on CUDA through the Triton backend vs the float64 reference (computed on the GPU too): forward
and every gradient, float32 / bfloat16 / float16, an odd shape, a shape past one column block (H > 4096,
the kernels' loop) and the realistic size (B = 16384, H = 4096, C = 64). Skipped, and counted, without CUDA
(tests/conftest.py); benchmarks/gpu_check.sh fails when any of them is skipped."""

from __future__ import annotations

import pytest
import torch
from test_ops import close, f64, grads, leaves

import optimas_fast.ops as ops
from optimas_fast.ops import reference as ref

pytestmark = pytest.mark.gpu

# (dtype, tolerance): as in test_ops.py; half-precision gradients are rounded to the input dtype
# (2^-8 relative for bf16, 2^-11 for fp16), losses and scores stay float32.
DTYPES = [(torch.float32, 2e-4), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
SHAPES = [(7, 70, 5), (129, 5000, 3), (16384, 4096, 64)]  # (B, H, C): odd, two column blocks, realistic
IDS = lambda v: str(v).replace("torch.", "")  # noqa: E731


@pytest.fixture
def cuda_gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def cuda_inputs(g, B, H, C, dtype):
    """Pair inputs drawn on the GPU; hidden states quantised to `dtype` first so the float64 reference
    reads the same values as the kernel."""
    dev = "cuda"
    hc = torch.randn(B, H, generator=g, device=dev).to(dtype)  # (B, H)
    hr = torch.randn(B, H, generator=g, device=dev).to(dtype)  # (B, H)
    ids = torch.randint(0, C, (B,), generator=g, device=dev)  # (B,)
    W = torch.randn(C, H, generator=g, device=dev) / H**0.5  # (C, H)
    b = torch.randn(C, generator=g, device=dev)  # (C,)
    w = torch.rand(B, generator=g, device=dev) + 0.05  # (B,)
    mu = torch.randn(B, generator=g, device=dev) * 0.3  # (B,)
    return hc, hr, ids, W, b, w, mu


def test_auto_backend_is_triton_on_cuda():
    info = ops.backend_info()
    assert info["selected"]["cuda"] == "triton", info["why"]
    x = torch.randn(4, 8, device="cuda", requires_grad=True)
    s = ops.multihead_score(
        x,
        torch.zeros(4, dtype=torch.long, device="cuda"),
        torch.randn(1, 8, device="cuda"),
        torch.randn(1, device="cuda"),
    )
    assert "MultiheadScore" in type(s.grad_fn).__name__  # the Triton Function ran, not the reference


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["weighted_centered", "plain"])
def test_fused_head_bt_loss_cuda(cuda_gen, shape, dtype, tol, variant):
    B, H, C = shape
    hc, hr, ids, W, b, w, mu = cuda_inputs(cuda_gen, B, H, C, dtype)
    if variant == "plain":
        w = mu = None
    center = 0.05 if variant != "plain" else 0.0
    ins = leaves(hc, hr, W, b, w, mu)
    out = ops.fused_head_bt_loss(ins[0], ins[1], ids, ins[2], ins[3], ins[4], ins[5], center, backend="triton")
    got = grads(out, ins)
    r = f64(hc, hr, W, b, w, mu)
    expected = ref.fused_head_bt_loss(r[0], r[1], ids, r[2], r[3], r[4], r[5], center)
    want = grads(expected, r)
    assert out.dtype == torch.float32 and out.shape == () and out.is_cuda
    close(out, expected, tol, "loss")
    for name, g, e in zip(("h_chosen", "h_rejected", "W", "b", "weight", "margin"), got, want):
        assert (g is None) == (e is None), name
        if g is not None:
            assert g.dtype == (dtype if name.startswith("h_") else torch.float32), name
            hint = float(expected.detach()) / float(w.sum()) if name == "weight" else 0.0
            close(g, e, tol, f"grad {name}", hint)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_multihead_score_cuda(cuda_gen, shape, dtype, tol):
    N, H, C = shape
    x, _, ids, W, b, _, _ = cuda_inputs(cuda_gen, N, H, C, dtype)
    upstream = torch.randn(N, generator=cuda_gen, device="cuda")  # (N,)
    ins = leaves(x, W, b)
    out = ops.multihead_score(ins[0], ids, ins[1], ins[2], backend="triton")
    got = grads((out * upstream).sum(), ins)
    r = f64(x, W, b)
    expected = ref.multihead_score(r[0], ids, r[1], r[2])
    want = grads((expected * upstream.double()).sum(), r)
    assert out.shape == (N,) and out.dtype == torch.float32
    close(out, expected, 2e-4, "scores")  # fp32 math on the quantised inputs: tight for every dtype
    for name, g, e in zip(("hidden", "W", "b"), got, want):
        close(g, e, tol if name == "hidden" else 2e-4, f"grad {name}")


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B", [7, 65536])
def test_bt_loss_cuda(cuda_gen, B, reduction, dtype, tol):
    g = cuda_gen
    rc = (torch.randn(B, generator=g, device="cuda") * 3).to(dtype)  # (B,)
    rr = (torch.randn(B, generator=g, device="cuda") * 3).to(dtype)  # (B,)
    w = torch.rand(B, generator=g, device="cuda") + 0.01  # (B,)
    mu = torch.randn(B, generator=g, device="cuda")  # (B,)
    upstream = torch.randn(B, generator=g, device="cuda") if reduction == "none" else torch.tensor(1.7, device="cuda")
    ins = leaves(rc, rr, w, mu)
    out = ops.bt_loss(*ins, center=0.1, reduction=reduction, backend="triton")
    got = grads((out * upstream).sum(), ins)
    r = f64(rc, rr, w, mu)
    expected = ref.bt_loss(*r, center=0.1, reduction=reduction)
    want = grads((expected * upstream.double()).sum(), r)
    close(out, expected, 1e-5, "loss")
    denom = float(w.sum()) if reduction == "mean" else 1.0
    hint = float((upstream.abs() * (w + 0.2 * (rc.float() + rr.float()).abs())).max()) / denom
    hint = max(hint, float(expected.detach().abs().sum()) / float(w.sum()))
    for name, gr, e in zip(("r_chosen", "r_rejected", "weight", "margin"), got, want):
        # r_chosen / r_rejected gradients are stored in their own dtype: that rounding is the tolerance
        close(gr, e, tol if name.startswith("r_") and dtype != torch.float32 else 1e-5, f"grad {name}", hint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=IDS)
@pytest.mark.parametrize("shape", [(7, 5, 33), (3, 17, 5000), (64, 512, 4096)], ids=str)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_last_token_hidden_cuda(cuda_gen, shape, dtype, padding_side, sparse_grad):
    B, T, H = shape
    g = cuda_gen
    hidden = torch.randn(B, T, H, generator=g, device="cuda").to(dtype).requires_grad_(True)  # (B, T, H)
    lengths = torch.randint(1, T + 1, (B,), generator=g, device="cuda")  # (B,)
    up = torch.randn(B, H, generator=g, device="cuda").to(dtype)  # (B, H)
    out = ops.last_token_hidden(hidden, lengths, padding_side, sparse_grad=sparse_grad, backend="triton")
    (grad,) = torch.autograd.grad((out * up).sum(), [hidden])
    r_hidden = hidden.detach().double().requires_grad_(True)
    expected = ref.last_token_hidden(r_hidden, lengths, padding_side)
    (want,) = torch.autograd.grad((expected * up.double()).sum(), [r_hidden])
    assert torch.equal(out.double(), expected.detach())  # a gather is exact
    assert grad.is_sparse == sparse_grad
    assert torch.equal(grad.to_dense().double(), want)


def test_triton_matches_cpp_on_the_same_rows(cuda_gen):
    """The two fast backends agree with each other (not only each with the reference) at a realistic size."""
    hc, hr, ids, W, b, w, mu = cuda_inputs(cuda_gen, 4096, 4096, 32, torch.bfloat16)
    on_gpu = ops.fused_head_bt_loss(hc, hr, ids, W, b, w, mu, 0.01, backend="triton")
    on_cpu = ops.fused_head_bt_loss(*(t.cpu() for t in (hc, hr, ids, W, b, w, mu)), 0.01, backend="cpp")
    close(on_gpu.cpu(), on_cpu, 1e-4)
