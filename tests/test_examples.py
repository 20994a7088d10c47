"""Example systems: data loading and splits, bad rows, reply parsing, BM25, and end-to-end runs with a
scripted LM (fast); one slow test runs the real embedded LM + MiniLM on one example."""

import json
import random
import re
import string

import pytest
import torch

from optimas_fast.examples import (
    PubMedQAConfig,
    build_amazon_system,
    build_hotpotqa_system,
    build_pubmedqa_system,
    load_amazon,
    load_example,
    load_hotpotqa,
    load_pubmedqa,
    split_examples,
)
from optimas_fast.examples.bm25 import BM25
from optimas_fast.examples.data import default_data_dir
from optimas_fast.examples.embeddings import HashEmbedder
from optimas_fast.examples.parsing import (
    answer_f1,
    extract_short_answer,
    parse_json_object,
    parse_label,
    parse_option_index,
)
from optimas_fast.lm import make_lm
from optimas_fast.lm.base import LM, Completion
from optimas_fast.system.testing import ScriptedLM


def random_text(rng, n):
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \n\t éü✓"
    return "".join(rng.choice(alphabet) for _ in range(n))


# --------------------------------------------------------------------------------------------------
# data
def test_loaders_and_deterministic_split(seed):
    pub, hot, ama = load_pubmedqa(), load_hotpotqa(), load_amazon()
    assert (len(pub), len(hot), len(ama)) == (500, 100, 120)
    assert {e["answer"] for e in pub} == {"yes", "no", "maybe"}
    assert all(len(e["paragraphs"]) == 10 for e in hot)
    assert all(len(e["choices"]) == 4 and 0 <= e["answer"] < 4 and e["session"] for e in ama)
    s1, s2 = split_examples(pub, seed % 1000), split_examples(pub, seed % 1000)
    assert [e["id"] for e in s1.test] == [e["id"] for e in s2.test]
    assert (len(s1.train), len(s1.val), len(s1.test)) == (300, 100, 100)
    ids = [e["id"] for part in (s1.train, s1.val, s1.test) for e in part]
    assert sorted(ids) == sorted(e["id"] for e in pub)  # a partition: nothing lost or repeated
    other = split_examples(pub, seed % 1000 + 1)
    assert [e["id"] for e in other.test] != [e["id"] for e in s1.test]
    odd = split_examples(list(range(7)), seed)
    assert len(odd.train) + len(odd.val) + len(odd.test) == 7
    with pytest.raises(ValueError, match="fractions"):
        split_examples(pub, 0, (0.5, 0.5, 0.5))
    with pytest.raises(TypeError, match="seed"):
        split_examples(pub, "0")


def test_data_dir_is_configurable(tmp_path, monkeypatch):
    row = {"index": "i0", "question": "Q?", "context": ["a", "b"], "groundtruth": "maybe"}
    (tmp_path / "pubmedqa_train.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("OPTIMAS_FAST_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert load_pubmedqa()[0] == {"id": "i0", "question": "Q?", "context": "a b", "answer": "maybe"}
    with pytest.raises(FileNotFoundError, match="OPTIMAS_FAST_DATA"):
        load_hotpotqa()
    assert default_data_dir(tmp_path / "x") == tmp_path / "x"


def test_malformed_pubmedqa_rows(tmp_path):
    good = {"index": "g", "question": "Q?", "context": ["c"], "groundtruth": "yes"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "groundtruth": "perhaps"}),
        json.dumps({k: v for k, v in good.items() if k != "question"}),
        json.dumps([1, 2]),
        json.dumps({**good, "context": [1, 2]}),
        json.dumps({**good, "index": "g2"}),
    ]
    (tmp_path / "pubmedqa_train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"pubmedqa_train.jsonl:2: not valid JSON"):
        load_pubmedqa(tmp_path)
    kept = load_pubmedqa(tmp_path, strict=False)
    assert [e["id"] for e in kept] == ["g", "g2"]
    for i, match in [
        (2, "'groundtruth' must be one of"),
        (3, "missing field 'question'"),
        (4, "expected a JSON object"),
        (5, "'context' must be a list of str"),
    ]:
        (tmp_path / "pubmedqa_train.jsonl").write_text(lines[0] + "\n" + lines[i] + "\n")
        with pytest.raises(ValueError, match=rf"pubmedqa_train.jsonl:2: .*{match}"):
            load_pubmedqa(tmp_path)


def test_malformed_hotpotqa_and_amazon_rows(tmp_path):
    bad_hot = {"id": "h", "question": "Q", "answer": "A", "context": {"title": ["t1", "t2"], "sentences": [["s"]]}}
    (tmp_path / "hotpotqa_distractor_sample.jsonl").write_text(json.dumps(bad_hot) + "\n")
    with pytest.raises(ValueError, match="equal length"):
        load_hotpotqa(tmp_path)
    header = "question,choices,answer\n"
    rows = {
        "code": "\"Product Sequence:\nA\n\",\"__import__('os').system('true')\",0\n",
        "range": "\"Product Sequence:\nA\n\",\"['x', 'y']\",5\n",
        "index": "\"Product Sequence:\nA\n\",\"['x', 'y']\",two\n",
        "session": "\"Product Sequence:\n\",\"['x', 'y']\",1\n",
    }
    for kind, match in [
        ("code", "not a Python list literal"),
        ("range", "out of range"),
        ("index", "integer index"),
        ("session", "no product session"),
    ]:
        (tmp_path / "amazon_next_item.csv").write_text(header + rows[kind])
        with pytest.raises(ValueError, match=rf"amazon_next_item.csv:1: .*{match}"):
            load_amazon(tmp_path)
    (tmp_path / "amazon_next_item.csv").write_text("question,answer\nq,1\n")
    with pytest.raises(ValueError, match=r"lacks columns \['choices'\]"):
        load_amazon(tmp_path)
    good = "\"Product Sequence:\nA\nB\n\",\"['x', 'y', 'z']\",2\n"
    (tmp_path / "amazon_next_item.csv").write_text(header + rows["code"] + good)
    assert load_amazon(tmp_path, strict=False)[0]["session"] == ["A", "B"]


# --------------------------------------------------------------------------------------------------
# parsing and retrieval
@pytest.mark.parametrize(
    "text, want",
    [
        ("Yes.", "yes"),
        ("Based on the data, the answer is: No, since", "no"),
        ("I cannot tell", None),
        ("", None),
        ("MAYBE", "maybe"),
        ("noisy yesterday", None),
    ],
)
def test_parse_label(text, want):
    assert parse_label(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("B", 1),
        ("(C) foo", 2),
        ("Answer: 3", 2),
        ("The user will buy option 2.", 1),
        ("A user like this", None),
        ("I think 7", None),
        ("**D**", 3),
        ("", None),
    ],
)
def test_parse_option_index(text, want):
    assert parse_option_index(text, 4) == want


def test_parsers_never_raise_on_garbage(seed):
    rng = random.Random(seed)
    for _ in range(200):
        text = random_text(rng, rng.randint(0, 60))
        assert parse_label(text) in (None, "yes", "no", "maybe")
        idx = parse_option_index(text, 4, ["alpha", "beta", "gamma", "delta"])
        assert idx is None or 0 <= idx < 4
        assert isinstance(extract_short_answer(text), str)
        assert parse_json_object(text) is None or isinstance(parse_json_object(text), dict)
        assert 0.0 <= answer_f1(text, "some gold answer") <= 1.0
    assert parse_label(None) is None and extract_short_answer(None) == ""
    assert parse_option_index("I pick gamma for sure", 4, ["alpha", "beta", "gamma", "delta"]) == 2
    assert extract_short_answer("Answer: The U.S. Navy. It was founded") == "The U.S. Navy"
    assert extract_short_answer("World War II. It ended") == "World War II"
    assert extract_short_answer("1941. Then") == "1941" and extract_short_answer('"Now" (1995)') == '"Now" (1995)'
    assert extract_short_answer("'Alien'") == "Alien" and extract_short_answer("It was 3.5 km.") == "It was 3.5 km"
    assert parse_json_object('sure ```{"a": {"b": [1]}}``` ok') == {"a": {"b": [1]}}
    assert answer_f1("the Eiffel Tower!", "Eiffel tower") == 1.0 and answer_f1("yes", "no") == 0.0


def test_bm25_ranks_matching_documents_first(seed):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(40)]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 30))) for _ in range(rng.randint(3, 9))]
    target = rng.randrange(len(docs))
    docs[target] += " zebra zebra quokka"
    scores = BM25(docs).scores("zebra quokka")
    assert max(range(len(docs)), key=scores.__getitem__) == target
    assert all(s == 0.0 for i, s in enumerate(scores) if i != target)
    assert BM25(docs).scores("") == [0.0] * len(docs)
    with pytest.raises(ValueError, match="documents"):
        BM25([])


def test_hash_embedder(seed):
    rng = random.Random(seed)
    emb = HashEmbedder(dim=rng.choice([33, 64, 129]))
    texts = [random_text(rng, rng.randint(1, 40)) for _ in range(5)] + ["same words here"] * 2
    out = emb.embed(texts)
    assert out.shape == (7, emb.dim) and torch.equal(out[-1], out[-2])
    norms = out.norm(dim=1)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
    assert torch.equal(emb.embed(texts[:1])[0], out[0])  # cached and deterministic
    with pytest.raises(TypeError, match="list of str"):
        emb.embed("one string")


# --------------------------------------------------------------------------------------------------
# end to end with a scripted LM
def gold_lookup(examples, key):
    """A scripted LM that answers correctly: finds which example's question is in the prompt."""
    return {e[key]: e for e in examples}


def test_pubmedqa_end_to_end_scripted(seed):
    rng = random.Random(seed)
    examples = rng.sample(load_pubmedqa(), 3)
    by_q = gold_lookup(examples, "question")

    def reply(prompt, i):
        ex = next(e for q, e in by_q.items() if q in prompt)
        if "Answer (yes, no or maybe)" in prompt:
            return f"Answer: {ex['answer']}. Because the data say so."
        return "Findings: " + random_text(rng, 20)

    system = build_pubmedqa_system(ScriptedLM(reply))
    result = system.evaluate(examples, workers=2)
    assert result.scores == [1.0, 1.0, 1.0] and result.n_failed == 0
    t = result.traces[0]
    assert [s.component for s in t.steps] == ["context_analyst", "answer_model", "solver"]
    assert all(s.usage.calls == 1 for s in t.steps)  # one LM call each, attributed to its component
    # the answer-model Choice picks among several LMs by name
    lms = {"small": ScriptedLM(lambda p, i: "no", name="small"), "big": ScriptedLM(lambda p, i: "maybe", name="big")}
    system = build_pubmedqa_system(lms)
    assert system.variables()["answer_model"].space["model"] == ["small", "big"]
    trace = system.run({**examples[0], "answer": "maybe"}, overrides={"answer_model": {"model": "big"}})
    assert trace["answer_model"].outputs == {"draft_answer": "maybe"}


def test_pubmedqa_solver_policy_fallback_and_length(seed):
    rng = random.Random(seed)
    ex = rng.choice(load_pubmedqa())
    seen_max_tokens = []

    class Recording(ScriptedLM):
        def generate(self, prompts, **kw):
            seen_max_tokens.append(kw.get("max_tokens"))
            return super().generate(prompts, **kw)

    # no reply ever names a label: the answer comes from the policy's fallback alone
    system = build_pubmedqa_system(Recording(lambda p, i: "The study " + random_text(rng, 8)))
    policy = system.variables()["solver.policy"]
    assert policy.value == {"max_tokens": 8, "fallback": ""}  # the start: shortest reply, no fallback
    assert set(policy.space["fallback"]) == {"", "yes", "no", "maybe"}
    assert system.run(ex)["solver"].outputs == {"answer": ""}
    for label in ("yes", "no", "maybe"):
        trace = system.run(ex, overrides={"solver.policy": {"max_tokens": 32, "fallback": label}})
        assert trace["solver"].outputs == {"answer": label}
        assert trace.score == float(label == ex["answer"])
    assert seen_max_tokens[-1] == 32 and 8 in seen_max_tokens
    with pytest.raises(ValueError, match="solver_max_tokens"):
        build_pubmedqa_system(ScriptedLM(lambda p, i: "x"), PubMedQAConfig(solver_max_tokens=(0,)))


def test_hotpotqa_end_to_end_scripted(seed):
    rng = random.Random(seed)
    examples = rng.sample(load_hotpotqa(), 2)
    by_q = gold_lookup(examples, "question")

    def reply(prompt, i):
        ex = next(e for q, e in by_q.items() if q in prompt)
        if "Paragraphs:" in prompt:
            return f"{ex['answer']}. Some rambling that follows the answer."
        return ex["supporting_titles"][0]

    system = build_hotpotqa_system(ScriptedLM(reply), embedder=HashEmbedder(64))
    for weight in (0.0, 0.5, 1.0):
        result = system.evaluate(examples, overrides={"retriever": {"embedding_weight": weight, "top_k": 5}})
        assert result.n_failed == 0
        assert all(s == pytest.approx(1.0) for s in result.scores), result.traces[0].prediction
        assert all(len(t["retriever"].outputs["retrieved"]) == 5 for t in result.traces)
    # a paragraph's own text as the query ranks it first, whatever the weight (one component, stored inputs)
    paragraphs = examples[0]["paragraphs"]
    target = rng.randrange(len(paragraphs))
    for weight in (0.0, 0.5, 1.0):
        out = system.run_component(
            "retriever",
            {"search_query": paragraphs[target], "paragraphs": paragraphs},
            variable={"embedding_weight": weight, "top_k": 1},
        )
        assert out["retrieved"][0][:50] == paragraphs[target][:50]


def test_amazon_end_to_end_scripted(seed, gen):
    rng = random.Random(seed)
    examples = rng.sample(load_amazon(), 3)

    def reply(prompt, i):
        if "Options:" in prompt:
            # the example whose four options all appear in the prompt
            ex = next(e for e in examples if all(c[:40] in prompt for c in e["choices"]))
            return f"Answer: {ex['answer'] + 1}"
        return "They want " + random_text(rng, 10)

    lm = ScriptedLM(reply)
    system = build_amazon_system(lm, embedder=HashEmbedder(48))
    result = system.evaluate(examples, workers=3)
    assert result.scores == [1.0] * 3
    scores = result.traces[0]["candidate_scorer"].outputs["scores"]
    assert len(scores) == 4 and all(isinstance(s, float) for s in scores)
    # trusting the scorer makes no LM call in the decider
    n_before = len(lm.calls)
    t = system.run(examples[0], overrides={"final_decider.policy": {"trust": "scorer"}})
    assert len(lm.calls) == n_before + 1 and t["final_decider"].usage.calls == 0
    assert t.prediction["answer"] == max(range(4), key=lambda i: (t["candidate_scorer"].outputs["scores"][i], -i))
    # every pooling choice runs; the scorer weights round-trip through the JSON state
    for cand in system.variables()["candidate_scorer.pooling"].candidates():
        assert system.run(examples[1], overrides={"candidate_scorer.pooling": cand}).ok
    with torch.no_grad():
        for p in system.components["candidate_scorer"].variable["weights"].module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    state = json.loads(json.dumps(system.state_dict()))
    fresh = build_amazon_system(lm, embedder=HashEmbedder(48))
    fresh.load_state_dict(state)
    a = system.run(examples[2])["candidate_scorer"].outputs["scores"]
    b = fresh.run(examples[2])["candidate_scorer"].outputs["scores"]
    assert a == b


class RaisingLM(LM):
    name = "raising"

    def generate(self, prompts, **kwargs):
        raise ConnectionError("server went away")


class ErrorCompletionLM(LM):
    name = "error-completions"

    def generate(self, prompts, **kwargs):
        return [[Completion("", finish_reason="error", error="HTTP 500")] for _ in prompts]


@pytest.mark.parametrize("name", ["pubmedqa", "hotpotqa", "amazon"])
def test_bad_lm_replies_never_crash_an_evaluation(name, seed):
    rng = random.Random(seed)
    kw = {} if name == "pubmedqa" else {"embedder": HashEmbedder(32)}
    # empty and non-JSON/garbage replies: runs finish, the answers fall back, nothing is raised
    garbage = ScriptedLM(lambda p, i: rng.choice(["", "   ", "{not json", random_text(rng, 30), "\n\n"]))
    system, split = load_example(name, garbage, **kw)
    examples = split.test[:3]
    result = system.evaluate(examples, workers=2)
    assert result.n_failed == 0 and len(result.scores) == 3
    assert all(0.0 <= s <= 1.0 for s in result.scores)
    # an LM that raises, or returns error completions: recorded per-example failures, scored 0
    for bad in (RaisingLM(), ErrorCompletionLM()):
        system, _ = load_example(name, bad, **kw)
        result = system.evaluate(examples, workers=2)
        assert result.n_failed == 3 and result.scores == [0.0] * 3
        assert all(("server went away" in e) or ("HTTP 500" in e) for e in result.errors)
    # a malformed example (missing field) is a recorded failure too, the other example runs
    system, _ = load_example(name, garbage, **kw)
    broken = {k: v for k, v in examples[0].items() if k not in ("context", "paragraphs", "session")}
    result = system.evaluate([broken, examples[1]])
    assert "missing input fields" in result.errors[0] and result.errors[1] is None


def test_example_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown example"):
        load_example("mnist", ScriptedLM(["x"]))
    with pytest.raises(TypeError, match="lms"):
        build_pubmedqa_system(lms=42)


def test_example_embedder_argument_is_checked():
    with pytest.raises(ValueError, match="no embedder"):
        load_example("pubmedqa", ScriptedLM(["x"]), embedder=HashEmbedder(8), data_dir=default_data_dir())


# --------------------------------------------------------------------------------------------------
# the real models (slow): MiniLM always; the embedded LM when optimas_fast.lm provides it
@pytest.mark.slow
def test_real_minilm_retrieval_and_embedded_lm():
    from optimas_fast.examples.embeddings import get_minilm

    minilm = get_minilm()
    e = minilm.embed(["a cat sat on the mat", "a kitten rested on a rug", "quarterly tax filing deadline"])
    assert e.shape == (3, 384)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
    lm = make_lm("embedded")
    system, split = load_example("hotpotqa", lm)
    trace = system.run(split.test[0], overrides={"retriever": {"embedding_weight": 0.5}})
    assert trace.ok, trace.error
    assert isinstance(trace.prediction["answer"], str) and 0.0 <= trace.score <= 1.0
    assert trace.usage.calls + trace.usage.cache_hits == 2
    assert re.sub(r"\s", "", trace["query_rewriter"].outputs["search_query"])
