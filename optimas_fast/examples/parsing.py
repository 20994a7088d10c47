"""Robust parsing of LM replies. Small models ramble; every parser returns None (or "") on a reply it
cannot read instead of raising, and the component decides on the fallback and records it.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "parse_label",
    "parse_option_index",
    "extract_short_answer",
    "parse_json_object",
    "normalize_answer",
    "answer_f1",
]

_ANSWER_TAG = re.compile(r"(?:final\s+)?answer\s*(?:is|:|=)\s*", re.IGNORECASE)


def _after_answer_tag(text: str) -> str:
    """The text after the last 'Answer:' marker, or the whole text when there is none."""
    matches = list(_ANSWER_TAG.finditer(text))
    return text[matches[-1].end() :] if matches else text


def parse_label(text: str, labels: Sequence[str] = ("yes", "no", "maybe")) -> str | None:
    """The label the reply commits to: first label word after an 'Answer:' marker, else the first label word
    of the reply. None when no label word occurs (or the reply is not a str)."""
    if not isinstance(text, str) or not text.strip():
        return None
    pattern = re.compile(r"\b(" + "|".join(re.escape(lbl) for lbl in labels) + r")\b", re.IGNORECASE)
    for part in (_after_answer_tag(text), text):
        m = pattern.search(part)
        if m:
            return m.group(1).lower()
    return None


def parse_option_index(text: str, n_options: int, options: Sequence[str] | None = None) -> int | None:
    """The option a reply picks among ``n_options`` (0-based): a letter "(B)"/"B.", a number "2" (1-based
    when the prompt numbered options from 1, which ours do), or the text of one option quoted back.
    None when nothing identifies exactly one option."""
    if not isinstance(text, str) or not text.strip() or n_options < 1:
        return None
    part = _after_answer_tag(text).strip()
    letters = string.ascii_uppercase[:n_options]
    # a letter in parentheses, or followed by ".", ")", ":" or the end ("A user ..." is not an answer)
    m = re.match(rf"^\W*(?:option\s*)?(?:\(([{letters}])\)|([{letters}])(?=[.):\]*]|\s*$))", part, re.IGNORECASE)
    if m:
        return letters.index((m.group(1) or m.group(2)).upper())
    m = re.search(r"\b(?:option|choice|number|item)?\s*#?\(?(\d{1,2})\)?\b", part, re.IGNORECASE)
    if m and 1 <= int(m.group(1)) <= n_options:
        return int(m.group(1)) - 1
    if options:
        low = part.lower()
        hits = [i for i, opt in enumerate(options) if opt and opt.lower()[:40] in low]
        if len(hits) == 1:
            return hits[0]
    return None


def extract_short_answer(text: str, max_words: int = 12) -> str:
    """A short answer span: the text after an 'Answer:' marker, first line/sentence, no trailing filler.
    Empty string for an empty or non-str reply."""
    if not isinstance(text, str):
        return ""
    part = _after_answer_tag(text).strip()
    line = next((ln.strip() for ln in part.splitlines() if ln.strip()), "")
    # cut at the first sentence end: punctuation then a space or the end, except after a lone capital
    # (initials and abbreviations like "U.S." or "J. K."); "3.5" has no space after the dot
    m = re.search(r"(?<!\b[A-Z])[.!?](\s|$)", line)
    if m:
        line = line[: m.start()]
    line = line.strip().strip("*` ").rstrip(",;:")
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    words = line.split()
    return " ".join(words[:max_words])


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in a reply (code fences and surrounding prose allowed); None if there is none."""
    if not isinstance(text, str):
        return None
    start = text.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        value = json.loads(text[start : end + 1])
                    except json.JSONDecodeError:
                        break
                    return value if isinstance(value, dict) else None
        start = text.find("{", start + 1)
    return None


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised answers (HotpotQA's official definition, incl. yes/no special case)."""
    pred, ref = normalize_answer(prediction or ""), normalize_answer(gold or "")
    if pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer"):
        if pred != ref:
            return 0.0
    p_toks, r_toks = pred.split(), ref.split()
    common = Counter(p_toks) & Counter(r_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p_toks), same / len(r_toks)
    return 2 * precision * recall / (precision + recall)
