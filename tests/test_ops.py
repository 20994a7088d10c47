"""Every op, every backend vs the float64 reference: forward and every gradient, odd shapes, random
inputs drawn fresh per run (see conftest: the seed is printed for replay). Triton runs interpreted on
CPU (TRITON_INTERPRET=1, set by conftest), so its shapes stay small."""

from __future__ import annotations

import itertools

import pytest
import torch

import optimas_fast.ops as ops
from optimas_fast.ops import functional as fn
from optimas_fast.ops import reference as ref
from optimas_fast.ops._backend import BackendUnavailableError, select

# (dtype, tolerance): relative tolerance, and absolute tolerance as a fraction of the largest expected
# magnitude. Half-precision tolerances come from rounding the stored gradients (2^-8 for bf16).
DTYPES = [(torch.float32, 2e-4), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
CPP_SHAPES = list(itertools.product((1, 7, 1000), (1, 33, 384, 1000), (1, 3, 17)))  # (B, H, C)
TRITON_SHAPES = [(1, 1, 1), (7, 33, 3), (13, 70, 17), (3, 4100, 2)]  # the last: two column blocks


def close(actual, expected, tol, what="", scale_hint=0.0):
    """assert_close with atol relative to the largest expected magnitude (or `scale_hint`, the size of
    the terms a result is the difference of, where it may cancel to near zero)."""
    expected = expected.detach().double()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, float(scale_hint))
    # Values in the output dtype's subnormal range are spaced smallest_normal * eps apart (6e-8 for
    # float16): rounding to that grid is the dtype's limit, not the kernel's error.
    info = torch.finfo(actual.dtype) if actual.is_floating_point() else torch.finfo(torch.float64)
    floor = info.smallest_normal * info.eps
    torch.testing.assert_close(
        actual.detach().double(),
        expected,
        rtol=tol,
        atol=max(tol * max(scale, 1e-6), floor),
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def rand_inputs(gen, B, H, C, dtype, weighted=True):
    """Random pair inputs; hidden states quantised to `dtype` first so the float64 reference sees the
    same values the kernel reads."""
    hc = torch.randn(B, H, generator=gen).to(dtype)
    hr = torch.randn(B, H, generator=gen).to(dtype)
    ids = torch.randint(0, C, (B,), generator=gen)
    W = torch.randn(C, H, generator=gen) / H**0.5
    b = torch.randn(C, generator=gen)
    w = torch.rand(B, generator=gen) + 0.05 if weighted else None
    mu = torch.randn(B, generator=gen) * 0.3 if weighted else None
    return hc, hr, ids, W, b, w, mu


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def f64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in ts]


def grads(out, inputs):
    live = [t for t in inputs if t is not None]
    gs = torch.autograd.grad(out, live)
    it = iter(gs)
    return [None if t is None else next(it) for t in inputs]


def fast_backends():
    return ["cpp", "triton"]


def shapes_for(backend):
    return CPP_SHAPES if backend == "cpp" else TRITON_SHAPES


def backend_shape_params():
    return [(be, s) for be in fast_backends() for s in shapes_for(be)]


# --------------------------------------------------------------------------------------------------
# forward + backward vs reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("backend,shape", backend_shape_params(), ids=str)
@pytest.mark.parametrize("variant", ["weighted_centered", "plain"])
def test_fused_head_bt_loss_matches_reference(gen, backend, shape, dtype, tol, variant):
    B, H, C = shape
    weighted = variant == "weighted_centered"
    center = 0.05 if weighted else 0.0
    hc, hr, ids, W, b, w, mu = rand_inputs(gen, B, H, C, dtype, weighted)
    ins = leaves(hc, hr, W, b, w, mu)
    out = ops.fused_head_bt_loss(ins[0], ins[1], ids, ins[2], ins[3], ins[4], ins[5], center, backend=backend)
    got = grads(out, ins)
    r_ins = f64(hc, hr, W, b, w, mu)
    expected = ref.fused_head_bt_loss(r_ins[0], r_ins[1], ids, r_ins[2], r_ins[3], r_ins[4], r_ins[5], center)
    want = grads(expected, r_ins)
    assert out.dtype == torch.float32 and out.shape == ()
    close(out, expected, tol, "loss")
    for name, g, e in zip(("h_chosen", "h_rejected", "W", "b", "weight", "margin"), got, want):
        assert (g is None) == (e is None)
        if g is not None:
            assert g.dtype == (ins[0].dtype if name.startswith("h_") else torch.float32)
            # d/dw_j = (nls_j - L) / sum(w): a difference of terms of size L / sum(w)
            hint = float(expected.detach()) / float(w.sum()) if name == "weight" else 0.0
            close(g, e, tol, f"grad {name}", hint)


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("backend,shape", backend_shape_params(), ids=str)
def test_multihead_score_matches_reference(gen, backend, shape, dtype, tol):
    N, H, C = shape
    x, _, ids, W, b, _, _ = rand_inputs(gen, N, H, C, dtype, False)
    upstream = torch.randn(N, generator=gen)
    ins = leaves(x, W, b)
    out = ops.multihead_score(ins[0], ids, ins[1], ins[2], backend=backend)
    got = grads((out * upstream).sum(), ins)
    r_ins = f64(x, W, b)
    expected = ref.multihead_score(r_ins[0], ids, r_ins[1], r_ins[2])
    want = grads((expected * upstream.double()).sum(), r_ins)
    assert out.shape == (N,) and out.dtype == torch.float32
    # scores are computed in fp32 from the same quantised inputs: tight even for half inputs
    close(out, expected, 2e-4, "scores")
    for name, g, e in zip(("hidden", "W", "b"), got, want):
        close(g, e, tol if name == "hidden" else 2e-4, f"grad {name}")


@pytest.mark.parametrize("variant", ["weighted_margin_centered", "plain"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("B", [1, 7, 1000])
def test_bt_loss_matches_reference(gen, backend, B, reduction, variant):
    """Loss and every gradient against float64, with weights, margins and centering, and without any of them
    (the kernel and the backward each have a separate path for that case)."""
    full = variant != "plain"
    center = 0.1 if full else 0.0
    rc, rr = torch.randn(B, generator=gen) * 3, torch.randn(B, generator=gen) * 3
    w, mu = torch.rand(B, generator=gen) + 0.01, torch.randn(B, generator=gen)
    upstream = torch.randn(B, generator=gen) if reduction == "none" else torch.tensor(1.7)
    ins = leaves(rc, rr, w, mu) if full else leaves(rc, rr)
    out = ops.bt_loss(*ins, center=center, reduction=reduction, backend=backend)
    got = grads((out * upstream).sum(), ins)
    r_ins = f64(rc, rr, w, mu) if full else f64(rc, rr)
    expected = ref.bt_loss(*r_ins, center=center, reduction=reduction)
    want = grads((expected * upstream.double()).sum(), r_ins)
    close(out, expected, 1e-5, "loss")
    # Each gradient is a difference of terms (e.g. -w*sigmoid(-d) + 2*center*s) that may cancel: compare
    # at the scale of those terms.
    ww = w if full else torch.ones(B)
    denom = float(ww.sum()) if reduction == "mean" else 1.0
    hint = float((upstream.abs() * (ww + 2 * center * (rc + rr).abs())).max()) / denom
    hint = max(hint, float(expected.detach().abs().sum()) / float(ww.sum()))  # weight: (nls_j - L) / sum(w)
    assert len(got) == len(ins)
    for name, g, e in zip(("r_chosen", "r_rejected", "weight", "margin"), got, want):
        close(g, e, 1e-5, f"grad {name}", hint)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 33), (3, 17, 384)], ids=str)
def test_last_token_hidden_matches_reference(gen, backend, shape, dtype, padding_side, sparse_grad):
    B, T, H = shape
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_(True)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    g = torch.randn(B, H, generator=gen).to(dtype)
    out = ops.last_token_hidden(hidden, lengths, padding_side, sparse_grad=sparse_grad, backend=backend)
    (grad,) = torch.autograd.grad((out * g).sum(), [hidden])
    r_hidden = hidden.detach().double().requires_grad_(True)
    expected = ref.last_token_hidden(r_hidden, lengths, padding_side)
    (want,) = torch.autograd.grad((expected * g.double()).sum(), [r_hidden])
    assert torch.equal(out.double(), expected.detach())  # a gather is exact
    assert grad.is_sparse == sparse_grad
    assert torch.equal(grad.to_dense().double(), want)
    if padding_side == "right":
        rows = torch.arange(B)
        assert torch.equal(out, hidden.detach()[rows, lengths - 1])


# --------------------------------------------------------------------------------------------------
# float64 reference gradients are right (gradcheck), fast path == functional == Function
# --------------------------------------------------------------------------------------------------
def test_reference_gradcheck(gen):
    B, H, C = 5, 6, 3
    hc, hr, ids, W, b, w, mu = (
        t if t is None or not t.is_floating_point() else t.double() for t in rand_inputs(gen, B, H, C, torch.float64)
    )
    args = f64(hc, hr, W, b, w, mu)
    assert torch.autograd.gradcheck(
        lambda a, c, Wt, bt, wt, m: ref.fused_head_bt_loss(a, c, ids, Wt, bt, wt, m, 0.1), args
    )
    assert torch.autograd.gradcheck(lambda a, Wt, bt: ref.multihead_score(a, ids, Wt, bt), f64(hc, W, b))
    assert torch.autograd.gradcheck(
        lambda x, y, wt, m: ref.bt_loss(x, y, wt, m, 0.2, "none"), f64(hc[:, 0], hr[:, 0], w, mu)
    )
    h3 = torch.randn(B, 4, H, generator=gen, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, 5, (B,), generator=gen)
    assert torch.autograd.gradcheck(lambda h: ref.last_token_hidden(h, lengths), (h3,))


def test_fused_equals_composition_and_function(gen):
    """fused_head_bt_loss == bt_loss(multihead_score(.), multihead_score(.)) == the autograd Function."""
    hc, hr, ids, W, b, w, mu = rand_inputs(gen, 31, 45, 4, torch.float32)
    fused = ops.fused_head_bt_loss(hc, hr, ids, W, b, w, mu, 0.02, backend="cpp")
    composed = ops.bt_loss(
        ops.multihead_score(hc, ids, W, b, backend="cpp"),
        ops.multihead_score(hr, ids, W, b, backend="cpp"),
        w,
        mu,
        0.02,
        backend="cpp",
    )
    direct = fn.FusedHeadBTFunction.apply(fn.FusedOptions(ids, 0.02, "mean", "cpp"), hc, hr, W, b, w, mu)
    close(fused, composed, 1e-5, "fused vs composed")
    assert torch.equal(fused, direct)


def test_cpp_fused_is_deterministic(gen):
    hc, hr, ids, W, b, w, mu = rand_inputs(gen, 777, 130, 5, torch.float32)
    runs = []
    for _ in range(2):
        ins = leaves(hc, hr, W, b)
        out = ops.fused_head_bt_loss(ins[0], ins[1], ids, ins[2], ins[3], w, mu, backend="cpp")
        runs.append([out, *grads(out, ins)])
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_upstream_gradient_scales_fused(gen):
    hc, hr, ids, W, b, _, _ = rand_inputs(gen, 9, 20, 2, torch.float32, False)
    ins = leaves(hc, hr, W, b)
    out = ops.fused_head_bt_loss(ins[0], ins[1], ids, ins[2], ins[3], reduction="sum", backend="cpp")
    g_scaled = grads(out * -2.5, ins)
    r_ins = f64(hc, hr, W, b)
    want = grads(ref.fused_head_bt_loss(r_ins[0], r_ins[1], ids, r_ins[2], r_ins[3], reduction="sum") * -2.5, r_ins)
    for g, e in zip(g_scaled, want):
        close(g, e, 2e-4)


def test_noncontiguous_and_int32_ids_are_handled(gen):
    hc, hr, ids, W, b, _, _ = rand_inputs(gen, 12, 40, 3, torch.float32, False)
    hc_t = hc.t().contiguous().t()  # same values, column-major
    assert not hc_t.is_contiguous()
    a = ops.fused_head_bt_loss(hc_t, hr, ids.to(torch.int32), W, b, backend="cpp")
    e = ref.fused_head_bt_loss(hc.double(), hr.double(), ids, W.double(), b.double())
    close(a, e, 2e-4)
    s = ops.multihead_score(hc[:, ::2], ids.to(torch.int32), W[:, ::2], b, backend="cpp")
    close(s, ref.multihead_score(hc[:, ::2].double(), ids, W[:, ::2].double(), b.double()), 2e-4)


# --------------------------------------------------------------------------------------------------
# numerics at the edges
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_bt_loss_stable_for_huge_margins(gen, backend):
    B = 64
    delta = (torch.rand(B, generator=gen) * 2 - 1) * 1e4  # |Δ| up to 1e4
    rc = (torch.randn(B, generator=gen) + delta).requires_grad_(True)
    rr = torch.randn(B, generator=gen).requires_grad_(True)
    out = ops.bt_loss(rc, rr, backend=backend)
    gc, gr = torch.autograd.grad(out, [rc, rr])
    assert torch.isfinite(out) and torch.isfinite(gc).all() and torch.isfinite(gr).all()
    r64 = [rc.detach().double().requires_grad_(True), rr.detach().double().requires_grad_(True)]
    e = ref.bt_loss(*r64)
    ge = torch.autograd.grad(e, r64)
    close(out, e, 1e-5)
    close(gc, ge[0], 1e-5)
    close(gr, ge[1], 1e-5)


@pytest.mark.parametrize("backend", fast_backends())
def test_bt_loss_rows_keep_relative_precision_for_confident_pairs(backend):
    """A confident pair's loss is ~exp(-d), tiny: each row keeps float32's relative precision for d in
    [-20, 20] (log(1 + e) instead of log1p(e) lost it: 1e-4 relative at d = 8.3, all of it at d >= 16)."""
    d = torch.linspace(-20, 20, 4001)
    out = ops.bt_loss(d, torch.zeros_like(d), reduction="none", backend=backend)
    expected = ref.bt_loss(d.double(), torch.zeros_like(d).double(), reduction="none")
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_pair_weights_are_checked(gen, backend):
    """A negative weight, or all-zero weights under a mean, is an error naming `weight`; zero weights under a
    sum are fine; a NaN weight gives a NaN loss (like any NaN input), even next to zeros."""
    rc, rr = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    hc, hr, ids, W, b, _, _ = rand_inputs(gen, 5, 8, 2, torch.float32, False)
    losses = (
        lambda w, red: ops.bt_loss(rc, rr, w, reduction=red, backend=backend),
        lambda w, red: ops.fused_head_bt_loss(hc, hr, ids, W, b, w, reduction=red, backend=backend),
    )
    for loss in losses:
        with pytest.raises(ValueError, match="weight: pair weights must be >= 0"):
            loss(torch.tensor([1.0, 0.5, -0.1, 2.0, 1.0]), "mean")
        with pytest.raises(ValueError, match="weight: weights sum to 0"):
            loss(torch.zeros(5), "mean")
        assert float(loss(torch.zeros(5), "sum")) == 0.0
        assert torch.isnan(loss(torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]), "mean"))
        assert torch.isnan(loss(torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0]), "mean"))
        torch.testing.assert_close(
            loss(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]), "mean"), loss(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]), "sum")
        )


@pytest.mark.parametrize("backend", ["torch", *fast_backends()])
def test_nan_propagates(gen, backend):
    """Documented behaviour: a NaN input gives a NaN loss/score, never an exception or a silent number."""
    hc, hr, ids, W, b, _, _ = rand_inputs(gen, 6, 10, 2, torch.float32, False)
    hc[2, 3] = float("nan")
    assert torch.isnan(ops.fused_head_bt_loss(hc, hr, ids, W, b, backend=backend))
    s = ops.multihead_score(hc, ids, W, b, backend=backend)
    assert torch.isnan(s[2]) and torch.isfinite(s[torch.arange(6) != 2]).all()
    rr = torch.randn(6, generator=gen)
    rr[0] = float("nan")
    assert torch.isnan(ops.bt_loss(torch.randn(6, generator=gen), rr, backend=backend))


def test_empty_scoring_batch_is_fine(gen):
    W, b = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    for backend in ("torch", "cpp"):
        out = ops.multihead_score(torch.empty(0, 8), torch.empty(0, dtype=torch.long), W, b, backend=backend)
        assert out.shape == (0,)


# --------------------------------------------------------------------------------------------------
# bad input -> clear errors naming the argument
# --------------------------------------------------------------------------------------------------
def _fused_args(gen):
    hc, hr, ids, W, b, w, mu = rand_inputs(gen, 5, 8, 3, torch.float32)
    return dict(h_chosen=hc, h_rejected=hr, head_ids=ids, W=W, b=b, weight=w, margin=mu)


FUSED_BAD = [
    ("h_chosen", lambda a: a["h_chosen"][:, :4], ValueError, "h_rejected"),
    ("h_rejected", lambda a: a["h_rejected"][:3], ValueError, "h_rejected"),
    ("h_chosen", lambda a: a["h_chosen"][0], ValueError, "h_chosen"),
    ("h_chosen", lambda a: a["h_chosen"].long(), TypeError, "h_chosen"),
    ("h_rejected", lambda a: a["h_rejected"].half(), TypeError, "h_rejected"),
    ("h_chosen", lambda a: a["h_chosen"].numpy(), TypeError, "h_chosen"),
    ("head_ids", lambda a: a["head_ids"].float(), TypeError, "head_ids"),
    ("head_ids", lambda a: a["head_ids"][:4], ValueError, "head_ids"),
    ("head_ids", lambda a: torch.full_like(a["head_ids"], 3), ValueError, "head_ids"),
    ("head_ids", lambda a: torch.full_like(a["head_ids"], -1), ValueError, "head_ids"),
    ("W", lambda a: a["W"][:, :5], ValueError, "W"),
    ("W", lambda a: a["W"][:0], ValueError, "W"),
    ("b", lambda a: a["b"][:2], ValueError, "b"),
    ("weight", lambda a: a["weight"][:2], ValueError, "weight"),
    ("weight", lambda a: -a["weight"], ValueError, "weight"),
    ("weight", lambda a: torch.zeros_like(a["weight"]), ValueError, "weight"),
    ("margin", lambda a: a["margin"][None], ValueError, "margin"),
]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("key,mutate,exc,match", FUSED_BAD, ids=[f"{k}-{i}" for i, (k, *_) in enumerate(FUSED_BAD)])
def test_fused_bad_inputs(gen, backend, key, mutate, exc, match):
    a = _fused_args(gen)
    a[key] = mutate(a)
    with pytest.raises(exc, match=match):
        ops.fused_head_bt_loss(**a, backend=backend)


def test_bad_scalars_and_empty_batches(gen):
    a = _fused_args(gen)
    with pytest.raises(ValueError, match="reduction"):
        ops.fused_head_bt_loss(**a, reduction="none")
    with pytest.raises(ValueError, match="center"):
        ops.fused_head_bt_loss(**a, center=-1.0)
    with pytest.raises(TypeError, match="center"):
        ops.fused_head_bt_loss(**a, center="0.1")
    with pytest.raises(ValueError, match="B = 0"):
        ops.fused_head_bt_loss(torch.empty(0, 8), torch.empty(0, 8), torch.empty(0, dtype=torch.long), a["W"], a["b"])
    with pytest.raises(ValueError, match="B = 0"):
        ops.bt_loss(torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="r_rejected"):
        ops.bt_loss(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="reduction"):
        ops.bt_loss(torch.randn(3), torch.randn(3), reduction="avg")


def test_multihead_bad_inputs(gen):
    x, W, b = torch.randn(4, 8, generator=gen), torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    ids = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="head_ids"):
        ops.multihead_score(x, torch.tensor([0, 1, 3, 1]), W, b)
    with pytest.raises(ValueError, match="head_ids"):
        ops.multihead_score(x, torch.tensor([0, -2, 1, 1]), W, b)
    with pytest.raises(ValueError, match="W"):
        ops.multihead_score(x, ids, W[:, :7], b)
    with pytest.raises(ValueError, match="hidden"):
        ops.multihead_score(x[None], ids, W, b)
    with pytest.raises(TypeError, match="head_ids"):
        ops.multihead_score(x, ids.tolist(), W, b)


def test_last_token_bad_inputs(gen):
    h = torch.randn(3, 5, 4, generator=gen)
    with pytest.raises(ValueError, match="lengths"):
        ops.last_token_hidden(h, torch.tensor([1, 6, 2]))
    with pytest.raises(ValueError, match="lengths"):
        ops.last_token_hidden(h, torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match="lengths"):
        ops.last_token_hidden(h, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="lengths"):
        ops.last_token_hidden(h, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="padding_side"):
        ops.last_token_hidden(h, torch.tensor([1, 2, 3]), "middle")
    with pytest.raises(ValueError, match="hidden"):
        ops.last_token_hidden(h[0], torch.tensor([1, 2, 3]))


# --------------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------------
def test_backend_selection_and_forcing(monkeypatch):
    cpu = torch.device("cpu")
    assert select(cpu, torch.float32, "torch") == "torch"
    assert select(cpu, torch.float32, "cpp") == "cpp"
    assert select(cpu, torch.float64) == "torch"  # auto: float64 goes to the exact reference
    with pytest.raises(TypeError, match="float64"):
        select(cpu, torch.float64, "cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        select(cpu, torch.float32, "cuda")
    with pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        select(torch.device("cuda"), torch.float32, "cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        select(cpu, torch.float32, "triton")
    monkeypatch.setenv("OPTIMAS_FAST_BACKEND", "torch")
    assert ops.backend_info()["selected"]["cpu"] == "torch"
    monkeypatch.setenv("OPTIMAS_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="OPTIMAS_FAST_BACKEND"):
        select(cpu, torch.float32)


def test_env_forced_backend_is_used(gen, monkeypatch):
    """OPTIMAS_FAST_BACKEND really routes the call: the torch reference builds an autograd graph of
    plain ops, the cpp backend a single FusedHeadBTFunction node."""
    hc, hr, ids, W, b, _, _ = rand_inputs(gen, 4, 6, 2, torch.float32, False)
    hc.requires_grad_(True)
    monkeypatch.setenv("OPTIMAS_FAST_BACKEND", "cpp")
    assert "FusedHeadBT" in type(ops.fused_head_bt_loss(hc, hr, ids, W, b).grad_fn).__name__
    monkeypatch.setenv("OPTIMAS_FAST_BACKEND", "torch")
    assert "FusedHeadBT" not in type(ops.fused_head_bt_loss(hc, hr, ids, W, b).grad_fn).__name__


def test_backend_info_reports_every_backend():
    info = ops.backend_info()
    for key in ("cpp/cpu", "triton/cpu", "torch/cpu", "triton/cuda"):
        assert key in info["available"] and key in info["why"]
    assert info["available"]["cpp/cpu"] is True
    assert info["selected"]["cpu"] == "cpp"


# --------------------------------------------------------------------------------------------------
# launch settings (kernels/_utils.py is the only place they come from) and the Function signatures
# --------------------------------------------------------------------------------------------------
def test_launch_settings_follow_the_problem_size():
    from optimas_fast.kernels import _utils as lu

    assert lu.row_launch(1) == (16, 4) and lu.row_launch(4096) == (4096, 16) and lu.row_launch(5000) == (4096, 16)
    assert lu.row_launch(1000) == (1024, 4) and lu.row_launch(2048) == (2048, 8)
    # dW: one head owning every row still gets many programs; many heads with few rows get one each
    assert lu.segment_launch(16384, 1, 4096) == (1024, 64, 4)
    assert lu.segment_launch(16384, 64, 4096).split == 8
    assert lu.segment_launch(5, 3, 33) == (64, 1, 4)
    assert lu.segment_launch(0, 3, 1).split == 1


def test_backward_returns_one_gradient_per_tensor_input(gen):
    """Non-tensor options travel as one object: backward's result is (None, one entry per tensor input);
    a wrong count is a clear error, not a silently shifted gradient."""
    hc, hr, ids, W, b, w, mu = rand_inputs(gen, 6, 10, 2, torch.float32)
    ins = leaves(hc, hr, W, b, w, mu)
    out = fn.FusedHeadBTFunction.apply(fn.FusedOptions(ids, 0.1, "mean", "cpp"), *ins)
    r = f64(hc, hr, W, b, w, mu)
    expected = ref.fused_head_bt_loss(r[0], r[1], ids, r[2], r[3], r[4], r[5], 0.1)
    for g, e in zip(grads(out, ins), grads(expected, r)):
        close(g, e, 2e-4, scale_hint=1.0)

    class Ctx:
        needs_input_grad = (False, True, False)

    assert fn._grads(Ctx, "g1", "g2") == (None, "g1", None)
    with pytest.raises(RuntimeError, match="3 gradients for 2 tensor inputs"):
        fn._grads(Ctx, "g1", "g2", "g3")
