"""LoRA on a causal LM as a component's Weights: best-of-N + DPO against the LRF raises the LRF score of the
component's greedy outputs; only the adapter changes; adapters round-trip through the run state; bad inputs
get clear errors. A tiny random Llama with a 20-word vocabulary keeps this fast."""

from __future__ import annotations

import random

import pytest
import torch

peft = pytest.importorskip("peft", reason="LoRA needs the `lora` extra (installed with `test`)")

from optimas_fast.optimizers import (  # noqa: E402
    LoRAAdapter,
    LoRAComponent,
    LoRAPolicy,
    OptimizerBudget,
    WeightsConfig,
    WeightsOptimizer,
)
from optimas_fast.system import Component, System, Weights  # noqa: E402

WORDS = "a b c d e f g h i j k l m n o p".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_policy(seed: int, r: int = 4) -> LoRAPolicy:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LoRAPolicy(LlamaForCausalLM(cfg), tok, r=r, alpha=2 * r, init_seed=seed)


class FakeRM:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def score(self, rows):
        rows = list(rows)
        self.calls.append(len(rows))
        return torch.tensor([float(self.fn(*r)) for r in rows])


def share_of_a(component, inputs_text, outputs_text):
    words = outputs_text.split(":", 1)[-1].split()
    return sum(w == "a" for w in words) / max(1, len(words))


def make_component(seed):
    policy = tiny_policy(seed)
    comp = LoRAComponent(
        "writer",
        policy,
        inputs=["q"],
        output="y",
        prompt_fn=lambda x: x["q"],
        description="writes words",
        max_new_tokens=6,
    )
    rng = random.Random(seed)
    inputs = [{"q": " ".join(rng.choice(WORDS[1:]) for _ in range(rng.randint(2, 5)))} for _ in range(6)]
    return policy, comp, inputs


def test_dpo_raises_the_lrf_score_and_changes_only_the_adapter(seed):
    policy, comp, inputs = make_component(seed)
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if n not in policy.names}
    incumbent = comp.variable
    incumbent_tensors = {n: incumbent.module.get(n).clone() for n in policy.names}
    rm = FakeRM(share_of_a)
    # 60 DPO steps: with 25, about 1 seed in 17 (seed 110; also one clean-clone CI run) fitted its pairs without
    # moving the greedy outputs, so the LRF score could not rise; 60 passed 17 of 17 seeds including that one
    cfg = WeightsConfig(max_inputs=6, lora_samples=8, lora_steps=60, lora_lr=0.05, lora_beta=0.5)
    p = WeightsOptimizer(cfg).optimize(comp, inputs, rm, OptimizerBudget(max_inputs=6), rng=random.Random(seed))
    assert p.info["method"] == "best-of-N + DPO" and p.info["pairs"] > 0
    assert p.info["dpo_loss"][1] < p.info["dpo_loss"][0]  # DPO fitted its pairs
    assert p.changed and p.score > p.incumbent_score, (p.score, p.incumbent_score)
    assert isinstance(p.variable.module, LoRAAdapter)
    # the base model never moved; the incumbent adapter was not trained in place; the component kept it
    for n, t in base.items():
        assert torch.equal(dict(policy.model.named_parameters())[n], t), n
    assert all(torch.equal(incumbent.module.get(n), t) for n, t in incumbent_tensors.items())
    assert not all(torch.equal(p.variable.module.get(n), t) for n, t in incumbent_tensors.items())
    assert comp.variable is incumbent
    # the proposal's greedy outputs really are better under the LRF, re-run independently
    before = comp.forward_batch(inputs, incumbent)
    after = comp.forward_batch(inputs, p.variable)
    mean = lambda outs: sum(share_of_a(None, None, o["y"]) for o in outs) / len(outs)  # noqa: E731
    assert mean(after) > mean(before)


def test_adapter_round_trips_through_the_system_state(seed):
    def system_of(comp):
        return System([comp], lambda ex, pred: 0.0, ["y"], inputs=["q"])

    policy, comp, inputs = make_component(seed)
    initial, adapter = policy.adapter(), policy.adapter()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in policy.names:
            adapter.get(n).add_(torch.randn(adapter.get(n).shape, generator=gen))
    system = system_of(comp)
    system.set_variable("writer", Weights(adapter))
    out = comp.forward_batch(inputs, comp.variable)
    assert out != comp.forward_batch(inputs, Weights(initial))  # the adapter matters
    state = system.state_dict()
    assert len(state["variables"]["writer"]["tensors"]) < 50_000  # the adapter only, not the model
    _, comp2, _ = make_component(seed)
    system2 = system_of(comp2)
    system2.load_state_dict(state)
    assert all(torch.equal(comp2.variable.module.get(n), adapter.get(n)) for n in policy.names)
    assert comp2.forward_batch(inputs, comp2.variable) == out


def test_seeded_sampling_is_reproducible(seed):
    policy, _, inputs = make_component(seed)
    ad = policy.adapter()
    prompts = [x["q"] for x in inputs]
    a = policy.generate(prompts, ad, max_new_tokens=5, temperature=1.0, n=3, seed=seed)
    assert len(a) == len(prompts) and all(len(r) == 3 for r in a)
    c = policy.generate(prompts, ad, max_new_tokens=5, temperature=1.0, n=3, seed=seed + 1)
    assert a == policy.generate(prompts, ad, max_new_tokens=5, temperature=1.0, n=3, seed=seed)
    assert a != c
    assert len({t for row in a for t in row}) > 1  # sampling, not greedy


def test_bad_lora_inputs_have_clear_errors(seed):
    policy, comp, inputs = make_component(seed)
    other = tiny_policy(seed, r=2)
    with pytest.raises(ValueError, match="shape"):
        policy.load(other.adapter())
    plain = Component(
        "plain", inputs=["q"], outputs=["y"], variable=Weights(policy.adapter()), fn=lambda q, variable: {"y": q}
    )
    with pytest.raises(TypeError, match="not a LoRAComponent"):
        WeightsOptimizer().optimize(plain, inputs, FakeRM(share_of_a), rng=random.Random(seed))
    with pytest.raises(TypeError, match="LoRAAdapter"):
        comp.forward_batch(inputs, Weights(torch.nn.Linear(2, 2)))
    for bad in ({"lora_samples": 1}, {"lora_lr": 0}, {"lora_steps": 0}, {"lora_beta": -1.0}):
        with pytest.raises(ValueError, match="weights.lora_"):
            WeightsConfig(**bad).validate()
    with pytest.raises(ValueError, match="r must be"):
        tiny_policy(seed, r=0)
