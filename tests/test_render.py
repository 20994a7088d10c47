"""optimas_fast.render: the one rendering of field values and (component, inputs, outputs) rows into the text an
LRF reads, shared by the loop's pairs, the optimizers, best-of-N and the reward file formats; and the layering
it makes possible (render below system and reward; system knows no rewards; reward knows no system)."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest

from optimas_fast import render
from optimas_fast.render import format_fields, format_value, render_inputs, render_outputs, reward_row
from optimas_fast.reward.formats import load_pairs
from optimas_fast.system import Component

PKG = Path(render.__file__).resolve().parent


@pytest.mark.parametrize(
    "value, text",
    [
        ("plain text", "plain text"),
        (0.123456, "0.1235"),
        (3, "3"),
        ([0.5, 0.25], "[0.5, 0.25]"),
        ([1, "a"], '[1, "a"]'),
        ({"k": "é"}, '{"k": "é"}'),  # JSON without ASCII escapes
        (None, "null"),
        ({(1, 2): "x"}, None),  # JSON refuses the key: str() of it
    ],
)
def test_format_value(value, text):
    assert format_value(value) == (str(value) if text is None else text)


@pytest.mark.parametrize("cap", [0, 1, 3, 4, 10, 57])
def test_format_value_caps_long_text(cap):
    rng = random.Random(cap)
    long = "".join(rng.choice("abcdef ") for _ in range(60))
    out = format_value(long, cap)
    assert len(out) <= max(cap, 3) and (out == long if len(long) <= cap else out.endswith("..."))
    assert long.startswith(out[:-3]) or out == long


def test_format_fields_order_and_missing_fields():
    values = {"b": 2, "a": "x", "extra": 0.5}
    assert format_fields(values) == "b: 2\na: x\nextra: 0.5"  # every key, in the mapping's order
    assert format_fields(values, ["a", "b", "gone"]) == "a: x\nb: 2\ngone: null"  # the given fields only
    assert format_fields({"a": "x" * 50}, ["a"], 10) == "a: " + "x" * 7 + "..."


def test_rows_use_the_components_declared_fields_and_caps():
    c = Component(
        "solver",
        inputs=["question", "context"],
        outputs=["answer"],
        description="answers",
        fn=lambda question, context, variable: {"answer": question},
    )
    inputs = {"context": "c" * 5000, "question": "why?", "unused": 1}
    name, x, y = reward_row(c, inputs, {"answer": 0.5})
    assert name == "solver" and y == "answer: 0.5"
    assert x.split("\n")[0] == "question: why?"  # declaration order, not the mapping's
    assert x.split("\n")[1] == "context: " + "c" * (render.REWARD_INPUT_CHARS - 3) + "..."
    assert "unused" not in x
    assert render_outputs(c, {"answer": "z" * 5000}).endswith("...")
    assert len(render_outputs(c, {"answer": "z" * 5000})) == len("answer: ") + render.REWARD_OUTPUT_CHARS
    # the component's own text forms are the same rendering (the prompt optimizer uses them with its own cap)
    assert c.format_inputs(inputs, render.REWARD_INPUT_CHARS) == render_inputs(c, inputs)
    assert c.format_outputs({"answer": 0.5}) == "answer: 0.5"


def test_pairs_read_from_reference_files_render_like_the_loop(tmp_path):
    # a reference-Optimas row: the context and responses are JSON objects; they must read as the loop renders
    ctx = {"question": "what?", "k": 3}
    row = {
        "context": json.dumps(ctx),
        "response_chosen": json.dumps({"answer": "yes", "p": 0.75}),
        "response_rejected": json.dumps({"answer": "no", "p": 0.125}),
        "score_chosen": 1.0,
        "score_rejected": 0.0,
    }
    (tmp_path / "solver.jsonl").write_text(json.dumps(row) + "\n")
    pair = load_pairs(tmp_path)[0]
    assert pair.inputs == format_fields(ctx) == "question: what?\nk: 3"
    assert pair.chosen == "answer: yes\np: 0.75" and pair.rejected == "answer: no\np: 0.125"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                continue
            out.add(node.module or "")
    return out


@pytest.mark.parametrize(
    "files, forbidden",
    [
        (["render.py"], ("optimas_fast",)),  # the bottom: imports nothing of the package
        (
            ["system/"],
            ("optimas_fast.reward", "optimas_fast.best_of", "optimas_fast.preference", "optimas_fast.optimize"),
        ),  # the system knows nothing of rewards
        (
            ["reward/"],
            ("optimas_fast.system", "optimas_fast.preference", "optimas_fast.optimize", "optimas_fast.best_of"),
        ),  # the reward engine knows nothing of systems or the loop
    ],
)
def test_layers(files, forbidden):
    paths = [p for f in files for p in ((PKG / f).rglob("*.py") if f.endswith("/") else [PKG / f])]
    assert paths
    for p in paths:
        bad = sorted(m for m in _imports(p) if any(m == f or m.startswith(f + ".") for f in forbidden))
        assert not bad, f"{p.relative_to(PKG)} imports {bad}"
