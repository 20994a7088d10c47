"""Your own pipeline: the runnable example file, the same through `optimas-fast run` on its YAML (a factory
system, a factory LM, JSONL data), and every bad factory / data file as one clear line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from optimas_fast import cli, run
from optimas_fast.optimize import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_pipeline.py"
DATA = REPO / "examples" / "own_pipeline_data"


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_example_file_runs_and_improves_on_the_scripted_lm(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--iterations", "1", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["val"][1] >= res["val"][0]
    # the scripted router guesses without keywords; showing them is the change the loop must find
    assert res["variables"]["route.context"] == "show='ticket+keywords'"
    assert res["test_after"] > res["test_before"]
    assert (tmp_path / "run" / "system_state.json").is_file()


def test_cli_runs_the_example_yaml_then_evaluates_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the factory module is importable from the repository root
    out = tmp_path / "run"
    assert cli.main(["run", "examples/own_pipeline.yaml", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test score before" in printed and "test score after" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["split_sizes"] == {"train": 8, "val": 5, "test": 5}
    assert report["test_after"]["mean"] >= report["test_before"]["mean"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert Path(saved["data"]["train"]).is_absolute()  # the run directory's copy works from anywhere
    assert cli.main(["eval", str(out), "--split", "val", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean"] == pytest.approx(report["best_val"])


# ----------------------------------------------------------------------------------------------- errors
def _write_config(tmp_path, **over):
    cfg = {
        "system": "examples.own_pipeline:build_system",
        "lm": {"factory": "examples.own_pipeline:scripted_lm"},
        "data": {k: str(DATA / f"{k}.jsonl") for k in ("train", "val", "test")},
        "reward": {"backbone": "tiny-random"},
        "loop": {"iterations": 0},
    }
    for k, v in over.items():
        cfg[k] = v
    path = tmp_path / f"c-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _module(tmp_path, body: str) -> str:
    name = f"user_mod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(body)
    return name


def _fails(capsys, path, *needles):
    assert cli.main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_bad_factories_are_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    _fails(capsys, _write_config(tmp_path, system="no_such_pkg.pipeline:build"), "no_such_pkg", "cannot import")
    boom = _module(tmp_path, "raise RuntimeError('boom at import')\n")
    _fails(capsys, _write_config(tmp_path, system=f"{boom}:build"), boom, "RuntimeError: boom at import")
    _fails(capsys, _write_config(tmp_path, system="examples.own_pipeline:nope"), "no attribute 'nope'")
    mod = _module(
        tmp_path,
        "x = 3\ndef three():\n    return 3\ndef needs(n_rows):\n    return None\n"
        "def broken():\n    raise KeyError('k')\n",
    )
    _fails(capsys, _write_config(tmp_path, system=f"{mod}:x"), f"'{mod}:x'", "not a callable")
    _fails(capsys, _write_config(tmp_path, system=f"{mod}:three"), f"'{mod}:three'", "returned a int", "System")
    _fails(capsys, _write_config(tmp_path, system=f"{mod}:needs"), "required parameters ['n_rows']")
    _fails(capsys, _write_config(tmp_path, system=f"{mod}:broken"), f"'{mod}:broken' raised KeyError")
    _fails(capsys, _write_config(tmp_path, lm={"factory": f"{mod}:three"}), "lm:", "not an optimas_fast.lm.LM")
    _fails(capsys, _write_config(tmp_path, system="a:b:c"), "system must be one of", "'a:b:c'")
    # nothing of a failed run is left behind
    assert not list(tmp_path.glob("optimas-run-*"))


def test_bad_data_files_name_the_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    good = {k: str(DATA / f"{k}.jsonl") for k in ("train", "val", "test")}
    _fails(
        capsys,
        _write_config(tmp_path, data={**good, "train": str(tmp_path / "nope.jsonl")}),
        "data.train",
        "nope.jsonl",
        "not found",
    )
    cases = {
        "notjson": ('{"ticket": "a", "department": "tech"}\n{"ticket": oops}\n', "line 2", "not valid JSON"),
        "notobj": ('["ticket"]\n', "line 1", "expected a JSON object"),
        "nofield": ('{"ticket": "a"}\n\n{"text": "b"}\n', "line 3", "missing field(s) ['ticket']"),
        "empty": ("\n", "has no examples", ""),
    }
    for name, (text, *needles) in cases.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text(text)
        err = _fails(capsys, _write_config(tmp_path, data={**good, "val": str(f)}), "data.val", str(f), *needles)
        assert err.startswith("optimas-fast run: invalid config:")
    # relative paths are relative to the config file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "v.jsonl").write_text('{"ticket": oops}\n')
    _fails(capsys, _write_config(tmp_path, data={**good, "val": "sub/v.jsonl"}), str(tmp_path / "sub" / "v.jsonl"))


@pytest.mark.parametrize(
    "data, needle",
    [
        (None, "needs its data as JSONL files"),
        ({"train": 5, "val": 3}, "needs its data as JSONL files"),
        ({"train": "t.jsonl", "val": 3}, "data.val: give every split as a JSONL file"),
        ({"train": "t.jsonl"}, "data.val: a JSONL file is required"),
        ({"train": "t.jsonl", "val": "t.jsonl", "dir": "x"}, "data.dir"),
    ],
)
def test_data_spec_errors(tmp_path, data, needle):
    (tmp_path / "t.jsonl").write_text('{"ticket": "a"}\n')
    raw = {"system": "examples.own_pipeline:build_system", "data": data}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        run.parse_config(raw, base_dir=tmp_path)


def test_jsonl_files_also_feed_a_builtin_system(tmp_path, capsys):
    # the synthetic system reads "x"; its examples can come from files too
    for k, n in (("train", 12), ("val", 6)):
        (tmp_path / f"{k}.jsonl").write_text("".join(json.dumps({"id": i, "x": f"item {i}"}) + "\n" for i in range(n)))
    cfg = run.parse_config(
        {
            "system": "synthetic",
            "data": {"train": "train.jsonl", "val": "val.jsonl"},
            "reward": {"backbone": "tiny-random"},
        },
        base_dir=tmp_path,
    )
    system, split, _, _ = run.build(cfg)
    assert [len(split.train), len(split.val), len(split.test)] == [12, 6, 0]
    assert split.train[3] == {"id": 3, "x": "item 3"}
