"""reward/lean.py: the memory-lean training forms of RMSNorm and the SwiGLU MLP against transformers' own modules
(outputs, every gradient, fp32 and bf16 autocast, odd shapes), the bytes they keep for the backward, which
modules they take over, and a whole decoder's training step with and without them."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import test_reward
import torch
import torch.nn as nn
from test_reward import _decoder_of, make_model, separable_pairs

from optimas_fast.reward import RewardModel, RewardModelConfig, lean
from optimas_fast.reward.lean import apply_lean_modules
from optimas_fast.reward.trainer import PairBatch, pair_rows

tokenizer = test_reward.tokenizer  # the module-scoped fixture (MiniLM's tokenizer for the tiny backbones)


def _saved_bytes(fn) -> tuple[Any, int]:
    """(fn(), bytes of the distinct storages autograd keeps for the backward while fn() runs)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):  # activations; the weights are held anyway
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _llama_config(hidden: int, inter: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=97,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **kw,
    )


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_lean_norm_and_mlp_equal_the_modules(amp, seed):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    g = torch.Generator().manual_seed(seed)
    hidden, inter = 8 * int(torch.randint(3, 9, (1,), generator=g)), 8 * int(torch.randint(5, 13, (1,), generator=g))
    B, L = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(3, 20, (1,), generator=g))  # odd shapes
    torch.manual_seed(seed)
    norm, mlp = LlamaRMSNorm(hidden, eps=1e-6), LlamaMLP(_llama_config(hidden, inter))
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(hidden, generator=g))
    ref_norm, ref_mlp = copy.deepcopy(norm), copy.deepcopy(mlp)
    assert apply_lean_modules(nn.ModuleList([norm, mlp])) == {"rmsnorm": 1, "mlp": 1}
    x = (3 * torch.randn(B, L, hidden, generator=g)).requires_grad_()
    dy = torch.randn(B, L, hidden, generator=g)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
    results = {}
    for name, (n, m) in {"lean": (norm, mlp), "ref": (ref_norm, ref_mlp)}.items():
        xi = x.detach().clone().requires_grad_()
        with ctx:
            (y, nbytes) = _saved_bytes(lambda n=n, m=m, xi=xi: m(n(xi)) + xi)
        y.float().backward(dy)
        grads = {"x": xi.grad, "norm.weight": n.weight.grad}
        grads.update({f"mlp.{k}": p.grad for k, p in m.named_parameters()})
        results[name] = (y.detach(), grads, nbytes)
    (y_l, g_l, b_l), (y_r, g_r, b_r) = results["lean"], results["ref"]
    assert y_l.dtype == y_r.dtype
    torch.testing.assert_close(y_l, y_r, atol=0, rtol=0)  # the same ops in the same dtypes: the same outputs
    tol = {"none": (1e-5, 1e-4), "bf16": (2e-2, 2e-2)}[amp]  # bf16: the recomputed silu rounds once more
    for k in g_r:
        scale = g_r[k].abs().max().item()
        torch.testing.assert_close(g_l[k], g_r[k], atol=tol[0] * max(1.0, scale), rtol=tol[1], msg=k)
    assert b_l < 0.75 * b_r, (b_l, b_r)  # kept for the backward: the point of it


def test_lean_forms_run_the_modules_own_forward_without_autograd(seed):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    torch.manual_seed(seed)
    mods = nn.ModuleList([LlamaRMSNorm(16), LlamaMLP(_llama_config(16, 40))])
    apply_lean_modules(mods)
    calls = []
    real = lean._LeanRMSNorm.apply
    lean._LeanRMSNorm.apply = lambda *a: calls.append(1) or real(*a)
    try:
        x = torch.randn(2, 5, 16)
        with torch.no_grad():
            mods[1](mods[0](x))
        assert calls == []  # scoring: transformers' own forward
        mods[1](mods[0](x.requires_grad_()))
        assert calls == [1]  # training: the lean form
    finally:
        lean._LeanRMSNorm.apply = real


def test_apply_lean_modules_takes_only_what_it_recognises():
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    biased = LlamaMLP(_llama_config(16, 32, mlp_bias=True))
    gelu = LlamaMLP(_llama_config(16, 32, hidden_act="gelu"))

    class GemmaLikeRMSNorm(LlamaRMSNorm):  # another formula (1 + w): not in the list, left alone
        pass

    ok_norm, ok_mlp = LlamaRMSNorm(16), LlamaMLP(_llama_config(16, 32))
    counts = apply_lean_modules(nn.ModuleList([biased, gelu, GemmaLikeRMSNorm(16), ok_norm, ok_mlp, nn.LayerNorm(16)]))
    assert counts == {"rmsnorm": 1, "mlp": 1}
    assert "forward" in vars(ok_norm) and "forward" in vars(ok_mlp)
    assert "forward" not in vars(biased) and "forward" not in vars(gelu)
    assert apply_lean_modules(nn.ModuleList([ok_norm, ok_mlp])) == {"rmsnorm": 0, "mlp": 0}  # idempotent
    # the state dict and a deep copy are standard (the copy's forward is bound to the copy)
    assert set(ok_mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    twin = copy.deepcopy(ok_norm)
    assert twin.forward.__self__ is twin


@pytest.mark.parametrize("lean_mode", ["norm", "all"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_training_step_with_lean_modules_equals_without(lean_mode, arch, amp, tokenizer, seed):
    """A whole RewardModel training step (decoder, prefix sharing, random weights, margins and centering) with
    lean_activations on and off: the same loss and accuracy, every gradient equal to rounding, fewer bytes kept
    for the backward; the lean model really switched its modules."""
    rng = random.Random(seed)
    pairs = separable_pairs(rng, 4)
    weights = [rng.uniform(0.2, 2.0) for _ in pairs]
    margins = [rng.uniform(0.0, 0.5) for _ in pairs]
    out = {}
    for on in (True, False):
        cfg = dict(
            components=("a", "b"), amp=amp, lean_activations=lean_mode if on else "none", train_chunk_tokens=None
        )
        if arch == "llama":
            rm = make_model("decoder", tokenizer, seed, **cfg)
        else:
            rm = RewardModel(
                _decoder_of("qwen3", tokenizer.vocab_size, seed),
                {"a": "component a", "b": "component b"},
                tokenizer=tokenizer,
                config=RewardModelConfig(
                    seed=seed, score_amp="none", **{k: v for k, v in cfg.items() if k != "components"}
                ),
            )
        switched = sum("forward" in vars(m) for m in rm.encoder.net.backbone.modules())
        n_mlp = 2 if lean_mode == "all" else 0
        assert switched == (2 * 2 + 1 + n_mlp + (4 if arch == "qwen3" else 0) if on else 0)  # norms (+ q/k), MLPs
        batch = PairBatch(pair_rows(rm.encoder, pairs), weights, margins, 0.05)
        report, nbytes = _saved_bytes(lambda rm=rm, batch=batch: rm.trainer.step(batch, 1e-3))
        grads = {n: p.grad.clone() for n, p in rm.encoder.net.named_parameters() if p.grad is not None}
        out[on] = (report, grads, nbytes)
    (rep_l, g_l, b_l), (rep_r, g_r, b_r) = out[True], out[False]
    tol = 1e-5 if amp == "none" else 2e-2
    assert rep_l.loss == pytest.approx(rep_r.loss, rel=tol, abs=tol) and rep_l.accuracy == rep_r.accuracy
    assert g_l.keys() == g_r.keys() and len(g_r) > 0
    for k in g_r:
        scale = max(1.0, g_r[k].abs().max().item())
        torch.testing.assert_close(g_l[k], g_r[k], atol=tol * scale, rtol=tol if amp == "bf16" else 1e-4, msg=k)
    assert b_l < b_r, (b_l, b_r)


def test_lean_activations_default_and_choices(tokenizer, seed):
    """The default keeps transformers' modules (the lean forms are opt-in: RESULTS.md); "norm" switches the norms
    only, "all" the MLPs too; a bad value names the field."""
    assert RewardModelConfig().lean_activations == "none"
    for mode, want in (("none", set()), ("norm", {"LlamaRMSNorm"}), ("all", {"LlamaRMSNorm", "LlamaMLP"})):
        rm = make_model("decoder", tokenizer, seed, lean_activations=mode)
        assert {type(m).__name__ for m in rm.encoder.net.backbone.modules() if "forward" in vars(m)} == want
    for bad in (True, "mlp", None):
        with pytest.raises(ValueError, match="lean_activations"):
            RewardModelConfig(lean_activations=bad).validate()
