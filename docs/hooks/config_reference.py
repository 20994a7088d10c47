"""MkDocs hook: the configuration reference (docs/configuration.md), generated from the settings dataclasses.

Every setting is a dataclass field with a comment beside it (or in the comment lines right above it): the comment is
the field's meaning, the field's default is read from the class. ``<!-- config-reference -->`` in a page is replaced
by one table per class; tests/test_docs.py checks that no field lacks its comment and that no settings dataclass of
the package is missing from SECTIONS.

Which comment belongs to a field: its trailing comment, plus the standalone comment lines between it and the
previous field. A standalone block that follows a field with a trailing comment and precedes a field that has its own
trailing comment continues the first one (a long trailing comment wrapped onto the next line).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import textwrap
import tokenize

PLACEHOLDER = "<!-- config-reference -->"

# (title, what it configures and where it is written, ["module:Class", ...])
SECTIONS = [
    (
        "A run: `optimas-fast run CONFIG.yaml`",
        "The top-level keys of a run's YAML file, all optional but `system` (`optimas_fast.run.load_config` parses "
        "them into a `RunConfig`; an unknown key or a wrong value stops with a message naming it). `loop:` takes the "
        "loop's settings below; `reward:` takes `backbone`, `max_length` (short for `template.max_length`), any "
        "`RewardModelConfig` field and `train:`, the reward model's `TrainConfig` (`reward.train.lr`, ...); "
        "`system_config:` takes the built-in example's settings (the example systems' classes at the end).",
        ["optimas_fast.run:RunConfig"],
    ),
    (
        "The Optimas loop: `loop:` in YAML, `OptimasConfig` in Python",
        "`OptimasConfig.from_dict(d)` (and the `loop:` key) take these names; nested classes are the keys "
        "`collect:`, `prompt:`, `choice:`, `weights:` and `budget:` under `loop:`.",
        [
            "optimas_fast.optimize.config:OptimasConfig",
            "optimas_fast.preference.collect:CollectConfig",
            "optimas_fast.optimizers.prompt:PromptConfig",
            "optimas_fast.optimizers.choice:ChoiceConfig",
            "optimas_fast.optimizers.weights:WeightsConfig",
            "optimas_fast.optimize.config:BudgetConfig",
        ],
    ),
    (
        "The reward model: `reward:` in YAML, `RewardModel(..., config=..., train_config=...)` in Python",
        "The engine's settings of a reward model (text layout, pooling, precision, batching); `TemplateConfig` is its "
        "`template`, `LoraSettings` its `lora`, all under `reward:` in a run's YAML. `TrainConfig` is how it trains: "
        "`RewardModel(..., train_config=TrainConfig(...))`, `reward.train:` in a run's YAML (the Optimas loop trains "
        "the model with it and has no learning rate of its own); its fields are also keyword overrides of one "
        "`RewardModel.train` or `RewardModel.adapt` call.",
        [
            "optimas_fast.reward.config:RewardModelConfig",
            "optimas_fast.reward.template:TemplateConfig",
            "optimas_fast.reward.config:LoraSettings",
            "optimas_fast.reward.trainer:TrainConfig",
        ],
    ),
    (
        "The TRL face: `optimas_fast.trl.RewardConfig`",
        "TRL's names and TRL 1.16's defaults; also the YAML mapping of `optimas-fast reward train --config`.",
        ["optimas_fast.reward.trl_trainer:RewardConfig"],
    ),
    (
        "The scheduler: `Scheduler(...)`",
        "The C++ planner's settings (`optimas_fast.scheduler.Scheduler` takes them as keywords).",
        ["optimas_fast.scheduler:SchedulerConfig"],
    ),
    (
        "The example systems: `system_config:` in YAML, `load_example(name, config=...)` in Python",
        "Each example system's own knobs (prompt lengths, the options its `Choice` variables range over).",
        [
            "optimas_fast.examples.pubmedqa:PubMedQAConfig",
            "optimas_fast.examples.hotpotqa:HotpotQAConfig",
            "optimas_fast.examples.amazon:AmazonConfig",
            "optimas_fast.examples.codegen:CodegenConfig",
        ],
    ),
]


def settings_classes() -> list[type]:
    """Every documented settings dataclass, in page order (an import error names the entry to fix)."""
    out = []
    for _, _, names in SECTIONS:
        for spec in names:
            module, _, qualname = spec.partition(":")
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            out.append(obj)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its comment (``""`` when it has none), read from the class's source."""
    src = textwrap.dedent(inspect.getsource(cls))
    classdef = ast.parse(src).body[0]
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, standalone)
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            standalone = not lines[row - 1][: tok.start[1]].strip()
            comments[row] = (tok.string.lstrip("#").strip(), standalone)
    fields = {f.name for f in dataclasses.fields(cls)}
    stmts = [s for s in classdef.body]
    docs: dict[str, list[str]] = {}
    trailing: dict[str, bool] = {}
    prev_end, prev_field = classdef.lineno, None
    for s in stmts:
        name = s.target.id if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) else None
        block = [comments[r][0] for r in range(prev_end + 1, s.lineno) if r in comments and comments[r][1]]
        own = [comments[r][0] for r in range(s.lineno, s.end_lineno + 1) if r in comments and not comments[r][1]]
        if name in fields:
            if block and prev_field is not None and trailing[prev_field] and own:
                docs[prev_field] += block  # a wrapped trailing comment of the previous field
                block = []
            docs[name] = block + own
            trailing[name] = bool(own)
            prev_field = name
        else:
            prev_field = None  # a method or a docstring: the comments above it are its own
        prev_end = s.end_lineno
    return {f: " ".join(docs.get(f, [])).strip() for f in (fl.name for fl in dataclasses.fields(cls))}


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return f"`{type(value).__name__}()`" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return "required"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def class_table(cls: type) -> str:
    docs = field_docs(cls)
    where = f"{cls.__module__}.{cls.__qualname__}"
    out = [
        f"### `{cls.__name__}`",
        "",
        f"`{where}`" + (f": {_summary(cls)}" if _summary(cls) else ""),
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        # pipes inside a code span do not split a row (Python-Markdown's tables skip code spans); elsewhere they do
        out.append(f"| `{f.name}` | `{tp}` | {_default(f)} | {_cell(docs[f.name])} |")
    return "\n".join(out) + "\n"


def _summary(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclasses' generated signature, not a docstring
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def config_reference_markdown() -> str:
    parts, classes = [], iter(settings_classes())
    for title, intro, names in SECTIONS:
        parts += [f"## {title}", "", intro, ""]
        parts += [class_table(next(classes)) for _ in names]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # the MkDocs hook
    if PLACEHOLDER in markdown:
        return markdown.replace(PLACEHOLDER, config_reference_markdown())
    return markdown
