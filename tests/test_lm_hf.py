"""HFLocalLM on a tiny randomly initialised Llama with a character tokenizer (fast), plus factory/vLLM."""

import random
import string
import threading

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from optimas_fast.lm import (  # noqa: E402
    HFLocalLM,
    MissingDependencyError,
    UsageLedger,
    make_lm,
    vllm_engine,  # noqa: E402
)

CHARS = list(string.ascii_letters + string.digits + " .,?!:;'-\n")


def char_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(CHARS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        initializer_range=0.3,
    )  # peaky logits: greedy choices are not near-ties
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def lm(seed):
    return HFLocalLM(
        tiny_model(seed),
        tokenizer=char_tokenizer(),
        dtype="float32",
        cache=":memory:",
        ledger=UsageLedger(),
        name="tiny",
    )


def random_prompts(seed, k):
    rng = random.Random(seed)
    return ["".join(rng.choices(CHARS[:62], k=rng.randrange(1, 40))) for _ in range(k)]


def test_batched_greedy_matches_unpadded_argmax(lm, seed):
    """Left padding is right: every generated token is the argmax of the *unpadded* sequence's logits."""
    ps = random_prompts(seed, 7)  # odd batch, mixed lengths
    max_new = 9
    seen = []
    real = lm.model.generate

    def capture(*a, **kw):
        out = real(*a, **kw)
        seen.append((kw["input_ids"], out))
        return out

    lm.model.generate = capture
    out = lm.generate(ps, max_tokens=max_new)
    assert len(seen) == 1  # one batch for all seven
    inp, seqs = seen[0]
    width = inp.shape[1]
    rows = {tuple(t for t in inp[r].tolist() if t != lm.tokenizer.pad_token_id): r for r in range(inp.shape[0])}
    for p, row in zip(ps, out):
        c = row[0]
        ids = lm._encode(p)
        gen = seqs[rows[tuple(ids)], width:].tolist()
        end = gen.index(1) + 1 if 1 in gen else len(gen)  # up to and including <eos>
        gen = gen[:end]
        assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == len(gen)
        assert c.finish_reason == ("stop" if gen[-1] == 1 else "length")
        assert c.text == lm.tokenizer.decode(gen, skip_special_tokens=True)
        full = torch.tensor([ids + gen])
        with torch.inference_mode():
            logits = lm.model(full).logits[0]  # (T, V), no padding at all
        for j, tok in enumerate(gen):
            step = logits[len(ids) - 1 + j]
            assert step[tok] >= step.max() - 1e-4


def test_sampling_is_seeded_per_sample_not_per_batch(lm, seed):
    ps = random_prompts(seed, 5)
    alone = lm.generate([ps[2]], n=3, temperature=1.3, seed=seed, max_tokens=12)[0]
    lm.cache = None  # recompute, now inside a batch of other prompts
    together = lm.generate(ps, n=3, temperature=1.3, seed=seed, max_tokens=12)[2]
    assert [c.text for c in alone] == [c.text for c in together]
    assert len({c.text for c in together}) >= 2  # distinct samples
    other = lm.generate([ps[2]], n=3, temperature=1.3, seed=seed + 1, max_tokens=12)[0]
    assert [c.text for c in other] != [c.text for c in alone]


def test_stop_strings_and_finish_reasons(lm, seed):
    p = random_prompts(seed, 1)[0]
    full = lm.generate([p], max_tokens=20)[0][0].text
    if len(full) < 3:
        pytest.skip("the random model stopped at once; nothing to cut")  # pragma: no cover - rare
    stop = full[2]
    lm.cache = None
    cut = lm.generate([p], max_tokens=20, stop=[stop])[0][0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_threads_are_batched_together(seed):
    lm = HFLocalLM(
        tiny_model(seed),
        tokenizer=char_tokenizer(),
        dtype="float32",
        cache=None,
        batch_size=8,
        batch_wait_ms=200,
        ledger=UsageLedger(),
    )
    calls = []
    real = lm.model.generate

    def counting(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return real(*a, **kw)

    lm.model.generate = counting
    ps = random_prompts(seed, 6)
    ref = {}
    barrier = threading.Barrier(6)

    def work(p):
        barrier.wait()
        ref[p] = lm.generate([p], max_tokens=5)[0][0].text

    threads = [threading.Thread(target=work, args=(p,)) for p in ps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(calls) == 6 and len(calls) < 6  # single-prompt calls from 6 threads shared batches
    lm.batch_size = 1
    assert all(lm.generate([p], max_tokens=5)[0][0].text == ref[p] for p in ps)


def test_chat_prompts_without_template(lm):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert lm.render(msgs) == "system: be brief\nuser: hi\nassistant:"
    assert lm.render("plain") == "plain"
    assert len(lm.generate([msgs], max_tokens=3)[0]) == 1


def test_usage_and_cache(lm, seed):
    ps = random_prompts(seed, 4)
    first = lm.generate(ps, max_tokens=4)
    again = lm.generate(ps, max_tokens=4)
    # the cache never stores an empty text (a random tiny model may emit EOS first): those go to the model again
    empty = [not r[0].text for r in first]
    assert [r[0].cached for r in again] == [not e for e in empty], [(r[0].text, r[0].cached) for r in again]
    assert [r[0].text for r in again] == [r[0].text for r in first]
    n_empty = sum(empty)
    assert lm.ledger.total.calls == 4 + n_empty and lm.ledger.total.cache_hits == 4 - n_empty
    assert lm.ledger.total.cost_usd == 0


def test_saved_directory_round_trip(tmp_path, seed):
    model, tok = tiny_model(seed), char_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    a = HFLocalLM(model, tokenizer=tok, dtype="float32", cache=None, ledger=UsageLedger())
    b = make_lm(f"hf:{tmp_path}", dtype="float32", cache=None, ledger=UsageLedger())
    assert isinstance(b, HFLocalLM) and b.name == f"hf:{tmp_path.name}"
    ps = random_prompts(seed, 3)
    assert [r[0].text for r in a.generate(ps, max_tokens=6)] == [r[0].text for r in b.generate(ps, max_tokens=6)]


def test_bad_arguments(seed):
    model, tok = tiny_model(seed), char_tokenizer()
    with pytest.raises(TypeError, match="tokenizer"):
        HFLocalLM(model)
    with pytest.raises(TypeError, match="model_or_path"):
        HFLocalLM(42, tokenizer=tok)
    with pytest.raises(ValueError, match="batch_size"):
        HFLocalLM(model, tokenizer=tok, batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        HFLocalLM(model, tokenizer=tok, dtype="float8")
    with pytest.raises(ValueError, match="on_error"):
        HFLocalLM(model, tokenizer=tok, on_error="skip")
    with pytest.raises(FileNotFoundError, match="model_or_path"):
        HFLocalLM("/nonexistent/dir", tokenizer=tok, local_files_only=True)
    with pytest.raises(ValueError, match="backend 'hf' needs 'path'"):
        make_lm({"backend": "hf"})


def test_vllm_missing_is_a_clear_error(monkeypatch):
    def fail(name):
        raise ImportError("No module named 'vllm'")

    monkeypatch.setattr(vllm_engine.importlib, "import_module", fail)
    with pytest.raises(MissingDependencyError, match=r"pip install optimas-fast\[vllm\]"):
        make_lm("vllm:some/model")
    with pytest.raises(ImportError):  # also catchable as an ImportError
        vllm_engine.VLLMEngine("some/model")
