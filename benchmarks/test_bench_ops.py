"""Kernel suite (pytest-benchmark): every op against its baselines, forward and forward + backward.

    python -m pytest benchmarks/ --benchmark-only [-k small|medium|cuda] [--benchmark-autosave]

Implementations, side by side in one group per (op, mode, device, shape, dtype):
  ours      the public op: backend "cpp" on CPU tensors, "triton" on CUDA tensors
  eager     the plain-PyTorch reference (optimas_fast/ops/reference.py), autograd for the backward
  compile   torch.compile of that reference (skipped, with the compiler's error as the reason, where it
            does not compile)
  all_heads multihead_score only: every row times all C heads, then the row's own column (what a
            C-label Hugging Face head computes)
  hf_head   last_token_hidden only: the Hugging Face sequence-classification way, a C-way head on every
            token of (B, T, H), then the last token's row and the component's column
  kernel    CUDA only, multihead_score and fused_head_bt_loss: the Triton launchers alone
            (optimas_fast/ops/_triton.py), without the public op's argument checks (which sync with the
            host: head-id range, weights) and autograd: the kernels' own share of the copy bandwidth

Throughput in each result's extra_info: rows/s, GB/s and the fraction of the device's measured copy
bandwidth (a torch clone of a large buffer, bytes read + written, measured once per session). The bytes
are the fewest any implementation of that op must move (below, per op), the same count for every
implementation: GB/s is effective bandwidth, so a baseline that moves more shows as slower, not as busier.
On CUDA every timed call ends with a synchronize (what a caller waiting for the result sees); extra_info
also has `pipelined_ms`, back-to-back calls timed with CUDA events (what a training loop sees).

Shapes: CPU small (B=256, H=384, C=4) and medium (B=4096, H=1024, C=16); CUDA large (B=16384, H=4096,
C=32, the issue's size), float32 and bfloat16. The gather path uses (B, T, H) = (32, 64, 384),
(32, 256, 1024) and (256, 1024, 4096).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import optimas_fast.ops as ops
from optimas_fast.ops import reference as ref


@dataclass(frozen=True)
class Case:
    device: str
    size: str  # "small" | "medium" | "large": the word -k selects on
    B: int  # rows (pairs for the losses)
    H: int  # hidden size
    C: int  # heads
    T: int  # tokens per row, gather path only
    BT: int  # rows of the gather path (its (B, T, H) input is T times larger)
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.device}-{self.size}-{str(self.dtype).replace('torch.', '')}"

    @property
    def fast_backend(self) -> str:
        return "triton" if self.device == "cuda" else "cpp"


def _cases() -> list[Case]:
    small = dict(B=256, H=384, C=4, T=64, BT=32)
    medium = dict(B=4096, H=1024, C=16, T=256, BT=32)
    large = dict(B=16384, H=4096, C=32, T=1024, BT=256)
    # CPU: medium in float32 only, so that the whole CPU suite (torch.compile included) stays under 3 min
    cases = [
        Case("cpu", "small", dtype=torch.float32, **small),
        Case("cpu", "small", dtype=torch.bfloat16, **small),
        Case("cpu", "medium", dtype=torch.float32, **medium),
    ]
    if torch.cuda.is_available():
        cases += [Case("cuda", "large", dtype=dt, **large) for dt in (torch.float32, torch.bfloat16)]
    return cases


CASES = _cases()
MODES = ["fwd", "fwdbwd"]


def with_impls(impls, cuda_only=()):
    """(case, impl) parameters: every implementation on every case, `cuda_only` ones on CUDA cases only."""
    return [
        pytest.param(c, i, id=f"{c.id}-{i}")
        for c in CASES
        for i in (*impls, *cuda_only)
        if i not in cuda_only or c.device == "cuda"
    ]


def _triton_impl():
    from optimas_fast.ops import _triton  # imports triton: only for the CUDA kernel-only timings

    return _triton


# ------------------------------------------------------------------------------------------- timing
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _pipelined_seconds(step, reps: int = 20) -> float:
    """Seconds per call of back-to-back calls (no synchronize between them), timed with CUDA events."""
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def run_benchmark(
    benchmark, copy_bandwidth, case: Case, group: str, impl: str, step, *, rows: int, nbytes: int, check=None
):
    """Warm up (compiling, for `compile`), check the result, time `step` with pytest-benchmark, and record
    throughput in extra_info. A compile failure is a skip naming the compiler's error."""
    dev = case.device

    def timed():
        out = step()
        _sync(dev)
        return out

    try:
        out = timed()  # warm-up: Triton JIT, dynamo/inductor compile, allocator
    except Exception as e:  # noqa: BLE001 - any compiler error becomes the skip reason
        if impl != "compile":
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        pytest.skip(
            f"torch.compile of the reference does not compile on {dev} {case.dtype}: {type(e).__name__}: {first}"
        )
    if check is not None:
        check(out)
    calls = []
    for _ in range(3):  # the slowest of three sizes the rounds: one lucky fast call on a busy CPU overshoots
        t0 = time.perf_counter()
        timed()
        calls.append(time.perf_counter() - t0)
    once = max(max(calls), 1e-6)
    # ~0.2 s of timed calls per benchmark on CPU (the whole CPU suite stays within minutes), ~0.5 s on CUDA
    budget, least, most = (0.5, 10, 200) if dev == "cuda" else (0.2, 3, 50)
    rounds = int(min(most, max(least, budget / once)))
    benchmark.group = group
    benchmark.extra_info.update(
        impl=impl,
        device=dev,
        dtype=str(case.dtype).replace("torch.", ""),
        shape={"B": case.B, "H": case.H, "C": case.C, "T": case.T, "BT": case.BT},
        rows=rows,
        bytes=nbytes,
        backend={"ours": case.fast_backend, "kernel": "triton"}.get(impl, "torch"),
    )
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    median = stats.stats.median
    bw = copy_bandwidth(dev)
    info = benchmark.extra_info
    info.update(
        median_ms=median * 1e3,
        rows_per_s=rows / median,
        GBps=nbytes / median / 1e9,
        copy_GBps=bw / 1e9,
        fraction_of_copy_bw=nbytes / median / bw,
    )
    if dev == "cuda":
        p = _pipelined_seconds(step)
        info.update(pipelined_ms=p * 1e3, pipelined_fraction_of_copy_bw=nbytes / p / bw)


def _close(expected, tol):
    def check(out):
        got = out if isinstance(out, torch.Tensor) else out[0]
        scale = max(float(expected.abs().max()), 1e-6)
        torch.testing.assert_close(got.detach().float(), expected.float(), rtol=tol, atol=tol * scale)

    return check


def _tol(dtype) -> float:
    return 2e-4 if dtype == torch.float32 else 2e-2


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def _clear(*ts):
    for t in ts:
        t.grad = None


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


@functools.lru_cache(maxsize=2)
def _pair_inputs(case: Case):
    """Inputs drawn on the case's device (a CPU draw of the CUDA sizes takes seconds); fixed seed: the same
    rows for every implementation."""
    dev = case.device
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, C = case.B, case.H, case.C
    hc = torch.randn(B, H, generator=g, device=dev).to(case.dtype)  # (B, H)
    hr = torch.randn(B, H, generator=g, device=dev).to(case.dtype)  # (B, H)
    ids = torch.randint(0, C, (B,), generator=g, device=dev)  # (B,)
    W = torch.randn(C, H, generator=g, device=dev) / H**0.5  # (C, H) fp32 heads, as RewardNet keeps them
    b = torch.randn(C, generator=g, device=dev)  # (C,)
    w = torch.rand(B, generator=g, device=dev) + 0.05  # (B,)
    mu = torch.randn(B, generator=g, device=dev) * 0.3  # (B,)
    up = torch.randn(B, generator=g, device=dev)  # (B,) upstream gradient for per-row outputs
    return hc, hr, ids, W, b, w, mu, up


def _esize(case: Case) -> int:
    return torch.empty(0, dtype=case.dtype).element_size()


# ------------------------------------------------------------------------------------------- bt_loss
def _bt_eager(rc, rr, w, mu):
    return ref.bt_loss(rc, rr, w, mu, 0.1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case,impl", with_impls(["ours", "eager", "compile"]))
def test_bt_loss(benchmark, copy_bandwidth, case, mode, impl):
    """Bytes: read r+, r- (dtype) and w, mu (fp32); fwd+bwd also writes d r+, d r-."""
    hc, hr, ids, W, b, w, mu, _ = _pair_inputs(case)
    rc0, rr0 = (hc[:, 0] * 3), (hr[:, 0] * 3)  # (B,) rewards in the case's dtype
    grad = mode == "fwdbwd"
    rc, rr = _leaf(rc0, grad), _leaf(rr0, grad)
    fn = {
        "ours": lambda *a: ops.bt_loss(*a, center=0.1, backend=case.fast_backend),
        "eager": _bt_eager,
        "compile": _compiled(_bt_eager),
    }[impl]

    def step():
        out = fn(rc, rr, w, mu)
        if grad:
            _clear(rc, rr)
            out.backward()
        return out

    e = _esize(case)
    nbytes = case.B * (2 * e + 8) + (2 * case.B * e if grad else 0)
    expected = _bt_eager(rc0.float(), rr0.float(), w, mu)
    run_benchmark(
        benchmark,
        copy_bandwidth,
        case,
        f"bt_loss {mode} {case.id}",
        impl,
        step,
        rows=case.B,
        nbytes=nbytes,
        check=_close(expected, _tol(case.dtype)),
    )


# ------------------------------------------------------------------------------------------- multihead_score
def _all_heads(x, ids, W, b):
    rows = torch.arange(x.shape[0], device=x.device)
    return (F.linear(x, W.to(x.dtype), b.to(x.dtype)))[rows, ids].float()  # (N, C) logits, then (N,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case,impl", with_impls(["ours", "eager", "compile", "all_heads"], cuda_only=["kernel"]))
def test_multihead_score(benchmark, copy_bandwidth, case, mode, impl):
    """Bytes: fwd reads hidden (N, H) once; fwd+bwd also reads it again for dW and writes d hidden."""
    hc, _, ids, W0, b0, _, _, up = _pair_inputs(case)
    grad = mode == "fwdbwd"
    x, W, b = _leaf(hc, grad), _leaf(W0, grad), _leaf(b0, grad)
    if impl == "kernel":
        tri = _triton_impl()
        W32, b32 = W0.float().contiguous(), b0.float().contiguous()

        def step():
            out = tri.multihead_score_fwd(hc, ids, W32, b32)  # (N,) f32
            if grad:
                tri.multihead_score_bwd(hc, ids, W32, up, True, True, True)
            return out
    else:
        fn = {
            "ours": lambda *a: ops.multihead_score(*a, backend=case.fast_backend),
            "eager": ref.multihead_score,
            "compile": _compiled(ref.multihead_score),
            "all_heads": _all_heads,
        }[impl]

        def step():
            out = fn(x, ids, W, b)  # (N,)
            if grad:
                _clear(x, W, b)
                out.backward(up.to(out.dtype))
            return out

    nbytes = case.B * case.H * _esize(case) * (3 if grad else 1)
    expected = ref.multihead_score(hc.float(), ids, W0, b0)
    run_benchmark(
        benchmark,
        copy_bandwidth,
        case,
        f"multihead_score {mode} {case.id}",
        impl,
        step,
        rows=case.B,
        nbytes=nbytes,
        check=_close(expected, _tol(case.dtype)),
    )


# ------------------------------------------------------------------------------------------- fused_head_bt_loss
def _fused_eager(hc, hr, ids, W, b, w, mu):
    return ref.fused_head_bt_loss(hc, hr, ids, W, b, w, mu, 0.01)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case,impl", with_impls(["ours", "eager", "compile"], cuda_only=["kernel"]))
def test_fused_head_bt_loss(benchmark, copy_bandwidth, case, mode, impl):
    """Bytes: read h+, h- (B, H) once; fwd+bwd also writes d h+, d h- (W, b, O(B) terms are negligible)."""
    hc0, hr0, ids, W0, b0, w, mu, _ = _pair_inputs(case)
    grad = mode == "fwdbwd"
    hc, hr, W, b = (_leaf(t, grad) for t in (hc0, hr0, W0, b0))
    if impl == "kernel":
        tri = _triton_impl()
        W32, b32, scale = W0.float().contiguous(), b0.float().contiguous(), 1.0 / float(w.sum())

        def step():  # the forward computes every gradient too when asked (need_grad): that is fwd+bwd
            rows = tri.fused_head_bt(hc0, hr0, ids, W32, b32, w, mu, 0.01, scale, grad)[0]  # (B,) f32
            return rows.sum() * scale
    else:
        fn = {
            "ours": lambda *a: ops.fused_head_bt_loss(*a, 0.01, backend=case.fast_backend),
            "eager": _fused_eager,
            "compile": _compiled(_fused_eager),
        }[impl]

        def step():
            out = fn(hc, hr, ids, W, b, w, mu)
            if grad:
                _clear(hc, hr, W, b)
                out.backward()
            return out

    nbytes = case.B * case.H * _esize(case) * (4 if grad else 2)
    expected = _fused_eager(hc0.float(), hr0.float(), ids, W0, b0, w, mu)
    run_benchmark(
        benchmark,
        copy_bandwidth,
        case,
        f"fused_head_bt_loss {mode} {case.id}",
        impl,
        step,
        rows=case.B,
        nbytes=nbytes,
        check=_close(expected, _tol(case.dtype)),
    )


# ------------------------------------------------------------------------------------------- last_token_hidden
@functools.lru_cache(maxsize=1)
def _seq_inputs(case: Case):
    dev = case.device
    g = torch.Generator(device=dev).manual_seed(1)
    B, T, H, C = case.BT, case.T, case.H, case.C
    hidden = torch.randn(B, T, H, generator=g, device=dev).to(case.dtype)  # (B, T, H) backbone output, right padded
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g, device=dev)  # (B,)
    ids = torch.randint(0, C, (B,), generator=g, device=dev)  # (B,)
    W = torch.randn(C, H, generator=g, device=dev) / H**0.5  # (C, H)
    b = torch.randn(C, generator=g, device=dev)  # (C,)
    up = torch.randn(B, generator=g, device=dev)  # (B,)
    return hidden, lengths, ids, W, b, up


def _gather_eager(hidden, lengths, ids, W, b):
    return ref.multihead_score(ref.last_token_hidden(hidden, lengths), ids, W, b)  # (B,)


def _hf_head(hidden, lengths, ids, W, b):
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = F.linear(hidden, W.to(hidden.dtype), b.to(hidden.dtype))  # (B, T, C): every token, every head
    return logits[rows, lengths - 1, ids].float()  # (B,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case,impl", with_impls(["ours", "eager", "compile", "hf_head"]))
def test_last_token_hidden(benchmark, copy_bandwidth, case, mode, impl):
    """The gather path: scores from full sequences, last_token_hidden then multihead_score (ours) vs the
    all-token head. Bytes: fwd reads the B last-token rows; fwd+bwd also writes the dense (B, T, H) gradient
    of the backbone output (what its backward consumes)."""
    hidden0, lengths, ids, W0, b0, up = _seq_inputs(case)
    grad = mode == "fwdbwd"
    hidden, W, b = _leaf(hidden0, grad), _leaf(W0, grad), _leaf(b0, grad)

    def ours(h, n, i, Wt, bt):
        return ops.multihead_score(
            ops.last_token_hidden(h, n, backend=case.fast_backend), i, Wt, bt, backend=case.fast_backend
        )

    fn = {"ours": ours, "eager": _gather_eager, "compile": _compiled(_gather_eager), "hf_head": _hf_head}[impl]

    def step():
        out = fn(hidden, lengths, ids, W, b)  # (B,)
        if grad:
            _clear(hidden, W, b)
            out.backward(up.to(out.dtype))
        return out

    e = _esize(case)
    nbytes = case.BT * case.H * e + (case.BT * case.T * case.H * e if grad else 0)
    expected = _gather_eager(hidden0.float(), lengths, ids, W0, b0)
    run_benchmark(
        benchmark,
        copy_bandwidth,
        case,
        f"last_token_hidden {mode} {case.id}",
        impl,
        step,
        rows=case.BT,
        nbytes=nbytes,
        check=_close(expected, _tol(case.dtype)),
    )
