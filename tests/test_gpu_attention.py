"""The shared-prefix attention kernel (optimas_fast/reward/attention.py) against a float64 reference written
without it: for each suffix row, softmax over [its prefix's real keys ; its own keys, causal], on fresh random
inputs, every row layout the kernel has (one group, equal groups, padded slots with rows interleaved, per-row
gather), forward and all five gradients (query, suffix keys/values, prefix keys/values).

The same test runs on the CPU (torch's CPU flash kernel: in CI) and on CUDA (marked `gpu`: torch's flash and
memory-efficient kernels, each forced once); in CI the CUDA branch also runs on CPU emulations of the CUDA ops'
contracts (EmulatedCudaOps), so everything but the real CUDA kernel calls is checked without a GPU. The end-to-end
CUDA check (a RewardModel's scores and gradients with the kernel on and off) is here too, marked `gpu`."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_gpu_engine import build, requests, tokenizer  # noqa: F401 - tokenizer is a fixture

from optimas_fast.reward import attention, encode

# (group sizes, rows of different groups interleaved): the layouts of tests/test_reward.py's kernel test
LAYOUTS = {
    "one_group": ([7], False),
    "equal_groups": ([2, 2, 2], False),
    "uneven_slots": ([3, 2, 3], True),
    "uneven_gather": ([9, 1, 1], False),
}
# (dtype, tolerance relative to the reference's scale): fp32 kernels round at ~1e-6; bf16 inputs are quantised
# before the reference sees them, so only the kernel's bf16 outputs / gradients round (2^-8) plus its accumulation
DTYPES = {"float32": (torch.float32, 1e-4), "bfloat16": (torch.bfloat16, 2e-2)}
# (device, CUDA_KERNEL): the CPU has one kernel; CUDA runs "auto" (flash where a part qualifies) and forced
# memory-efficient, so each CUDA kernel is checked whatever "auto" picks
CASES = [
    ("cpu", "auto"),
    pytest.param("cuda", "auto", marks=pytest.mark.gpu),
    pytest.param("cuda", "efficient", marks=pytest.mark.gpu),
]


def make_inputs(layout: str, dtype: torch.dtype, device: str, seed: int, pad_prefixes: bool = True):
    """(sp, q, k, v, kp, vp, group, lens): R rows of Ls suffix tokens, h=4 query heads on kvh=2 KV heads, d=16;
    G prefixes of different lengths, right-padded to Lp with random (ignored) keys."""
    rng = np.random.default_rng(seed)
    sizes, mixed = LAYOUTS[layout]
    group = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])  # (R,)
    if mixed:
        group = rng.permutation(group)
    G, R, h, kvh, d, Ls = len(sizes), len(group), 4, 2, 16, 5
    lens = rng.integers(1, 12, size=G) if pad_prefixes else np.full(G, 9)  # (G,)
    Lp = int(lens.max())
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    q, k, v = t(R, h, Ls, d), t(R, kvh, Ls, d), t(R, kvh, Ls, d)
    kp, vp = t(G, kvh, Lp, d), t(G, kvh, Lp, d)
    sp = attention.SharedPrefix([(kp, vp)], group, lens)
    return sp, q, k, v, kp, vp, group, lens


def reference(q, k, v, kp, vp, group, lens, scale):
    """float64, one row at a time, no shared-prefix tricks."""
    R, h, Ls, _ = q.shape
    rep = h // k.shape[1]
    causal = torch.ones(Ls, Ls, dtype=torch.bool).tril()
    outs = []
    for r in range(R):
        lp = int(lens[group[r]])
        K = torch.cat([kp[group[r], :, :lp], k[r]], dim=1).repeat_interleave(rep, 0)  # (h, lp + Ls, d)
        V = torch.cat([vp[group[r], :, :lp], v[r]], dim=1).repeat_interleave(rep, 0)
        allowed = torch.cat([torch.ones(Ls, lp, dtype=torch.bool), causal], dim=1)  # (Ls, lp + Ls)
        s = (q[r] @ K.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))  # (h, Ls, lp + Ls)
        outs.append(s.softmax(-1) @ V)  # (h, Ls, d)
    return torch.stack(outs)  # (R, h, Ls, d)


def close(got: torch.Tensor, want: torch.Tensor, rel: float, name: str):
    scale = float(want.abs().max()) + 1e-12
    err = float((got.detach().double().cpu() - want).abs().max())
    assert err <= rel * scale, f"{name}: max |diff| {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("device,kernel", CASES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_shared_prefix_attention_equals_the_reference(device, kernel, dtype, layout, seed, monkeypatch):
    monkeypatch.setattr(attention, "CUDA_KERNEL", kernel)
    dt, rel = DTYPES[dtype]
    sp, q, k, v, kp, vp, group, lens = make_inputs(layout, dt, device, seed)
    scale = 16**-0.5
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, kp, vp)]
    out = attention._SharedPrefixAttention.apply(sp, scale, *leaves)  # (R, h, Ls, d)
    assert out.dtype == dt and out.device.type == device
    ref_leaves = [x.detach().cpu().double().requires_grad_(True) for x in (q, k, v, kp, vp)]
    ref = reference(*ref_leaves, group, lens, scale)
    close(out, ref.detach(), rel, "out")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dt)
    out.backward(dout.to(device))
    ref.backward(dout.double())
    for name, a, b in zip(("dq", "dk", "dv", "dkp", "dvp"), leaves, ref_leaves, strict=True):
        assert a.grad is not None and a.grad.shape == a.shape, name
        close(a.grad, b.grad, rel * 2, name)  # gradients sum over rows / heads: one more rounding each


class EmulatedCudaOps:
    """The contracts of torch's CUDA attention ops (attention._CudaOps), computed by the CPU flash kernel, with their
    CUDA quirks: the memory-efficient log-sum-exp comes back rounded up to 32 rows (the extra rows NaN, so any use of
    them shows) and must come back to the backward at that length; flash takes half types and no mask; the philox
    and sequence-length state must be handed back as given; the bias is the aligned stride-0 view."""

    def __init__(self):
        self.calls: list[str] = []
        self.cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        self.cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def flash_fwd(self, q, k, v, causal, scale):
        assert q.dtype in (torch.float16, torch.bfloat16), "flash takes half types only"
        self.calls.append("flash")
        out, lse = self.cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        e = torch.empty(0)
        return out, lse, e, e, q.shape[2], k.shape[2], torch.tensor(7), torch.tensor(11), e

    def flash_bwd(self, dout, q, k, v, out, lse, cq, ck, mq, mk, causal, seed, off, scale):
        assert lse.shape == q.shape[:3] and (mq, mk) == (q.shape[2], k.shape[2])
        assert (int(seed), int(off)) == (7, 11), "the forward's state must come back"
        return self.cpu_bwd(dout, q, k, v, out, lse, 0.0, causal, scale=scale)

    def efficient_fwd(self, q, k, v, bias, causal, scale):
        self.calls.append("efficient")
        B, h, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if bias is not None:
            assert bias.shape == (B, h, Lq, Lk) and bias.dtype == q.dtype and bias.stride(0) % 16 == 0
        out, lse = self.cpu(q, k, v, 0.0, causal, attn_mask=None if bias is None else bias[:, :1, :1], scale=scale)[:2]
        padded = torch.full((B, h, -(-Lq // 32) * 32), float("nan"))  # (B, h, n): rows past Lq are not real
        padded[..., :Lq] = lse
        return out, padded, torch.tensor(3), torch.tensor(5)

    def efficient_bwd(self, dout, q, k, v, bias, out, lse, seed, off, causal, scale):
        Lq = q.shape[2]
        assert lse.shape[-1] == -(-Lq // 32) * 32 and lse.is_contiguous(), "the log-sum-exp at the kernel's length"
        assert (int(seed), int(off)) == (3, 5), "the forward's state must come back"
        dq, dk, dv = self.cpu_bwd(
            dout,
            q,
            k,
            v,
            out,
            lse[..., :Lq],
            0.0,
            causal,
            attn_mask=None if bias is None else bias[:, :1, :1],
            scale=scale,
        )
        return dq, dk, dv, None


@pytest.mark.parametrize("kernel", ["auto", "efficient"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cuda_path_on_emulated_kernels_equals_the_reference(kernel, dtype, layout, seed, monkeypatch):
    """The CUDA path's every line but the kernel calls, on the CPU: the part-by-part kernel choice, the aligned bias,
    the log-sum-exp cut to its rows and padded back for the backward, the kernels' state handed back."""
    ops = EmulatedCudaOps()
    monkeypatch.setattr(attention, "_cuda_ops", ops)
    monkeypatch.setattr(attention, "_kernel", attention._cuda_kernel)  # every part takes a CUDA kernel
    monkeypatch.setattr(attention, "CUDA_KERNEL", kernel)
    dt, rel = DTYPES[dtype]
    sp, q, k, v, kp, vp, group, lens = make_inputs(layout, dt, "cpu", seed, pad_prefixes=layout != "one_group")
    scale = 16**-0.5
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, kp, vp)]
    out = attention._SharedPrefixAttention.apply(sp, scale, *leaves)
    half_auto = dt == torch.bfloat16 and kernel == "auto"
    # own causal block (never masked), then the prefix part (masked unless the prefixes have one length)
    want = ["flash" if half_auto else "efficient", "flash" if half_auto and layout == "one_group" else "efficient"]
    assert ops.calls == want
    ref_leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, kp, vp)]
    ref = reference(*ref_leaves, group, lens, scale)
    close(out, ref.detach(), rel, "out")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dt)
    out.backward(dout)
    ref.backward(dout.double())
    for name, a, b in zip(("dq", "dk", "dv", "dkp", "dvp"), leaves, ref_leaves, strict=True):
        close(a.grad, b.grad, rel * 2, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_cuda_kernel_choice_per_part(dtype, seed):
    """Where "auto" sends each part: flash for bf16 without a mask (own causal block; prefixes of one length),
    memory-efficient for fp32 or a masked part; and the chosen kernels really ran (their state tags)."""
    dt = DTYPES[dtype][0]
    for pad, want_prefix in ((True, "efficient"), (False, "flash" if dt == torch.bfloat16 else "efficient")):
        sp, q, k, v, kp, vp, group, lens = make_inputs("equal_groups", dt, "cuda", seed, pad_prefixes=pad)
        mask = sp.prefix_mask(dt)
        assert (mask is None) == (not pad)
        own = attention._attend(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), True, None, 0.25)
        assert own[2][0] == ("flash" if dt == torch.bfloat16 else "efficient")
        assert own[1].shape == q.shape[:3] and own[1].dtype == torch.float32
        part = attention._attend(attention._to_groups(sp, q, len(lens), 2), kp, vp, False, mask, 0.25)
        assert part[2][0] == want_prefix


def test_aligned_bias_is_the_mask_broadcast_over_aligned_rows():
    """The memory-efficient kernel's bias: the same values as the (B, 1, 1, Lk) mask at every head and query,
    rows 16-aligned in storage, no copy per head or query (stride 0)."""
    mask = torch.zeros(3, 1, 1, 21).masked_fill_(torch.rand(3, 1, 1, 21) < 0.3, float("-inf"))
    q, k = torch.zeros(3, 4, 6, 8), torch.zeros(3, 4, 21, 8)
    bias = attention._aligned_bias(mask, q, k)
    assert bias.shape == (3, 4, 6, 21)
    assert bias.stride(0) % 16 == 0 and bias.stride(1) == bias.stride(2) == 0 and bias.stride(3) == 1
    assert torch.equal(bias, mask.expand(3, 4, 6, 21))


def test_cuda_kernel_choice_rules(monkeypatch):
    """flash only for fp16 / bf16, no mask, head dim <= 256 and a multiple of 8, unless forced off."""
    bf, m = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 3)
    assert attention._cuda_kernel(bf, None) == "flash"
    assert attention._cuda_kernel(bf.float(), None) == "efficient"
    assert attention._cuda_kernel(bf, m) == "efficient"
    assert attention._cuda_kernel(torch.zeros(1, 1, 1, 12, dtype=torch.bfloat16), None) == "efficient"
    assert attention._cuda_kernel(torch.zeros(1, 1, 1, 264, dtype=torch.float16), None) == "efficient"
    monkeypatch.setattr(attention, "CUDA_KERNEL", "efficient")
    assert attention._cuda_kernel(bf, None) == "efficient"


def test_shared_prefix_available_by_device():
    assert attention.shared_prefix_available(torch.device("cpu")) == (attention._cpu_flash() is not None)
    assert not attention.shared_prefix_available(torch.device("meta"))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_reward_model_on_cuda_takes_the_kernel_and_matches_the_per_row_cache(
    amp,
    tokenizer,
    seed,  # noqa: F811
    monkeypatch,
):
    """A decoder RewardModel on CUDA: shared-prefix calls go through the kernel (a spy), and its scores and training
    gradients equal the per-row expanded cache's (fp32: to float rounding; bf16: to bf16 rounding)."""
    calls = []
    real = attention._shared_forward
    monkeypatch.setattr(attention, "_shared_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rng = random.Random(seed)
    reqs = requests(rng, 3, 6)
    rm = build("decoder", tokenizer, seed, "cuda", score_amp=amp, amp=amp)
    assert rm.encoder._shared_prefix_kernel()
    with_kernel = rm.score(reqs)
    assert calls, "the shared-prefix kernel did not run on CUDA"
    rm.encoder.config.shared_prefix_kernel = False
    ref = rm.score(reqs)
    rel = 1e-4 if amp == "none" else 5e-2
    assert float((with_kernel - ref).abs().max()) <= rel * max(float(ref.std()), 1e-6)
    rows = rm.prepare(reqs)
    idx = np.arange(len(reqs))
    w = torch.randn(len(idx), rm.encoder.net.hidden_size, generator=torch.Generator().manual_seed(seed)).cuda()

    def grads(kernel: bool):
        rm.encoder.config.shared_prefix_kernel = kernel
        rm.encoder.net.zero_grad(set_to_none=True)
        with rm.encoder.precision.autocast():
            h, _ = encode.encode_shared(rm.encoder, rows, idx, inference=False)  # (R, H)
        (h.float() * w).sum().backward()
        return {n: p.grad.float().clone() for n, p in rm.encoder.net.backbone.named_parameters() if p.grad is not None}

    n = len(calls)
    g_k, g_r = grads(True), grads(False)
    assert len(calls) > n and g_k.keys() == g_r.keys() and g_k
    for name in g_k:
        scale = float(g_r[name].abs().max()) + 1e-12
        assert float((g_k[name] - g_r[name]).abs().max()) <= (1e-3 if amp == "none" else 1e-1) * scale, name
