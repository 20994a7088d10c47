"""The benchmarks cannot rot: every module under benchmarks/ imports, the kernel suite collects (nothing is
timed here), the GPU check stops at once with a clear message where there is no CUDA, and its report turns
step results into a verdict where a skipped GPU test is a failure. No timing assertions."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH, "*.py")))


def load(name: str):
    """Imports benchmarks/<name>.py under a private module name, with benchmarks/ first on sys.path as
    `python benchmarks/<name>.py` has it (the scripts import `_common` and each other from their own folder)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_modules_are_the_expected_ones():
    for name in (
        "_common",
        "bench_ops",
        "bench_reward",
        "bench_scheduler",
        "bench_gpu_workloads",
        "conftest",
        "gpu_check_report",
        "test_bench_ops",
    ):
        assert name in MODULES, name


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    mod = load(name)
    if name.startswith(("bench_", "run_", "eval_")):
        assert callable(getattr(mod, "main", None)), f"benchmarks/{name}.py has no main()"
    if name == "test_bench_ops":
        tests = [k for k in vars(mod) if k.startswith("test_")]
        assert sorted(tests) == [
            "test_bt_loss",
            "test_fused_head_bt_loss",
            "test_last_token_hidden",
            "test_multihead_score",
        ]


def test_no_benchmark_edits_sys_path():
    # `python benchmarks/x.py` puts the script's folder first on sys.path; the library comes installed.
    # A script that edits sys.path hides an import that only works from one place.
    for name in MODULES:
        with open(os.path.join(BENCH, f"{name}.py"), encoding="utf-8") as f:
            text = f.read()
        assert "sys.path" not in text, f"benchmarks/{name}.py edits sys.path"
        assert "optimas_fast.cli" not in text, f"benchmarks/{name}.py imports the CLI; use optimas_fast.run"


def test_a_benchmark_script_runs_from_another_folder(tmp_path):
    # bench_best_of imports _common and run_examples beside it and the run assembly from the library
    p = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_best_of.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "usage:" in p.stdout and "--systems" in p.stdout


def test_kernel_suite_collects_every_op_and_baseline():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/test_bench_ops.py",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ids = [line for line in p.stdout.splitlines() if "::" in line]
    for op, impls in (
        ("bt_loss", ("ours", "eager", "compile")),
        ("multihead_score", ("ours", "eager", "compile", "all_heads")),
        ("fused_head_bt_loss", ("ours", "eager", "compile")),
        ("last_token_hidden", ("ours", "eager", "compile", "hf_head")),
    ):
        for impl in impls:
            for mode in ("fwd", "fwdbwd"):
                assert any(f"test_{op}[cpu-small-float32-{impl}-{mode}]" in i for i in ids), (op, impl, mode)
    if torch.cuda.is_available():
        assert any("cuda-large-bfloat16" in i for i in ids)


def test_machine_info_and_result_files(tmp_path):
    common = load("_common")
    m = common.machine_info()
    for key in ("cpu", "cores", "load_average", "torch", "git_rev", "device", "python"):
        assert key in m, key
    path = common.write_results("unit", {"value": 1.5}, out_dir=str(tmp_path))
    with open(path) as f:
        data = json.load(f)
    assert data["name"] == "unit" and data["value"] == 1.5 and data["machine"]["torch"] == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run for minutes")
def test_gpu_check_fails_at_once_without_cuda(tmp_path):
    out = tmp_path / "gc"
    t0 = time.perf_counter()
    p = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_check.sh"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert p.returncode == 2, p.stderr
    assert "no CUDA device is visible" in p.stderr and "nothing was run" in p.stderr
    assert not out.exists()  # it stopped before any step
    assert time.perf_counter() - t0 < 60


def _junit(path, skipped=0, failed=0, passed=2):
    cases = [f'<testcase classname="tests.test_gpu_ops" name="t{i}"/>' for i in range(passed)]
    cases += [
        f'<testcase classname="tests.test_gpu_ops" name="s{i}"><skipped message="GPU-only test: no CUDA"/></testcase>'
        for i in range(skipped)
    ]
    cases += [
        f'<testcase classname="tests.test_gpu_ops" name="f{i}"><failure message="assert 1 == 2"/></testcase>'
        for i in range(failed)
    ]
    suite = f'<testsuite name="pytest">{"".join(cases)}</testsuite>'
    path.write_text(f'<?xml version="1.0"?><testsuites>{suite}</testsuites>')


def _fake_run(d, **junit):
    (d / "steps.tsv").write_text(
        "gpu_tests\t0\t30\t170\tpytest\nkernel_suite\t0\t60\t130\tbench\nworkloads\t0\t50\t150\tworkloads\n"
    )
    _junit(d / "gpu_tests.xml", **junit)
    bench = {
        "machine_info": {},
        "benchmarks": [
            {
                "name": f"test_multihead_score[cuda-large-bfloat16-{impl}-fwd]",
                "group": "multihead_score fwd cuda-large-bfloat16",
                "stats": {"median": t},
                "extra_info": {"impl": impl, "fraction_of_copy_bw": f, "pipelined_fraction_of_copy_bw": f},
            }
            for impl, t, f in (("ours", 1e-4, 0.55), ("kernel", 0.8e-4, 0.75), ("eager", 4e-4, 0.19))
        ],
    }
    (d / "bench_ops.json").write_text(json.dumps(bench))
    (d / "workloads.json").write_text(
        json.dumps(
            {
                "machine": {"device": "NVIDIA H200"},
                "amp": "bf16",
                "model": {},
                "pool": {
                    "rows": 1024,
                    "ours_rows_per_s": 900.0,
                    "hf_rows_per_s": 100.0,
                    "speedup_vs_hf": 9.0,
                    "vllm": {"skipped": "not installed"},
                },
                "train": {
                    "ours": {"pairs_per_s": 50.0},
                    "reference_way": {"pairs_per_s": 5.0},
                    "trl": {"pairs_per_s": 10.0},
                },
            }
        )
    )


@pytest.mark.parametrize("case", ["clean", "skipped", "failed", "step_timed_out"])
def test_gpu_check_report_never_counts_a_skip_as_a_pass(tmp_path, case):
    report = load("gpu_check_report")
    _fake_run(tmp_path, skipped=int(case == "skipped"), failed=int(case == "failed"))
    if case == "step_timed_out":
        with open(tmp_path / "steps.tsv", "a") as f:
            f.write("workloads\t124\t150\t150\tworkloads\n")
    rc = report.main([str(tmp_path)])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert rc == (0 if case == "clean" else 1) and result["ok"] == (case == "clean")
    assert md.startswith("# GPU check: " + ("PASSED" if case == "clean" else "FAILED"))
    if case == "skipped":
        assert "1 skipped (a skip is not a pass)" in md
    if case == "step_timed_out":
        assert "step workloads timed out" in md
    group = result["kernel_suite"][0]
    assert group["speedup_vs"]["eager"] == pytest.approx(4.0)
    target = result["bandwidth_target"]
    assert target["rows"][0]["met"] is True and target["rows"][0]["judged_on"] == "kernel"  # 75% >= 70%
    assert target["rows"][0]["op_pipelined_fraction"] == 0.55
    assert [r.get("missing") for r in target["rows"][1:]] == [True, True] and target["met"] is False
    assert "9.0x" in md and "NVIDIA H200" in md and "5.0x" in md  # ours 50 pairs/s vs TRL's 10
