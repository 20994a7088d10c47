"""Data loaders for the three example systems, with row validation and a deterministic seeded split.

The data folder is ``data_dir`` if given, else ``$OPTIMAS_FAST_DATA``, else the copy that ships inside the
package (``optimas_fast/data/``, with its sources and licences in the README beside the files).
Each loader returns a list of example dicts with the fields the system reads plus the gold:

- PubMedQA: ``id``, ``question``, ``context`` (one str, sentences joined), ``answer`` ("yes"/"no"/"maybe").
- HotpotQA: ``id``, ``question``, ``paragraphs`` (list of ``"Title: text"`` str), ``answer``,
  ``supporting_titles``.
- Amazon: ``id``, ``session`` (list of product titles, oldest first), ``choices`` (4 titles), ``answer``
  (int index).

A malformed row raises ValueError naming the file, the line and the field (``strict=True``, default);
with ``strict=False`` it is skipped with a warning and counted in the loader's log line.
"""

from __future__ import annotations

import ast
import csv
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from optimas_fast._io import JSONLineError, iter_jsonl
from optimas_fast._validate import is_int

__all__ = [
    "default_data_dir",
    "PACKAGE_DATA_DIR",
    "load_pubmedqa",
    "load_hotpotqa",
    "load_amazon",
    "split_examples",
    "Split",
    "PUBMEDQA_FILE",
    "HOTPOTQA_FILE",
    "AMAZON_FILE",
]

log = logging.getLogger(__name__)

PUBMEDQA_FILE = "pubmedqa_train.jsonl"
HOTPOTQA_FILE = "hotpotqa_distractor_sample.jsonl"
AMAZON_FILE = "amazon_next_item.csv"
PUBMEDQA_LABELS = ("yes", "no", "maybe")
# optimas_fast/examples/data.py -> optimas_fast/data (package data; setup.py ships it in wheels and sdists)
PACKAGE_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: the argument, else ``$OPTIMAS_FAST_DATA``, else the package's own copy
    (``optimas_fast/data/``: present in a clone, an editable install and a wheel alike)."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("OPTIMAS_FAST_DATA")
    if env:
        return Path(env)
    return PACKAGE_DATA_DIR


def _data_file(name: str, data_dir: str | os.PathLike | None) -> Path:
    path = default_data_dir(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} not found; pass data_dir=... or set OPTIMAS_FAST_DATA to the folder holding {name}"
        )
    return path


class RowError(ValueError):
    """A malformed data row; the message names the file, line and field."""


def _need(row: dict, key: str, kind: type | tuple, where: str):
    if not isinstance(row, dict):
        raise RowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise RowError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RowError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def _load_rows(
    path: Path, rows: Iterator[tuple[int, object]], parse: Callable[[object, str], dict], strict: bool
) -> list[dict]:
    out, skipped = [], 0
    for lineno, row in rows:
        where = f"{path.name}:{lineno}"
        try:
            out.append(parse(row, where))
        except RowError as exc:
            if strict:
                raise
            skipped += 1
            log.warning("skipping malformed row: %s", exc)
    if skipped:
        log.warning("%s: skipped %d malformed rows, kept %d", path.name, skipped, len(out))
    if not out:
        raise ValueError(f"{path}: no valid rows")
    return out


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    return iter_jsonl(path, bad_lines="yield")  # a bad line is one malformed row (skipped unless strict)


def _check_json(row: object, where: str) -> dict:
    if isinstance(row, JSONLineError):
        raise RowError(f"{where}: not valid JSON ({row.msg} at column {row.column})")
    if not isinstance(row, dict):
        raise RowError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


# ------------------------------------------------------------------------------------------------------
def _parse_pubmedqa(row: object, where: str) -> dict:
    row = _check_json(row, where)
    question = _need(row, "question", str, where).strip()
    context = _need(row, "context", (list, str), where)
    if isinstance(context, list):
        if not all(isinstance(s, str) for s in context):
            raise RowError(f"{where}: field 'context' must be a list of str")
        context = " ".join(s.strip() for s in context)
    label = _need(row, "groundtruth", str, where).strip().lower()
    if label not in PUBMEDQA_LABELS:
        raise RowError(f"{where}: field 'groundtruth' must be one of {PUBMEDQA_LABELS}, got {label!r}")
    if not question or not context.strip():
        raise RowError(f"{where}: empty 'question' or 'context'")
    return {
        "id": str(row.get("index", row.get("key", where))),
        "question": question,
        "context": context,
        "answer": label,
    }


def load_pubmedqa(data_dir: str | os.PathLike | None = None, *, strict: bool = True) -> list[dict]:
    """PubMedQA labelled subset (500 rows): question, abstract context, yes/no/maybe answer."""
    path = _data_file(PUBMEDQA_FILE, data_dir)
    return _load_rows(path, _jsonl_rows(path), _parse_pubmedqa, strict)


def _parse_hotpotqa(row: object, where: str) -> dict:
    row = _check_json(row, where)
    question = _need(row, "question", str, where).strip()
    answer = _need(row, "answer", str, where).strip()
    ctx = _need(row, "context", dict, where)
    titles = _need(ctx, "title", list, where + " context")
    sentences = _need(ctx, "sentences", list, where + " context")
    if len(titles) != len(sentences) or not titles:
        raise RowError(f"{where}: context 'title' and 'sentences' must be non-empty lists of equal length")
    paragraphs = []
    for title, sents in zip(titles, sentences):
        if not isinstance(title, str) or not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise RowError(f"{where}: context paragraphs must be a str title and a list of str sentences")
        paragraphs.append(f"{title}: {''.join(sents).strip()}")
    support = row.get("supporting_facts") or {}
    support_titles = sorted(set(support.get("title", []))) if isinstance(support, dict) else []
    if not question or not answer:
        raise RowError(f"{where}: empty 'question' or 'answer'")
    return {
        "id": str(row.get("id", where)),
        "question": question,
        "paragraphs": paragraphs,
        "answer": answer,
        "supporting_titles": support_titles,
    }


def load_hotpotqa(data_dir: str | os.PathLike | None = None, *, strict: bool = True) -> list[dict]:
    """HotpotQA distractor sample (100 rows): question, 10 paragraphs (2 gold + 8 distractors), answer."""
    path = _data_file(HOTPOTQA_FILE, data_dir)
    return _load_rows(path, _jsonl_rows(path), _parse_hotpotqa, strict)


_SESSION_MARK = "Product Sequence:"


def _parse_amazon(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"{where}: malformed CSV row")
    question = _need(row, "question", str, where)
    raw_choices = _need(row, "choices", str, where)
    raw_answer = _need(row, "answer", str, where)
    try:
        # a Python-list literal; literal_eval never executes code
        choices = ast.literal_eval(raw_choices)
    except (ValueError, SyntaxError) as exc:
        raise RowError(f"{where}: field 'choices' is not a Python list literal ({exc})") from None
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise RowError(f"{where}: field 'choices' must be a list of at least 2 str")
    try:
        answer = int(raw_answer.strip())
    except ValueError:
        raise RowError(f"{where}: field 'answer' must be an integer index, got {raw_answer!r}") from None
    if not 0 <= answer < len(choices):
        raise RowError(f"{where}: field 'answer' {answer} is out of range for {len(choices)} choices")
    _, mark, tail = question.partition(_SESSION_MARK)
    lines = tail if mark else question
    session = [ln.strip() for ln in lines.splitlines() if ln.strip()]
    if not session:
        raise RowError(f"{where}: field 'question' holds no product session")
    return {"id": where, "session": session, "choices": [c.strip() for c in choices], "answer": answer}


def _csv_rows(path: Path) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in ("question", "choices", "answer") if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path.name}: header lacks columns {missing}")
        for i, row in enumerate(reader, 1):
            if None in row:  # more cells than header columns
                row = "extra cells"
            yield i, row


def load_amazon(data_dir: str | os.PathLike | None = None, *, strict: bool = True) -> list[dict]:
    """Amazon KDD Cup 2024 next-item selection (120 rows): session, 4 choices, gold index."""
    path = _data_file(AMAZON_FILE, data_dir)
    return _load_rows(path, _csv_rows(path), _parse_amazon, strict)


# ------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """A train/val/test split of examples."""

    train: list  # ~60%: examples the optimizer learns from
    val: list  # ~20%: examples the acceptance gate evaluates on
    test: list  # ~20%: held out, reported only


def split_examples(examples: list, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Split:
    """Deterministic seeded split: the same examples and seed always give the same three lists."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split_examples(fractions): expected 3 non-negative fractions summing to 1, got {fractions}")
    if not is_int(seed):
        raise TypeError(f"split_examples(seed): expected an int, got {type(seed).__name__}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return Split(pick(order[:n_train]), pick(order[n_train : n_train + n_val]), pick(order[n_train + n_val :]))
