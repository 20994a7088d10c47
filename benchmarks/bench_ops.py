"""Fast ops vs their eager baselines, side by side in one run on the same data.

    python benchmarks/bench_ops.py            # all three CPU comparisons (~1-2 min on 2 cores)
    python benchmarks/bench_ops.py --gpu      # also the Triton-vs-torch CUDA comparison

Results also go to benchmarks/_out/bench_ops.json (with the machine description). The pytest-benchmark suite
(benchmarks/test_bench_ops.py) covers every op, dtype and baseline; this script keeps the three headline
comparisons of the README, and the peak-memory one that a timing suite cannot show.

1. fused_head_bt_loss fwd+bwd, cpp vs the eager torch reference (gather -> per-row head -> logsigmoid ->
   mean, autograd), B=4096 pairs, H=1024, C=16, float32.
2. The same loss from full [B,T,H] hidden states, ours (last_token_hidden + fused loss) vs the Hugging Face
   sequence-classification way (C-way head on every token, pick the last token and the component's
   column), T=512; time and peak extra memory, each variant in its own subprocess.
3. multihead_score vs computing all C heads then gathering, N=65536, H=1024, C=32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from _common import git_rev, machine, timeit, write_results

import optimas_fast.ops as ops
from optimas_fast.ops import reference as ref


def bench_fused(B=4096, H=1024, C=16):
    g = torch.Generator().manual_seed(0)
    hc, hr = torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    ids = torch.randint(0, C, (B,), generator=g)
    W, b = (torch.randn(C, H, generator=g) / H**0.5).requires_grad_(), torch.randn(C, generator=g).requires_grad_()
    hc.requires_grad_(), hr.requires_grad_()

    def run(fn):
        def step():
            for t in (hc, hr, W, b):
                t.grad = None
            fn().backward()

        return step

    eager = run(lambda: ref.fused_head_bt_loss(hc, hr, ids, W, b))
    fused = run(lambda: ops.fused_head_bt_loss(hc, hr, ids, W, b, backend="cpp"))
    t_eager, t_fused = timeit(eager, reps=15), timeit(fused, reps=15)
    return {
        "B": B,
        "H": H,
        "C": C,
        "eager_ms": t_eager * 1e3,
        "cpp_ms": t_fused * 1e3,
        "speedup": t_eager / t_fused,
        "cpp_pairs_per_s": B / t_fused,
    }


# ---- 2: from full sequences; each variant in a fresh process so peak RSS is its own ----
def _seq_variant(variant: str, B: int, T: int, H: int, C: int) -> dict:
    g = torch.Generator().manual_seed(0)
    hc = torch.randn(B, T, H, generator=g).requires_grad_()  # (B, T, H) backbone output, chosen
    hr = torch.randn(B, T, H, generator=g).requires_grad_()  # (B, T, H) rejected
    lc = torch.randint(T // 2, T + 1, (B,), generator=g)  # right padding: real lengths
    lr = torch.randint(T // 2, T + 1, (B,), generator=g)
    ids = torch.randint(0, C, (B,), generator=g)
    W = (torch.randn(C, H, generator=g) / H**0.5).requires_grad_()
    b = torch.randn(C, generator=g).requires_grad_()
    rows = torch.arange(B)

    def hf_way():
        # what AutoModelForSequenceClassification does: score every token with all C heads ...
        logits_c = F.linear(hc, W, b)  # (B, T, C)
        logits_r = F.linear(hr, W, b)  # (B, T, C)
        # ... then take the last real token and the component's column
        rc = logits_c[rows, lc - 1, ids]  # (B,)
        rr = logits_r[rows, lr - 1, ids]  # (B,)
        return -F.logsigmoid(rc - rr).mean()

    def ours(sparse):
        xc = ops.last_token_hidden(hc, lc, sparse_grad=sparse, backend="cpp")  # (B, H)
        xr = ops.last_token_hidden(hr, lr, sparse_grad=sparse, backend="cpp")  # (B, H)
        return ops.fused_head_bt_loss(xc, xr, ids, W, b, backend="cpp")

    fn = {"hf": hf_way, "ours_dense_grad": lambda: ours(False), "ours_sparse_grad": lambda: ours(True)}[variant]

    def step():
        for t in (hc, hr, W, b):
            t.grad = None
        fn().backward()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; inputs already allocated
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The first step's extra peak includes the (B,T,H) .grad buffers when the grad is dense.
    t = timeit(step, warmup=1, reps=5)
    return {"variant": variant, "ms": t * 1e3, "peak_extra_mib": (peak - before) / 1024}


def bench_sequences(B=256, T=512, H=1024, C=16):
    out = {}
    for v in ("hf", "ours_dense_grad", "ours_sparse_grad"):
        res = subprocess.run(
            [sys.executable, __file__, "--seq-variant", v, "--shape", f"{B},{T},{H},{C}"],
            capture_output=True,
            text=True,
            check=True,
        )
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    hf = out["hf"]
    for v in ("ours_dense_grad", "ours_sparse_grad"):
        out[v]["speedup_vs_hf"] = hf["ms"] / out[v]["ms"]
        out[v]["memory_ratio_vs_hf"] = hf["peak_extra_mib"] / max(out[v]["peak_extra_mib"], 1e-3)
    return {"B": B, "T": T, "H": H, "C": C, **out}


def bench_multihead(N=65536, H=1024, C=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g)
    ids = torch.randint(0, C, (N,), generator=g)
    W, b = torch.randn(C, H, generator=g) / H**0.5, torch.randn(C, generator=g)
    rows = torch.arange(N)
    with torch.inference_mode():
        all_heads = lambda: (x @ W.T + b)[rows, ids]  # (N, C) logits, then gather  # noqa: E731
        ours = lambda: ops.multihead_score(x, ids, W, b, backend="cpp")  # noqa: E731
        t_all, t_ours = timeit(all_heads, reps=15), timeit(ours, reps=15)
        assert torch.allclose(all_heads(), ours(), atol=1e-3)
    return {
        "N": N,
        "H": H,
        "C": C,
        "all_heads_ms": t_all * 1e3,
        "cpp_ms": t_ours * 1e3,
        "speedup": t_all / t_ours,
        "cpp_rows_per_s": N / t_ours,
        "cpp_GBps": x.numel() * 4 / t_ours / 1e9,
    }


def bench_gpu(B=16384, H=4096, C=32):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    hc = torch.randn(B, H, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
    hr = torch.randn(B, H, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
    ids = torch.randint(0, C, (B,), device=dev, generator=g)
    W = (torch.randn(C, H, device=dev, generator=g) / H**0.5).requires_grad_()
    b = torch.randn(C, device=dev, generator=g).requires_grad_()

    def cuda_time(fn, reps=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps / 1e3

    def step(fn):
        def f():
            for t in (hc, hr, W, b):
                t.grad = None
            fn().backward()

        return f

    t_ref = cuda_time(step(lambda: ref.fused_head_bt_loss(hc, hr, ids, W, b)))
    t_tri = cuda_time(step(lambda: ops.fused_head_bt_loss(hc, hr, ids, W, b, backend="triton")))
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = cuda_time(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() / t_copy
    # minimum traffic of the fused step: read hc, hr; write dhc, dhr (the grads). W/b are negligible.
    moved = 4 * B * H * 2
    return {
        "B": B,
        "H": H,
        "C": C,
        "dtype": "bfloat16",
        "torch_ms": t_ref * 1e3,
        "triton_ms": t_tri * 1e3,
        "speedup": t_ref / t_tri,
        "triton_GBps": moved / t_tri / 1e9,
        "copy_GBps": copy_bw / 1e9,
        "fraction_of_copy_bw": moved / t_tri / copy_bw,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="also run the CUDA Triton comparison")
    p.add_argument("--seq-variant", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.seq_variant:
        print(json.dumps(_seq_variant(args.seq_variant, *map(int, args.shape.split(",")))))
        return
    print(f"# machine: {machine()}; commit {git_rev()}")
    r1 = bench_fused()
    print(
        f"1. fused_head_bt_loss fwd+bwd B={r1['B']} H={r1['H']} C={r1['C']} fp32: eager torch "
        f"{r1['eager_ms']:.2f} ms, cpp {r1['cpp_ms']:.2f} ms -> {r1['speedup']:.1f}x "
        f"({r1['cpp_pairs_per_s']:.0f} pairs/s)"
    )
    r2 = bench_sequences()
    hf = r2["hf"]
    print(
        f"2. from [B,T,H] hidden, B={r2['B']} T={r2['T']} H={r2['H']} C={r2['C']}: HF seq-cls way "
        f"{hf['ms']:.1f} ms, peak +{hf['peak_extra_mib']:.0f} MiB"
    )
    for v in ("ours_dense_grad", "ours_sparse_grad"):
        o = r2[v]
        print(
            f"   {v}: {o['ms']:.2f} ms ({o['speedup_vs_hf']:.0f}x faster), peak +{o['peak_extra_mib']:.0f} MiB "
            f"({o['memory_ratio_vs_hf']:.0f}x less)"
        )
    r3 = bench_multihead()
    print(
        f"3. multihead_score N={r3['N']} H={r3['H']} C={r3['C']} fp32: all heads + gather "
        f"{r3['all_heads_ms']:.2f} ms, cpp {r3['cpp_ms']:.2f} ms -> {r3['speedup']:.1f}x "
        f"({r3['cpp_GBps']:.1f} GB/s of hidden states read)"
    )
    results = {"fused": r1, "sequences": r2, "multihead": r3}
    if args.gpu:
        r4 = results["gpu"] = bench_gpu()
        print(
            f"4. CUDA {torch.cuda.get_device_name(0)} fused fwd+bwd bf16 B={r4['B']} H={r4['H']} C={r4['C']}: "
            f"torch {r4['torch_ms']:.3f} ms, triton {r4['triton_ms']:.3f} ms -> {r4['speedup']:.1f}x; "
            f"{r4['triton_GBps']:.0f} GB/s = {100 * r4['fraction_of_copy_bw']:.0f}% of copy bandwidth "
            f"({r4['copy_GBps']:.0f} GB/s)"
        )
    print(f"results: {write_results('bench_ops', results)}")


if __name__ == "__main__":
    main()
