"""Preference data in the formats users already have -> PreferencePair lists (``load_pairs``), and back out
(``save_pairs``, the project's own format).

Three layouts, detected from a row's columns (``format="auto"``) or named (``"trl"``, ``"optimas"``,
``"pairs"``):

* **trl** (TRL's preference data): ``{prompt, chosen, rejected}`` (explicit prompt), ``{chosen, rejected}``
  (implicit prompt), either of them conversational (lists of ``{"role", "content"}`` messages), optional
  ``margin`` (TRL's meaning: *subtracted* inside the sigmoid, ``-log σ(r⁺ - r⁻ - margin)``) and optional
  ``component`` (else every pair goes to one head: ``component=`` or ``"default"``).

  - Implicit prompt: the shared prefix of chosen and rejected becomes the pair's inputs (that is what prefix
    sharing reuses) and ``inputs + chosen == the row's chosen`` (same for rejected), so no text is lost. With
    a ``tokenizer`` the split is on whole tokens: the longest common token prefix such that tokenising the
    prompt and each response separately gives the same ids as tokenising the whole text (backing off a token
    at a time where a merge crosses the split). Without one it is on a word boundary: the longest common
    character prefix cut back to the end of its last whole word; the whitespace before the responses goes
    with the responses (as TRL's ``extract_prompt`` does). Each response keeps at least one token / word.
  - Conversational: rendered with the tokenizer's chat template the way TRL does (prompt = the shared
    messages with ``add_generation_prompt=True``; a response = the render of prompt + its messages minus the
    prompt's render). No tokenizer, or one without a chat template, is an error.
  - ``margin`` travels in ``PreferencePair.margin``; the returned set says ``margin_kind="subtract"`` so the
    trainer subtracts it with uniform weights (TRL), instead of weighting by it (Optimas). Margins must be
    finite and >= 0 (PreferencePair's contract): a negative TRL margin is an error.

* **optimas** (the reference Optimas scripts' per-component preference sets): ``context``,
  ``response_chosen``, ``response_rejected``, ``score_chosen``, ``score_rejected``; as a ``DatasetDict`` /
  dict / folder keyed by component name (one file per component, the file's stem is the name), or one table
  with a ``component`` column. ``context`` and the responses are JSON objects serialised as strings (what
  the reference writes), dicts, or plain text. A context that is a reference trajectory
  (``{component: {"input": {...}, "output": {...}}, ...}``) contributes the component's own ``input``
  record when present (the reference's construction), else every record's inputs then outputs flattened;
  any other object is the inputs themselves. Objects render as ``field: value`` lines, exactly as the
  project's own preference layer renders a component's inputs / outputs (``optimas_fast.render``), so pairs
  from files and from the loop look alike. Margin = score_chosen - score_rejected, ``margin_kind="weight"``.
  A tie (margin 0: no preference) is dropped and counted (``ties="drop"``; ``"error"`` refuses it); a
  negative margin is an error (``negative_margin="error"``) or the pair is swapped and counted (``"swap"``).

* **pairs** (this project's own, what the loop's PairStore holds): ``{component, inputs, chosen, rejected,
  margin}``; ``save_pairs`` writes it and ``load_pairs`` reads it back equal (``margin_kind="weight"``).

Sources: a path (``.jsonl``, ``.json`` (a list of rows, ``{"rows": [...]}``, ``{name: [rows]}``, or JSON
lines as ``Dataset.to_json`` writes them), ``.parquet``, ``.csv``), a folder (a ``save_to_disk`` Dataset /
DatasetDict, or one data file per component / split, plus an optional ``components.{json,yaml,yml}``), a
``datasets.Dataset`` / ``DatasetDict``, a dict of row lists, a list of row dicts, or a list of paths (loaded
and merged). Named collections are components for optimas data and splits otherwise (``split=`` picks one;
required when there are several).

Bad data never trains silently: every problem is a ``PairFormatError`` (a ``ValueError``) naming the file,
the row (``line N`` for JSONL / CSV, ``row N`` from 0 for JSON, Parquet and Datasets) and the field.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimas_fast._io import JSONLineError, iter_jsonl
from optimas_fast._validate import is_number
from optimas_fast.render import format_fields
from optimas_fast.reward.data import PreferencePair

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "LoadReport",
    "PairFormatError",
    "PairSet",
    "load_components",
    "load_pairs",
    "merge_pair_sets",
    "save_pairs",
]

FORMATS = ("auto", "trl", "optimas", "pairs")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
COMPONENT_FILES = ("components.json", "components.yaml", "components.yml")
DEFAULT_COMPONENT = "default"
OPTIMAS_COLUMNS = ("context", "response_chosen", "response_rejected", "score_chosen", "score_rejected")
PAIRS_COLUMNS = ("component", "inputs", "chosen", "rejected")
LAYOUTS = (
    "supported layouts (columns): "
    "trl = {prompt, chosen, rejected} or {chosen, rejected} (+ optional margin, component; strings or chat "
    "message lists); optimas = {context, response_chosen, response_rejected, score_chosen, score_rejected} "
    "(+ optional component); pairs = {component, inputs, chosen, rejected} (+ optional margin)"
)


class PairFormatError(ValueError):
    """Bad preference data: ``where`` (file and row) and ``field`` say what to fix."""

    def __init__(self, where: str, field_name: str | None, problem: str):
        self.where, self.field = where, field_name
        super().__init__(f"{where}: field {field_name!r}: {problem}" if field_name else f"{where}: {problem}")


@dataclass
class LoadReport:
    """What one table (a file, a split, a component's set) contributed."""

    source: str  # file path or in-memory name, with the split / component key
    format: str  # "trl" | "optimas" | "pairs"
    rows: int = 0  # rows read
    pairs: int = 0  # pairs kept
    ties_dropped: int = 0  # optimas rows with score_chosen == score_rejected (no preference)
    swapped: int = 0  # optimas rows with score_chosen < score_rejected, swapped (negative_margin="swap")
    layouts: dict = field(default_factory=dict)  # row layout -> count (explicit / implicit / conversational ...)
    ignored_columns: list = field(default_factory=list)  # columns present but not used

    def as_dict(self) -> dict:
        return dict(vars(self))


class PairSet(list):
    """A list of PreferencePair plus what the trainer needs to know about where they came from.

    ``components``: name -> description (every component the pairs use, in first-seen order);
    ``margin_kind``: "weight" (weight each pair by its normalised margin: Optimas, own pairs), "subtract"
    (subtract the margin inside the sigmoid with uniform weights: TRL's ``margin`` column) or "none" (no
    margins: TRL without a margin column, every margin is 1.0 and weights are uniform);
    ``prefix_format``: the template prefix that reproduces the source's own text (TRL: ``"{inputs}"``, so a row
    scores prompt + response as TRL tokenises it) or None (the engine's default template with the
    component's description: Optimas, own pairs); ``reports``: one LoadReport per table read.
    """

    def __init__(
        self,
        pairs: Iterable[PreferencePair] = (),
        components: Mapping[str, str] | None = None,
        margin_kind: str = "weight",
        prefix_format: str | None = None,
        reports: Sequence[LoadReport] = (),
    ):
        super().__init__(pairs)
        self.components = dict(components or {})
        self.margin_kind = margin_kind
        self.prefix_format = prefix_format
        self.reports = list(reports)

    def __getitem__(self, index):
        """A slice is a PairSet with the same components, margin kind and template (the reports stay the
        source's); an index is a PreferencePair."""
        if isinstance(index, slice):
            return PairSet(
                super().__getitem__(index), self.components, self.margin_kind, self.prefix_format, self.reports
            )
        return super().__getitem__(index)

    @property
    def format(self) -> str:
        kinds = {r.format for r in self.reports}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")

    def counts(self) -> dict[str, int]:
        """Pairs per component."""
        c = Counter(p.component for p in self)
        return {name: c.get(name, 0) for name in self.components}

    def summary(self) -> dict:
        """JSON-ready: pairs, per component, format, margin kind, the per-table reports."""
        return {
            "pairs": len(self),
            "components": self.counts(),
            "format": self.format,
            "margin_kind": self.margin_kind,
            "ties_dropped": sum(r.ties_dropped for r in self.reports),
            "swapped": sum(r.swapped for r in self.reports),
            "sources": [r.as_dict() for r in self.reports],
        }

    def __repr__(self) -> str:
        return (
            f"PairSet({len(self)} pairs, format={self.format!r}, margin_kind={self.margin_kind!r}, "
            f"components={self.counts()})"
        )


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class _Table:
    """Rows of one file / split with how to name a row in an error."""

    name: str  # source name for messages and reports
    rows: Iterable[tuple[str, dict]]  # (row label, row) in order
    columns: list[str] | None  # fixed columns (tables), None = per row (JSON / JSONL / lists)
    key: str | None = None  # the collection key it came under (component or split name)
    text_cells: bool = False  # CSV: every cell is text (numbers are parsed; a message list stays text)
    schema: frozenset = frozenset()  # the columns every row must have: the table's, or its first row's


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        for n, row in iter_jsonl(path):
            if not isinstance(row, dict):
                raise PairFormatError(
                    f"{path} line {n}", None, f"a row must be a JSON object, got {type(row).__name__}"
                )
            yield f"line {n}", row
    except JSONLineError as e:
        raise PairFormatError(f"{path} line {e.line}", None, f"not valid JSON ({e.msg} at column {e.column})") from None


def _csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    f = open(path, encoding="utf-8-sig", newline="")
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        return [], iter(())

    def rows():
        with f:
            start = reader.line_num + 1
            for cells in reader:
                if len(cells) != len(header):
                    if not any(c.strip() for c in cells):
                        start = reader.line_num + 1
                        continue
                    raise PairFormatError(
                        f"{path} line {start}", None, f"{len(cells)} cells for {len(header)} columns {header}"
                    )
                yield f"line {start}", dict(zip(header, cells))
                start = reader.line_num + 1

    return header, rows()


def _list_rows(rows: Sequence[Any], name: str) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise PairFormatError(f"{name} row {i}", None, f"a row must be an object, got {type(row).__name__}")
        yield f"row {i}", dict(row)


def _dataset_rows(ds: Any) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(ds):
        yield f"row {i}", row


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets") and hasattr(obj, "column_names") and hasattr(obj, "features")


def _is_dataset_dict(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets") and type(obj).__name__ in ("DatasetDict", "IterableDatasetDict")


def _json_tables(path: Path) -> list[_Table]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines under a .json name (what Dataset.to_json writes by default)
            return [_Table(str(path), _jsonl_rows(path), None)]
        raise PairFormatError(str(path), None, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, list):
        return [_Table(str(path), _list_rows(data, str(path)), None)]
    if isinstance(data, dict):
        if isinstance(data.get("rows"), list) and len(data) == 1:
            return [_Table(str(path), _list_rows(data["rows"], str(path)), None)]
        if data and all(isinstance(v, list) for v in data.values()):
            # {name: [rows]}: components (optimas) or splits; a row dict can not be a list of lists
            if all(all(isinstance(r, Mapping) for r in v) for v in data.values()):
                return [_Table(f"{path}[{k!r}]", _list_rows(v, f"{path}[{k!r}]"), None, key=k) for k, v in data.items()]
    raise PairFormatError(
        str(path), None, 'a JSON file must hold a list of rows, {"rows": [...]} or {name: [rows], ...}; ' + LAYOUTS
    )


def _file_tables(path: Path) -> list[_Table]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [_Table(str(path), _jsonl_rows(path), None)]
    if suffix == ".json":
        return _json_tables(path)
    if suffix == ".csv":
        header, rows = _csv_rows(path)
        return [_Table(str(path), rows, header, text_cells=True)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only Parquet sources need it

        table = pq.read_table(path)
        return [_Table(str(path), _list_rows(table.to_pylist(), str(path)), list(table.column_names))]
    raise PairFormatError(
        str(path), None, f"unsupported file type {suffix!r}: use one of {list(DATA_SUFFIXES)} or a folder"
    )


def _folder_tables(path: Path) -> tuple[list[_Table], Path | None]:
    """A saved Dataset / DatasetDict, or one data file per component / split (+ an optional components file)."""
    if (
        (path / "dataset_dict.json").is_file()
        or (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
    ):
        import datasets  # lazy: only saved datasets need it

        return _memory_tables(datasets.load_from_disk(str(path)), str(path)), None
    comp_file = next((path / n for n in COMPONENT_FILES if (path / n).is_file()), None)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and p != comp_file)
    if not files:
        raise PairFormatError(
            str(path),
            None,
            f"folder has no data files ({', '.join(DATA_SUFFIXES)}) and is not a saved Dataset / DatasetDict",
        )
    stems = Counter(p.stem for p in files)
    dup = [s for s, n in stems.items() if n > 1]
    if dup:
        raise PairFormatError(
            str(path), None, f"several files for the same name {dup}: one file per component or split"
        )
    tables = []
    for p in files:
        for t in _file_tables(p):
            if t.key is not None:
                raise PairFormatError(
                    str(p),
                    None,
                    "a file in a folder must hold one table (the file's stem names it), not {name: [rows]}",
                )
            t.key = p.stem
            tables.append(t)
    return tables, comp_file


def _memory_tables(obj: Any, name: str) -> list[_Table]:
    if _is_dataset(obj):
        return [_Table(name, _dataset_rows(obj), list(obj.column_names or []) or None)]
    if _is_dataset_dict(obj) or isinstance(obj, Mapping):
        tables = []
        for k, v in obj.items():
            sub = f"{name}[{k!r}]"
            if _is_dataset(v):
                tables.append(_Table(sub, _dataset_rows(v), list(v.column_names or []) or None, key=k))
            elif isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
                tables.append(_Table(sub, _list_rows(v, sub), None, key=k))
            else:
                raise PairFormatError(sub, None, f"expected a Dataset or a list of rows, got {type(v).__name__}")
        if not tables:
            raise PairFormatError(name, None, "no splits / components in it")
        return tables
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_Table(name, _list_rows(obj, name), None)]
    raise PairFormatError(
        name,
        None,
        f"unsupported source type {type(obj).__name__}: pass a path, a folder, a "
        "datasets.Dataset / DatasetDict, a dict of row lists or a list of row dicts",
    )


def load_components(components: Any) -> dict[str, str] | None:
    """None, a mapping name -> description (or -> {"description": ...}), or a JSON / YAML file of one."""
    if components is None:
        return None
    where = "components"
    if isinstance(components, (str, os.PathLike)):
        path = Path(components)
        where = str(path)
        if not path.is_file():
            raise PairFormatError(where, None, "components file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # lazy: only YAML component files need it

            try:
                components = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise PairFormatError(where, None, f"not valid YAML ({e})") from None
        else:
            try:
                components = json.loads(text)
            except json.JSONDecodeError as e:
                raise PairFormatError(where, None, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(components, (list, tuple)) and all(isinstance(c, str) for c in components):
        components = {c: c for c in components}
    if not isinstance(components, Mapping):
        raise PairFormatError(where, None, f"components must map name -> description, got {type(components).__name__}")
    out = {}
    for name, desc in components.items():
        if isinstance(desc, Mapping):
            desc = desc.get("description")
        if not isinstance(name, str) or not name or not isinstance(desc, str):
            raise PairFormatError(
                where,
                str(name),
                "components must map a non-empty name to a description string"
                f' (or to {{"description": ...}}), got {desc!r:.60}',
            )
        out[name] = desc
    return out


# ------------------------------------------------------------------------------------------------ detection
def _detect(columns: Iterable[str], where: str) -> str:
    cols = set(columns)
    optimas = cols & {"context", "response_chosen", "response_rejected"}
    trl = cols & {"chosen", "rejected"}
    if optimas and trl:
        raise PairFormatError(
            where,
            None,
            f"ambiguous columns {sorted(cols)}: Optimas ({sorted(optimas)}) and "
            f"TRL / pairs ({sorted(trl)}) at once; pass format='optimas' or 'trl'. " + LAYOUTS,
        )
    if optimas:
        return "optimas"
    if "inputs" in cols and "prompt" in cols:
        raise PairFormatError(
            where,
            None,
            f"ambiguous columns {sorted(cols)}: 'inputs' (pairs) and 'prompt' "
            "(TRL) at once; pass format='pairs' or 'trl'. " + LAYOUTS,
        )
    if "inputs" in cols:
        return "pairs"
    if trl:
        return "trl"
    raise PairFormatError(where, None, f"unknown columns {sorted(cols)}. " + LAYOUTS)


# ------------------------------------------------------------------------------------------------ field checks
class _Row:
    """One row under validation: every message names the table, the row and the field."""

    def __init__(self, table: _Table, label: str, row: dict):
        self.table, self.label, self.row = table, label, row
        self.where = f"{table.name} {label}"

    def error(self, field_name: str | None, problem: str) -> PairFormatError:
        return PairFormatError(self.where, field_name, problem)

    def get(self, name: str) -> Any:
        if name not in self.row:
            raise self.error(name, "missing column")
        v = self.row[name]
        if v is None:
            raise self.error(name, "is null")
        return v

    def text(self, name: str, allow_empty: bool = False) -> str:
        v = self.get(name)
        if not isinstance(v, str):
            raise self.error(name, f"must be a string, got {type(v).__name__}")
        if not allow_empty and not v.strip():
            raise self.error(name, "is empty")
        return v

    def number(self, name: str) -> float:
        v = self.get(name)
        if isinstance(v, str) and self.table.text_cells:
            try:
                v = float(v)
            except ValueError:
                raise self.error(name, f"must be a number, got {v!r:.40}") from None
        if not is_number(v):
            raise self.error(name, f"must be a number, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v):
            raise self.error(name, f"is {v}: must be finite")
        return v

    def has(self, name: str) -> bool:
        """Whether the table has this column (decided by its first row: later rows may not drop it)."""
        return name in self.table.schema

    def component(self, default: str) -> str:
        name = "component" if self.has("component") else ("component_name" if self.has("component_name") else None)
        if name is None:
            return default
        return self.text(name)


def _check_pair(r: _Row, chosen: str, rejected: str, fields=("chosen", "rejected")) -> None:
    for f, v in zip(fields, (chosen, rejected)):
        if not v.strip():
            raise r.error(f, "is empty")
    if chosen == rejected:
        raise r.error(fields[1], f"is identical to {fields[0]!r}: a pair needs two different responses")


# ------------------------------------------------------------------------------------------------ TRL rows
def _messages(r: _Row, name: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise r.error(name, f"must be a non-empty list of {{'role', 'content'}} messages, got {value!r:.60}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise r.error(f"{name}[{i}]", f"a message must be {{'role': str, 'content': str}}, got {m!r:.60}")
        out.append(dict(m))
    return out


def _chat(tokenizer: Any, r: _Row, messages: list[dict], generation_prompt: bool) -> str:
    if tokenizer is None:
        raise r.error(
            "chosen", "conversational rows (message lists) need the backbone tokenizer's chat template: pass tokenizer="
        )
    if not getattr(tokenizer, "chat_template", None):
        raise r.error(
            "chosen",
            f"conversational rows need a chat template, and the tokenizer "
            f"({type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r}) has none: set "
            "tokenizer.chat_template or render the rows to text first",
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _render_conversation(
    tokenizer: Any, r: _Row, prompt: list[dict], chosen: list[dict], rejected: list[dict]
) -> tuple[str, str, str]:
    """TRL's maybe_apply_chat_template: prompt with the generation prompt; a response = the render of prompt +
    response minus the prompt's render (cut at their common prefix, as TRL does, where a template renders the
    generation prompt differently from the start of an answer)."""
    p = _chat(tokenizer, r, prompt, True) if prompt else ""
    pc = _chat(tokenizer, r, prompt + chosen, False)
    pr = _chat(tokenizer, r, prompt + rejected, False)
    n = min(len(p), _common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:]


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _word_split(chosen: str, rejected: str) -> int:
    """Longest common prefix cut back to the end of a whole word; trailing whitespace goes with the responses."""
    n = _common_prefix(chosen, rejected)
    n = min(n, len(chosen) - 1, len(rejected) - 1)  # each response keeps at least one character
    while n > 0 and not (
        (chosen[n].isspace() or chosen[n - 1].isspace()) and (rejected[n].isspace() or rejected[n - 1].isspace())
    ):
        n -= 1
    while n > 0 and chosen[n - 1].isspace():  # the prompt ends at a word; whitespace starts the responses
        n -= 1
    return n


def _token_split(tokenizer: Any, chosen: str, rejected: str, max_backoff: int = 16) -> int:
    """Longest common token prefix whose split reproduces both texts' ids when the parts are tokenised alone."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ic, ir = ids(chosen), ids(rejected)
    k = min(_common_prefix(ic, ir), len(ic) - 1, len(ir) - 1)  # each response keeps at least one token
    if k <= 0:
        return 0
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(chosen, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cuts = [offsets[j - 1][1] for j in range(k, 0, -1)]  # end of the j-th shared token, longest first
    else:  # no offsets (slow tokenizer): the word ends of the shared text, verified the same way
        n = _word_split(chosen, rejected)
        cuts = [i for i in range(n, 0, -1) if not chosen[i - 1].isspace() and chosen[i].isspace()]
    for cut in list(dict.fromkeys(cuts))[:max_backoff]:
        if chosen[:cut] != rejected[:cut] or cut >= len(chosen) or cut >= len(rejected):
            continue
        head = ids(chosen[:cut])
        if head + ids(chosen[cut:]) == ic and head + ids(rejected[cut:]) == ir:
            return cut
    return 0


def _trl_pair(r: _Row, tokenizer: Any, default_component: str) -> tuple[PreferencePair, str]:
    comp = r.component(default_component)
    chosen_v, rejected_v = r.get("chosen"), r.get("rejected")
    explicit = r.has("prompt")
    prompt_v = r.get("prompt") if explicit else None
    conv = isinstance(chosen_v, list) or isinstance(rejected_v, list) or isinstance(prompt_v, list)
    if conv:
        chosen_m, rejected_m = _messages(r, "chosen", chosen_v), _messages(r, "rejected", rejected_v)
        if explicit:
            prompt_m = _messages(r, "prompt", prompt_v)
        else:
            n = min(_common_prefix(chosen_m, rejected_m), len(chosen_m) - 1, len(rejected_m) - 1)
            prompt_m, chosen_m, rejected_m = chosen_m[:n], chosen_m[n:], rejected_m[n:]
        if chosen_m == rejected_m:
            raise r.error("rejected", "is identical to 'chosen': a pair needs two different responses")
        inputs, chosen, rejected = _render_conversation(tokenizer, r, prompt_m, chosen_m, rejected_m)
        layout = "conversational-explicit" if explicit else "conversational-implicit"
    else:
        chosen, rejected = r.text("chosen"), r.text("rejected")
        if explicit:
            inputs = r.text("prompt", allow_empty=True)
            layout = "explicit"
        else:
            if chosen == rejected:
                raise r.error("rejected", "is identical to 'chosen': a pair needs two different responses")
            cut = _token_split(tokenizer, chosen, rejected) if tokenizer is not None else _word_split(chosen, rejected)
            inputs, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
            layout = "implicit"
    _check_pair(r, chosen, rejected)
    margin = 1.0
    if r.has("margin"):
        margin = r.number("margin")
        if margin < 0:
            raise r.error(
                "margin",
                f"is {margin} < 0: a subtracted margin must be >= 0 here (PreferencePair "
                "margins are >= 0); drop the row or swap chosen and rejected",
            )
    return PreferencePair(comp, inputs, chosen, rejected, margin), layout


# ------------------------------------------------------------------------------------------------ Optimas rows
def _looks_like_json(text: str) -> bool:
    s = text.lstrip()
    return s.startswith("{") or s.startswith("[")


def _optimas_value(r: _Row, name: str, json_mode: dict) -> Any:
    """A context / response cell: a dict, a JSON object string, or plain text (consistently per column)."""
    v = r.get(name)
    if isinstance(v, Mapping):
        return dict(v)
    if not isinstance(v, str):
        raise r.error(name, f"must be a JSON object string, an object or text, got {type(v).__name__}")
    if not v.strip():
        raise r.error(name, "is empty")
    mode = json_mode.get(name)
    if mode is None:  # the first row decides whether this column holds JSON
        mode = json_mode[name] = _looks_like_json(v)
    if not mode:
        if _looks_like_json(v):
            try:
                json.loads(v)
            except json.JSONDecodeError:
                raise r.error(name, f"looks like JSON but does not parse: {v.strip()[:40]!r}") from None
            raise r.error(name, "is JSON while the column's first row is plain text: one column, one form")
        return v
    try:
        obj = json.loads(v)
    except json.JSONDecodeError as e:
        raise r.error(
            name, f"is not valid JSON ({e.msg} at char {e.pos}) while the column holds JSON objects: {v.strip()[:40]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise r.error(name, f"must be a JSON object, got JSON {type(obj).__name__}")
    return obj


def _context_inputs(ctx: Any, component: str) -> Any:
    """The component's inputs from a reference trajectory, or the object itself."""
    if not isinstance(ctx, dict):
        return ctx
    own = ctx.get(component)
    if isinstance(own, dict) and isinstance(own.get("input"), dict):
        return own["input"]  # the reference's construction: context[component] = {"input": its inputs}
    if ctx and all(isinstance(v, dict) and ({"input", "output"} & set(v)) for v in ctx.values()):
        flat: dict = {}  # a trajectory without the component's record: inputs, then outputs (reference order)
        for rec in ctx.values():
            flat.update(rec.get("input") or {})
        for rec in ctx.values():
            flat.update(rec.get("output") or {})
        return flat
    return ctx


def _as_text(v: Any) -> str:
    return format_fields(v) if isinstance(v, dict) else v  # as the loop renders rows


def _optimas_pair(
    r: _Row, component: str, json_mode: dict, ties: str, negative: str
) -> tuple[PreferencePair | None, str]:
    for c in OPTIMAS_COLUMNS:
        r.get(c)  # missing columns first, in a fixed order
    ctx = _optimas_value(r, "context", json_mode)
    inputs = _as_text(_context_inputs(ctx, component))
    chosen = _as_text(_optimas_value(r, "response_chosen", json_mode))
    rejected = _as_text(_optimas_value(r, "response_rejected", json_mode))
    _check_pair(r, chosen, rejected, ("response_chosen", "response_rejected"))
    margin = r.number("score_chosen") - r.number("score_rejected")
    if not math.isfinite(margin):
        raise r.error("score_chosen", f"score difference is {margin}: must be finite")
    if margin == 0:
        if ties == "error":
            raise r.error("score_rejected", "equals score_chosen: a tie is no preference (ties='drop' skips it)")
        return None, "tie"
    if margin < 0:
        if negative == "error":
            raise r.error(
                "score_chosen",
                f"is below score_rejected (margin {margin}): chosen must score higher "
                "(negative_margin='swap' swaps such pairs)",
            )
        return PreferencePair(component, inputs, rejected, chosen, -margin), "swapped"
    return PreferencePair(component, inputs, chosen, rejected, margin), "ok"


# ------------------------------------------------------------------------------------------------ own pairs
def _pairs_pair(r: _Row) -> PreferencePair:
    comp = r.text("component")
    vals = []
    for name in ("inputs", "chosen", "rejected"):
        v = r.get(name)
        if isinstance(v, Mapping):
            v = format_fields(dict(v))
        elif not isinstance(v, str):
            raise r.error(name, f"must be a string (or an object of fields), got {type(v).__name__}")
        vals.append(v)
    _check_pair(r, vals[1], vals[2])
    margin = r.number("margin") if r.has("margin") else 1.0
    if margin < 0:
        raise r.error("margin", f"is {margin} < 0: chosen must score at least as high as rejected")
    return PreferencePair(comp, vals[0], vals[1], vals[2], margin)


# ------------------------------------------------------------------------------------------------ the loader
def _tables_of(source: Any) -> tuple[list[_Table], Path | None, str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            tables, comp_file = _folder_tables(path)
            return tables, comp_file, str(path)
        if not path.is_file():
            raise PairFormatError(str(path), None, "no such file or folder")
        return _file_tables(path), None, str(path)
    name = "Dataset" if _is_dataset(source) else ("DatasetDict" if _is_dataset_dict(source) else "rows")
    return _memory_tables(source, name), None, name


def _first_row(table: _Table) -> tuple[_Table, dict | None]:
    """Peek at a table's first row (for detection) without losing it."""
    it = iter(table.rows)
    first = next(it, None)
    if first is None:
        return table, None

    def chain():
        yield first
        yield from it

    table.rows = chain()
    return table, first[1]


def _select_split(tables: list[_Table], fmt: str, split: str | None, name: str) -> list[_Table]:
    """Named tables are components for optimas data and splits otherwise: pick ``split`` (needed if several)."""
    keyed = [t for t in tables if t.key is not None]
    if fmt == "optimas" or not keyed:
        if split is not None and keyed:
            raise PairFormatError(
                name,
                None,
                f"split={split!r} given, but optimas data is keyed by component "
                f"({[t.key for t in keyed]}), not by split",
            )
        if split is not None:
            raise PairFormatError(name, None, f"split={split!r} given, but the source has no splits")
        return tables
    keys = [t.key for t in keyed]
    if split is None:
        if len(keys) > 1:
            raise PairFormatError(name, None, f"has splits {keys}: pass split= to pick one")
        return tables
    if split not in keys:
        raise PairFormatError(name, None, f"no split {split!r}; it has {keys}")
    return [t for t in tables if t.key == split]


_USED_COLUMNS = {
    "trl": {"prompt", "chosen", "rejected", "margin", "component", "component_name"},
    "optimas": set(OPTIMAS_COLUMNS) | {"component", "component_name"},
    "pairs": set(PAIRS_COLUMNS) | {"margin"},
}


def _read_table(
    t: _Table,
    fmt: str,
    out: list,
    comps: dict | None,
    tokenizer: Any,
    default_comp: str,
    ties: str,
    negative_margin: str,
) -> LoadReport:
    """Validates and converts one table's rows, appending its pairs to ``out``; returns its report."""
    rep = LoadReport(t.name, fmt, ignored_columns=sorted(c for c in t.schema if c not in _USED_COLUMNS[fmt]))
    json_mode: dict = {}  # optimas: column -> holds JSON objects (decided by its first row)
    layouts: Counter = Counter()
    for label, row in t.rows:
        r = _Row(t, label, row)
        rep.rows += 1
        if fmt == "trl":
            p, layout = _trl_pair(r, tokenizer, default_comp)
        elif fmt == "optimas":
            comp_name = r.component(t.key if t.key is not None else default_comp)
            if t.key is not None and comp_name != t.key:
                raise r.error("component", f"{comp_name!r} in a table keyed by component {t.key!r}")
            p, status = _optimas_pair(r, comp_name, json_mode, ties, negative_margin)
            layout = "json" if json_mode.get("context") else "text"
            rep.ties_dropped += status == "tie"
            rep.swapped += status == "swapped"
        else:
            p, layout = _pairs_pair(r), "pairs"
        layouts[layout] += 1
        if p is None:
            continue
        if comps is not None and p.component not in comps:
            raise r.error("component", f"{p.component!r} is not in the given components {sorted(comps)}")
        out.append(p)
        rep.pairs += 1
    rep.layouts = dict(layouts)
    if rep.ties_dropped or rep.swapped:
        logger.warning("%s: dropped %d tied pairs, swapped %d inverted pairs", t.name, rep.ties_dropped, rep.swapped)
    return rep


def load_pairs(
    source: Any,
    format: str = "auto",
    components: Any = None,
    *,
    tokenizer: Any = None,
    split: str | None = None,
    component: str | None = None,
    ties: str = "drop",
    negative_margin: str = "error",
) -> PairSet:
    """Preference pairs from a file, folder, ``datasets`` object, dict or list (see the module docstring).

    ``format``: "auto" (by columns) | "trl" | "optimas" | "pairs". ``components``: name -> description (a
    mapping, a list of names, or a JSON / YAML file); every component in the data must be in it when given;
    without it a component's description is its name. ``tokenizer``: the backbone's tokenizer (whole-token
    implicit-prompt splits; required for conversational rows). ``split``: which split of a collection of
    splits. ``component``: the head for TRL rows without a ``component`` column (default: the single name in
    ``components``, else "default"). ``ties`` ("drop" | "error") and ``negative_margin`` ("error" | "swap"):
    Optimas rows with equal / inverted scores. Returns a PairSet (a list of PreferencePair).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if ties not in ("drop", "error"):
        raise ValueError(f"ties must be 'drop' or 'error', got {ties!r}")
    if negative_margin not in ("error", "swap"):
        raise ValueError(f"negative_margin must be 'error' or 'swap', got {negative_margin!r}")
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        parts = [
            load_pairs(
                s,
                format,
                components,
                tokenizer=tokenizer,
                split=split,
                component=component,
                ties=ties,
                negative_margin=negative_margin,
            )
            for s in source
        ]
        return merge_pair_sets(parts)
    tables, comp_file, name = _tables_of(source)
    comps = load_components(components if components is not None else comp_file)
    peeked = [_first_row(t) for t in tables]
    tables = [t for t, _ in peeked]
    kinds = set()
    for t, first in peeked:
        if first is None:
            continue
        cols = t.columns if t.columns is not None else list(first)
        t.schema = frozenset(cols)
        kinds.add(_detect(cols, t.name) if format == "auto" else format)
    if not kinds:
        raise PairFormatError(name, None, "no rows")
    if len(kinds) > 1:
        raise PairFormatError(name, None, f"its tables hold different layouts {sorted(kinds)}; load them separately")
    fmt = kinds.pop()
    tables = _select_split(tables, fmt, split, name)  # TRL / own pairs: one table from here on
    default_comp = component or (next(iter(comps)) if comps and len(comps) == 1 else DEFAULT_COMPONENT)
    pairs: list[PreferencePair] = []
    reports = []
    for t in tables:
        reports.append(_read_table(t, fmt, pairs, comps, tokenizer, default_comp, ties, negative_margin))
    if not pairs:
        raise PairFormatError(
            name,
            None,
            f"no usable pairs ({sum(r.rows for r in reports)} rows, "
            f"{sum(r.ties_dropped for r in reports)} ties dropped)",
        )
    seen = dict.fromkeys(p.component for p in pairs)
    descriptions = {c: (comps or {}).get(c, c) for c in seen}
    if comps:  # keep the caller's order, and its components without pairs (they still get a head)
        descriptions = {**comps, **descriptions}
    kind = "weight" if fmt != "trl" else ("subtract" if any("margin" in t.schema for t in tables) else "none")
    return PairSet(pairs, descriptions, kind, "{inputs}" if fmt == "trl" else None, reports)


def merge_pair_sets(parts: Sequence[PairSet]) -> PairSet:
    """One PairSet from several (several files): margin kinds must agree, descriptions must not conflict."""
    kinds = {p.margin_kind for p in parts}
    if len(kinds) > 1:
        raise ValueError(
            f"can not merge pair sets with different margin kinds {sorted(kinds)} "
            "(TRL subtracted margins vs Optimas weights): train them separately"
        )
    prefixes = {p.prefix_format for p in parts}
    if len(prefixes) > 1:
        raise ValueError(
            "can not merge TRL pairs (scored as prompt + response) with Optimas / own pairs (scored "
            "through the component template): train them separately"
        )
    comps: dict[str, str] = {}
    for p in parts:
        for c, d in p.components.items():
            if comps.setdefault(c, d) != d:
                raise ValueError(f"component {c!r} has two descriptions: {comps[c]!r} and {d!r}")
    return PairSet(
        [x for p in parts for x in p], comps, kinds.pop(), prefixes.pop(), [r for p in parts for r in p.reports]
    )


# ------------------------------------------------------------------------------------------------ writing
def save_pairs(pairs: Iterable[PreferencePair], path: str | os.PathLike) -> Path:
    """Write pairs in the project's own format ({component, inputs, chosen, rejected, margin}) as JSONL, JSON,
    CSV or Parquet (by the suffix); ``load_pairs(path)`` reads them back equal."""
    path = Path(path)
    rows = [
        {
            "component": p.component,
            "inputs": p.inputs,
            "chosen": p.chosen,
            "rejected": p.rejected,
            "margin": float(p.margin),
        }
        for p in pairs
    ]
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["component", "inputs", "chosen", "rejected", "margin"])
            w.writeheader()
            for row in rows:
                w.writerow({**row, "margin": repr(row["margin"])})  # repr: floats round-trip exactly
    elif suffix == ".parquet":
        import pyarrow as pa  # lazy: only Parquet output needs it
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"save_pairs: unsupported file type {suffix!r}: use one of {list(DATA_SUFFIXES)}")
    return path
