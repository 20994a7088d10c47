"""The native WordPiece (csrc/wordpiece.cpp) against Hugging Face's fast tokenizer: equal ids on every text it
takes, None on every text it must leave to Hugging Face, and only for tokenizers whose pipeline is BERT's."""

from __future__ import annotations

import json
import os
import random
import string

import pytest
from test_reward import tokenizer  # noqa: F401  (MiniLM's tokenizer, module-scoped)

from optimas_fast.reward.template import TemplateConfig, TokenCache, batch_token_ids, plain_backend
from optimas_fast.reward.wordpiece import NativeWordPiece


@pytest.fixture(scope="module")
def wp(tokenizer):
    w = NativeWordPiece.from_tokenizer(tokenizer)
    assert w is not None, "MiniLM's tokenizer is BERT's pipeline: the native path must take it"
    return w


def hf_ids(tokenizer, texts):
    return batch_token_ids(tokenizer, texts, plain_backend(tokenizer))


def random_ascii_text(rng: random.Random) -> str:
    """Words, sub-word-ish junk, every printable ASCII character, runs of whitespace, CamelCase, digits, and
    now and then a word longer than max_input_chars_per_word (100)."""
    parts = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        if r < 0.4:
            w = rng.choice(
                [
                    "the",
                    "question",
                    "answer",
                    "because",
                    "Therefore",
                    "unaffable",
                    "tokenization",
                    "PubMed",
                    "HbA1c",
                    "COVID-19",
                    "e.g.",
                    "don't",
                    "##s",
                    "x",
                ]
            )
        elif r < 0.7:
            w = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(1, 14)))
        elif r < 0.9:
            w = "".join(rng.choice(string.punctuation + string.ascii_lowercase) for _ in range(rng.randint(1, 6)))
        elif r < 0.97:
            w = rng.choice([" ", "  ", "\t", "\n", "\r\n", " \t "])
        else:
            w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(99, 103)))
        parts.append(w)
    return rng.choice([" ", "", "\n"]).join(parts) if rng.random() < 0.5 else " ".join(parts)


def test_equal_ids_on_random_ascii_texts(tokenizer, wp, seed):
    rng = random.Random(seed)
    texts = [random_ascii_text(rng) for _ in range(3000)] + ["", " ", "\t\n", "a" * 100, "a" * 101, "!!!"]
    got = wp.encode_many(texts)
    want = hf_ids(tokenizer, texts)
    assert all(g is not None for g in got), "printable-ASCII texts without added tokens are all in scope"
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, (k, texts[k])


def test_equal_ids_on_the_example_datasets(tokenizer, wp):
    """Real text: PubMedQA abstracts and questions, HotpotQA passages (many with non-ASCII: those come back
    None), Amazon sessions. Every text taken gives Hugging Face's ids."""
    from optimas_fast.examples.data import load_amazon, load_hotpotqa, load_pubmedqa

    texts = []
    for rows in (load_pubmedqa()[:150], load_hotpotqa()[:60], load_amazon()[:100]):
        for row in rows:
            texts += [v for v in row.values() if isinstance(v, str)]
            texts += [x for v in row.values() if isinstance(v, list) for x in v if isinstance(x, str)]
    assert len(texts) > 300
    got = wp.encode_many(texts)
    want = hf_ids(tokenizer, texts)
    taken = [k for k, g in enumerate(got) if g is not None]
    assert len(taken) > 0.5 * len(texts)
    for k in taken:
        assert got[k] == want[k], texts[k][:200]


@pytest.mark.parametrize(
    "text",
    [
        "caf\u00e9 au lait",
        "\u4e2d\u6587 text",
        "tab\x0bvertical",
        "nul\x00byte",
        "bell\x07",
        "del\x7f",
        "a [SEP] b",
        "[CLS]",
        "lower [sep] too",
        "x[MASK]y",
        "emoji \U0001f600",
    ],
)
def test_out_of_scope_texts_come_back_none_and_the_cache_still_gives_hf_ids(tokenizer, wp, text):
    assert wp.encode_many([text, "plain text"]) == [
        None,
        tuple(tokenizer("plain text", add_special_tokens=False)["input_ids"]),
    ]
    cache = TokenCache(tokenizer, TemplateConfig(), is_encoder=True)
    assert cache.native is not None
    want = hf_ids(tokenizer, [text, "plain text", "more, plain: text!"])
    assert cache.ids_many([text, "plain text", "more, plain: text!"]) == want


def test_token_cache_uses_it_and_gives_the_same_ids_as_hugging_face(tokenizer, seed):
    rng = random.Random(seed)
    texts = list(dict.fromkeys(random_ascii_text(rng) for _ in range(500))) + ["caf\u00e9", "a [SEP] b"]
    fast = TokenCache(tokenizer, TemplateConfig(), is_encoder=True)
    assert fast.native is not None
    slow = TokenCache(tokenizer, TemplateConfig(), is_encoder=True)
    slow.native = None
    assert fast.ids_many(texts) == slow.ids_many(texts) == hf_ids(tokenizer, texts)
    assert fast.ids_many(texts[:10]) == slow.ids_many(texts[:10])  # cached the second time
    assert fast.hits == 10


def test_only_berts_pipeline_gets_it(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # a different normaliser (a Sequence around BERT's) is another pipeline: not taken
    other = dict(spec, normalizer={"type": "Sequence", "normalizers": [spec["normalizer"]]})
    fast_other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(other)))
    assert NativeWordPiece.from_tokenizer(fast_other) is None
    # a byte-level BPE (as decoders use)
    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert NativeWordPiece.from_tokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe)) is None
    # a tokenizer built from a bare vocab.txt (transformers 5 builds BERT's pipeline around it) is taken, same ids
    vocab = os.path.join(tokenizer.name_or_path, "vocab.txt")
    assert os.path.isfile(vocab), "the MiniLM package ships its vocab.txt"
    from_vocab = BertTokenizer(vocab)
    w = NativeWordPiece.from_tokenizer(from_vocab)
    if getattr(from_vocab, "is_fast", False):
        texts = ["Hello, World! It's 3.14 o'clock.", "tokenization of unaffable words"]
        assert w.encode_many(texts) == hf_ids(from_vocab, texts)
    else:  # a slow (Python) tokenizer (transformers < 5) has no tokenizer.json to check
        assert w is None
    # not a tokenizer at all
    assert NativeWordPiece.from_tokenizer(object()) is None
    # a cased BERT pipeline (lowercase=False) is taken, and keeps case
    cased = dict(spec, normalizer=dict(spec["normalizer"], lowercase=False))
    fast_cased = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(cased)))
    w = NativeWordPiece.from_tokenizer(fast_cased)
    assert w is not None
    texts = ["The Question, answered.", "MiXeD cAsE words", "[sep] lower-case added token"]
    got = w.encode_many(texts)
    want = [tuple(e.ids) for e in Tokenizer.from_str(json.dumps(cased)).encode_batch(texts, add_special_tokens=False)]
    assert got[:2] == want[:2]
    assert got[2] is None  # lower-cased "[sep]" is not the added token here, but leaving it to HF is safe


def test_bad_input_is_a_clear_error(wp):
    with pytest.raises(TypeError, match=r"texts\[1\] is int, not str"):
        wp.encode_many(["ok", 3])
    assert wp.encode_many(("a", "b")) == wp.encode_many(["a", "b"])  # any sequence
