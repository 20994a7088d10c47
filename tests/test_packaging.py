"""Where newcomers stand: the repository root on sys.path (python -c, a script saved there) shadows no package a
dependency imports, the example data ships inside the package, and the Triton kernels import as
optimas_fast.kernels from a checkout. (The wheel is checked by .ci/run: built, installed into a fresh venv and
run from an empty directory.)"""

import importlib.metadata
import json
import os
import subprocess
import sys
import uuid

import pytest

from optimas_fast.examples.data import (
    AMAZON_FILE,
    HOTPOTQA_FILE,
    PACKAGE_DATA_DIR,
    PUBMEDQA_FILE,
    default_data_dir,
    load_amazon,
    load_hotpotqa,
    load_pubmedqa,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a newcomer pastes at the root: transformers' model classes next to a reward model that scores a row.
SNIPPET = """
import json
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM  # noqa: F401
import kernels  # Hugging Face's package, which transformers imports; never the repository's kernels/ folder
from optimas_fast.reward import RewardModel

rm = RewardModel("minilm", {"a": "x"})
scores = rm.score([("a", {"q": "hi"}, "yo"), ("a", "q: hi", "hello there")])  # field mappings or rendered text
print(json.dumps({"kernels": kernels.__file__, "scores": [float(s) for s in scores]}))
"""


def _run_at_root(args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check(out: dict) -> None:
    assert not os.path.abspath(out["kernels"]).startswith(os.path.join(ROOT, "kernels")), out["kernels"]
    assert len(out["scores"]) == 2 and all(isinstance(s, float) for s in out["scores"])


@pytest.mark.slow
def test_python_c_at_the_repository_root_imports_transformers_and_scores():
    _check(_run_at_root(["-c", SNIPPET]))


@pytest.mark.slow
def test_a_script_saved_at_the_repository_root_runs():
    path = os.path.join(ROOT, f"_newcomer_{uuid.uuid4().hex[:8]}.py")
    with open(path, "w") as f:
        f.write(SNIPPET)
    try:
        _check(_run_at_root([path]))
    finally:
        os.remove(path)


def test_no_root_entry_shadows_an_installed_package():
    """Every top-level module name that an installed distribution provides resolves outside the repository
    when the root is first on sys.path (as it is for python -c, python -m and scripts saved there)."""
    provided = sorted(n for n in importlib.metadata.packages_distributions() if n.isidentifier())
    root_entries = {os.path.splitext(e)[0] for e in os.listdir(ROOT)}
    at_risk = [n for n in provided if n in root_entries and n != "optimas_fast"]  # (ours is meant to resolve here)
    assert "kernels" in at_risk  # the case this test exists for: HF's kernels vs our kernels/ folder
    code = (
        "import importlib.util, json, sys; "
        "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in sys.argv[1:]}))"
    )
    origins = _run_at_root(["-c", code, *at_risk])
    shadowed = {
        n: o for n, o in origins.items() if o is None or os.path.abspath(o).startswith(os.path.join(ROOT, n))
    }  # None: a namespace portion won
    assert not shadowed, f"repository root entries shadow installed packages: {shadowed}"


def test_kernels_import_as_optimas_fast_kernels_from_a_checkout():
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import optimas_fast.kernels._utils as u, optimas_fast.kernels.bt_loss as b; print(u.__file__, b.__file__)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(p.endswith(".py") for p in res.stdout.split())


def test_example_data_ships_inside_the_package(monkeypatch):
    monkeypatch.delenv("OPTIMAS_FAST_DATA", raising=False)
    assert default_data_dir() == PACKAGE_DATA_DIR
    assert PACKAGE_DATA_DIR.parent.name == "optimas_fast"
    for name in (PUBMEDQA_FILE, HOTPOTQA_FILE, AMAZON_FILE, "README.md"):
        assert (PACKAGE_DATA_DIR / name).is_file(), name
    assert (len(load_pubmedqa()), len(load_hotpotqa()), len(load_amazon())) == (500, 100, 120)


def test_data_dir_and_environment_override_the_package_copy(tmp_path, monkeypatch):
    lines = (PACKAGE_DATA_DIR / PUBMEDQA_FILE).read_text(encoding="utf-8").splitlines()[:7]
    (tmp_path / PUBMEDQA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(load_pubmedqa(data_dir=tmp_path)) == 7
    monkeypatch.setenv("OPTIMAS_FAST_DATA", str(tmp_path))
    assert len(load_pubmedqa()) == 7
    with pytest.raises(FileNotFoundError, match=HOTPOTQA_FILE):
        load_hotpotqa()
