"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) at every configuration its launcher can
choose, on this CPU-only machine, and none of them spills or falls below half occupancy.

The CPU suite runs Triton under TRITON_INTERPRET=1 (tests/conftest.py), which makes ``@triton.jit`` build
interpreter objects that cannot be compiled; benchmarks/triton_compile_table.py compiles in two worker
processes started without it (each imports the kernels as real JITFunctions), so the setting stays as it is
for every other test. The configurations come from running the launchers themselves over the launch
helpers' shape classes (see that module); the checks below derive the expected set from the helpers
independently, so a new launch choice that the sweep misses fails here by name.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
from triton.runtime.jit import KernelInterface

from optimas_fast.kernels import _utils as lu
from optimas_fast.ops import _triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = (90, 80)
DTYPES = {"fp32", "bf16", "fp16"}


def _load_table():
    spec = importlib.util.spec_from_file_location(
        "_bench_triton_compile_table", os.path.join(ROOT, "benchmarks", "triton_compile_table.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


table = _load_table()


@pytest.fixture(scope="module")
def compiled():
    """All compilations for both targets (884; ~100 s of CPU: about a minute on 2 idle cores, more when shared)."""
    return table.compile_all(TARGETS, workers=2)


def _rows(compiled, kernel, arch=None):
    return [r for r in compiled if r["kernel"] == kernel and (arch is None or r["arch"] == arch)]


def test_every_configuration_compiles(compiled):
    bad = [f"sm_{r['arch']} {r['kernel']} [{r['config']}]:\n{r['error']}" for r in compiled if "error" in r]
    assert not bad, f"{len(bad)} configuration(s) fail to compile:\n" + "\n\n".join(bad[:5])
    assert {r["arch"] for r in compiled} == set(TARGETS)


def test_no_configuration_spills_or_starves_the_sm(compiled):
    bad = [
        f"sm_{r['arch']} {r['kernel']} [{r['config']}]: {r['regs']} registers, spill {r['spill_stores']}/"
        f"{r['spill_loads']} B, stack {r['stack']} B, shared {r['shared']} B -> occupancy {r['occupancy']:.0%} "
        f"({r['limiter']})"
        for r in compiled
        if "error" not in r
        and (r["spill_stores"] or r["spill_loads"] or r["stack"] or r["occupancy"] < table.MIN_OCCUPANCY)
    ]
    assert not bad, (
        f"{len(bad)} configuration(s) spill or stay under {table.MIN_OCCUPANCY:.0%} occupancy "
        "(fix the launch settings in kernels/_utils.py):\n" + "\n".join(bad[:20])
    )


def test_every_launcher_is_driven():
    public = {
        n
        for n, f in vars(_triton).items()
        if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == _triton.__name__
    }
    assert public == set(table.LAUNCHERS), (
        f"launchers in optimas_fast/ops/_triton.py not driven by benchmarks/triton_compile_table.py "
        f"(add them to _drive_launchers and LAUNCHERS): {sorted(public - set(table.LAUNCHERS))}; "
        f"gone: {sorted(set(table.LAUNCHERS) - public)}"
    )


def test_every_kernel_is_compiled_for_both_targets(compiled):
    # every module of kernels/ (a new one must be driven too), imported as the package installs it
    modules = [
        importlib.import_module(f"optimas_fast.kernels.{os.path.basename(f)[:-3]}")
        for f in glob.glob(os.path.join(ROOT, "kernels", "*.py"))
        if not os.path.basename(f).startswith("_")
    ]
    kernels = {
        n for m in modules for n, v in vars(m).items() if isinstance(v, KernelInterface) and n.endswith("_kernel")
    }
    assert len(kernels) == 8, kernels  # the kernels of kernels/*.py (device helpers such as _bt_row_terms excluded)
    assert set(table.KERNELS) == kernels
    for arch in TARGETS:
        assert {r["kernel"] for r in compiled if r["arch"] == arch} == kernels


def _choices(rows, *names):
    return {(r["dtype"], r["num_warps"]) + tuple(r["choice"][n] for n in names) for r in rows}


def test_every_launch_helper_choice_is_compiled(compiled):
    """Expected sets from the helpers over the shape ranges the ops take (any H >= 1, any batch), crossed
    with the dtypes and optional inputs; each must appear among the compiled configurations."""
    Hs = range(1, table.SWEEP_H + 1)
    row = {lu.row_launch(H) for H in Hs}
    looped = {lu.row_launch(H) for H in Hs if H > lu.row_launch(H).block_h}  # the two-kernel fused path
    sorted_ = {lu.sorted_rows_launch(1, H, 1)[2:] for H in Hs if H <= lu.row_launch(H).block_h}
    seg = {lu.segment_launch(1, 1, H) for H in Hs}
    seg_b = {lu.segment_launch(1, 1, H) for H in Hs if H > lu.row_launch(H).block_h}
    blocks = {lu.row_block(B) for B in range(1, table.SWEEP_ROWS + 1)}
    tf = (False, True)
    for arch in TARGETS:
        want = {
            "_bt_loss_fwd_kernel": (
                {("fp32", lu.elementwise_warps(b), w, m, b) for b in blocks for w in tf for m in tf},
                ("HAS_W", "HAS_MU", "BLOCK"),
            ),
            "_multihead_fwd_kernel": ({(d, lc.num_warps, lc.block_h) for d in DTYPES for lc in row}, ("BLOCK_H",)),
            "_multihead_dx_kernel": ({(d, lc.num_warps, lc.block_h) for d in DTYPES for lc in row}, ("BLOCK_H",)),
            "_last_token_fwd_kernel": ({(d, lc.num_warps, lc.block_h) for d in DTYPES for lc in row}, ("BLOCK_H",)),
            "_last_token_bwd_kernel": ({(d, lc.num_warps, lc.block_h) for d in DTYPES for lc in row}, ("BLOCK_H",)),
            "_segment_dw_kernel": (
                {(d, lc.num_warps, False, lc.block_h) for d in DTYPES for lc in seg}
                | {(d, lc.num_warps, True, lc.block_h) for d in DTYPES for lc in seg_b},
                ("HAS_B", "BLOCK_H"),
            ),
            "_fused_head_bt_kernel": (
                {(d, lc.num_warps, w, m, False, lc.block_h) for d in DTYPES for lc in row for w in tf for m in tf}
                | {(d, lc.num_warps, w, m, True, lc.block_h) for d in DTYPES for lc in looped for w in tf for m in tf},
                ("HAS_W", "HAS_MU", "GRAD", "BLOCK_H"),
            ),
            "_fused_head_bt_sorted_kernel": (
                {(d, nw, w, m, blk) for d in DTYPES for blk, nw in sorted_ for w in tf for m in tf},
                ("HAS_W", "HAS_MU", "BLOCK_H"),
            ),
        }
        for kernel, (expected, names) in want.items():
            got = _choices(_rows(compiled, kernel, arch), *names)
            missing = expected - got
            assert not missing, (
                f"sm_{arch} {kernel}: launch choices (dtype, warps, {', '.join(names)}) never "
                f"compiled: {sorted(missing)[:10]}"
            )


def test_every_integer_class_and_alignment_is_compiled(compiled):
    """Triton compiles an integer argument equal to 1 as a constant and a multiple of 16 with a divisibility
    hint, and 16-byte-aligned pointers with an alignment hint: each class of each integer argument, and
    aligned and unaligned tensors, must be compiled at least once per kernel and target."""
    for arch in TARGETS:
        for kernel in {r["kernel"] for r in compiled}:
            rows = _rows(compiled, kernel, arch)
            assert {r["aligned"] for r in rows} == {True, False}, (arch, kernel)
            for name in rows[0]["ints"]:
                seen = {r["ints"][name] for r in rows}
                assert seen == {"1", "D", "i"}, f"sm_{arch} {kernel}: {name} compiled only as {sorted(seen)}"


def test_occupancy_formula():
    # 32 registers x 4 warps: registers allow 16 blocks, warps 16, the block limit 32: 64 warps, 100%
    assert table.occupancy(32, 0, 4) == dict(blocks=16, warps=64, occupancy=1.0, limiter="registers")
    # 104 registers x 16 warps: 3328 registers a warp (104*32 rounded up to 256), 65536 // (16*3328) = 1 block
    assert table.occupancy(104, 64, 16)["blocks"] == 1
    assert table.occupancy(104, 64, 16)["occupancy"] == 0.25
    # shared memory limits: 100 KiB a block (+1 KiB reserved) -> 2 blocks of 4 warps on sm_90, 1 on sm_80
    assert table.occupancy(16, 100 * 1024, 4, 90)["blocks"] == 2
    assert table.occupancy(16, 100 * 1024, 4, 80)["blocks"] == 1
    assert table.occupancy(16, 100 * 1024, 4, 80)["limiter"] == "shared"


def test_markdown_table_names_every_row(compiled):
    md = table.markdown(compiled[:3])
    assert md.count("\n") == 4 and all(r["kernel"] in md for r in compiled[:3])


def test_summary_has_one_line_per_kernel_block_and_warps(compiled):
    md = table.summary(compiled)
    groups = {(r["kernel"], r["choice"].get("BLOCK_H", r["choice"].get("BLOCK")), r["num_warps"]) for r in compiled}
    assert md.count("\n") == len(groups) + 1
    assert "sm_90 regs" in md and "sm_80 regs" in md and "compile error" not in md


def test_the_script_rejects_unknown_targets_and_kernels():
    script = os.path.join(ROOT, "benchmarks", "triton_compile_table.py")
    p = subprocess.run([sys.executable, script, "--arch", "75"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--arch: 75" in p.stderr
    p = subprocess.run(
        [sys.executable, script, "--arch", "90", "--kernels", "_bt_loss_fwd_kernel,no_such_kernel"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "--kernels: unknown ['no_such_kernel']" in p.stderr, p.stderr[-2000:]
