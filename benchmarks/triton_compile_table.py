"""Compile every Triton kernel at every launch configuration for Hopper (sm_90) and Ampere (sm_80) on a machine
without a GPU, and tabulate what the compiler allocated: registers per thread, spills, shared memory, and the
occupancy those allow on an H100 / A100.

    python benchmarks/triton_compile_table.py                      # Markdown summary on stdout (2 workers)
    python benchmarks/triton_compile_table.py --full               # one line per compilation
    python benchmarks/triton_compile_table.py --arch 90 --kernels _bt_loss_fwd_kernel --json out.json

How the configurations are found (nothing is listed by hand): the launchers of optimas_fast/ops/_triton.py run
on empty CPU tensors over every *shape class* -- one shape per distinct answer of the launch helpers in
kernels/_utils.py (block sizes, warps, grid splits) crossed with Triton's own specialisation of integer
arguments (1 becomes a constant, multiples of 16 carry a divisibility hint) -- for every dtype the ops accept
(float32, bfloat16, float16), every optional input present or absent, and caller tensors both 16-byte aligned
and not. A hook on Triton's JIT (``knobs.runtime.jit_cache_hook``) records the exact (signature, constants,
attributes, options) each launch would compile and stops it there: nothing runs. The distinct records are then
compiled with ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``.

Why in worker processes: under TRITON_INTERPRET=1 (the CPU test suite) ``@triton.jit`` builds interpreter
objects that cannot be compiled, and the setting is read when the kernel modules are imported; each worker
starts without it, imports the kernels as real ``JITFunction``s, and compiles its share (workers split the
list; each also gets a private, empty Triton cache so that every configuration is really compiled and its ptxas
report is read).

Where the numbers come from: registers, stack and spill bytes from the ``ptxas -v`` report of Triton's own
ptxas run (the ptxas Triton ships: CUDA 12.9 for sm_80, 13.x for sm_90a; captured with TRITON_DUMP_PTXAS_LOG);
shared memory from the compiled kernel's metadata (``metadata.shared``, Triton's dynamic shared allocation).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import triton
from optimas_fast.kernels._utils import row_block, row_launch, segment_launch, sorted_rows_launch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import KernelInterface

from optimas_fast.kernels import bt_loss as _bt_loss_mod
from optimas_fast.kernels import fused_head_bt as _fused_mod
from optimas_fast.kernels import last_token as _last_token_mod
from optimas_fast.kernels import multihead as _multihead_mod
from optimas_fast.ops import _triton

# name -> (GPU this target stands for, its multiprocessor count: the sorted fused kernel's grid depends on it)
TARGETS = {90: ("H100 SXM", 132), 80: ("A100", 108)}
DTYPES = ("float32", "bfloat16", "float16")  # the hidden-state dtypes the fast backends take

# Per-SM limits of the occupancy calculation (sm_80 and sm_90 alike, CUDA occupancy calculator rules):
# 65,536 32-bit registers, allocated per warp in units of 256; at most 64 resident warps (2,048 threads) and
# 32 blocks; shared memory 228 KiB (H100; A100 164 KiB) of which 1 KiB per block is reserved by the system.
SM_LIMITS = {
    90: dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=228 * 1024, smem_block_reserved=1024),
    80: dict(regs=65536, reg_unit=256, warps=64, blocks=32, smem=164 * 1024, smem_block_reserved=1024),
}

# Shape sweeps: the ops take any H >= 1 and any number of rows; the helpers' answers only change below these
# bounds (they cap at 4096 columns, 1024 rows and a split of 64), which the sweep checks by going 16x past them.
SWEEP_H = 1 << 16
SWEEP_ROWS = 1 << 16
SWEEP_T = 64
MAX_HEADS = 64

# What every configuration must reach on both targets (tests/test_triton_compile.py checks it): no spills, and
# at least half of an SM's warp slots resident -- these kernels stream rows from HBM and need warps in flight.
MIN_OCCUPANCY = 0.5


def occupancy(regs: int, shared: int, num_warps: int, arch: int = 90) -> dict:
    """Resident blocks and warps per SM for one kernel (the CUDA occupancy calculator's formula):
    warps per block W = num_warps; registers per warp = ceil(regs * 32 / 256) * 256;
    blocks by registers = floor(65536 / (W * registers per warp)) (registers are granted per warp);
    blocks by warps = floor(64 / W); blocks by shared = floor(smem / (shared + 1 KiB)) (no limit when shared = 0);
    blocks = min(those, 32); occupancy = blocks * W / 64."""
    lim = SM_LIMITS[arch]
    per_warp = -(-regs * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by_regs = lim["regs"] // (num_warps * per_warp) if per_warp else lim["blocks"]
    by_warps = lim["warps"] // num_warps
    by_smem = lim["smem"] // (shared + lim["smem_block_reserved"]) if shared else lim["blocks"]
    blocks = min(by_regs, by_warps, by_smem, lim["blocks"])
    limiter = min((by_regs, "registers"), (by_warps, "warps"), (by_smem, "shared"), (lim["blocks"], "blocks"))[1]
    return dict(blocks=blocks, warps=blocks * num_warps, occupancy=blocks * num_warps / lim["warps"], limiter=limiter)


# ------------------------------------------------------------------------------------------------------------
# Shape classes (pure Python: the launch helpers and Triton's integer specialisation rule)
# ------------------------------------------------------------------------------------------------------------
def int_class(v: int) -> str:
    """Triton's specialisation of an integer kernel argument: 1 is compiled in as a constant, a multiple of 16
    carries tt.divisibility=16, anything else is a plain i32 (values >= 2**31 become i64: not swept)."""
    return "1" if v == 1 else "D" if v % 16 == 0 else "i"


def _first_per_class(values, key):
    seen: dict = {}
    for v in values:
        seen.setdefault(key(v), v)
    return list(seen.values())


def hidden_classes() -> dict:
    """H values grouped by launch choice: {(row launch, segment block, one-pass fused kernel or not): [one H per
    Triton class of H]}."""
    groups: dict = {}
    for H in range(1, SWEEP_H + 1):
        rl, sl = row_launch(H), sorted_rows_launch(1, H, 1)
        reps = groups.setdefault((rl, segment_launch(1, 1, H)[::2], sl[2:], H <= rl.block_h), {})
        reps.setdefault(int_class(H), H)
    return {k: list(v.values()) for k, v in groups.items()}


def row_classes(multiprocessors: int) -> dict:
    """Batch sizes grouped by the bt_loss block: {row_block: [one B per (B's class, the sorted-rows launch's
    ROWS_PER_PROGRAM class)]}."""
    groups: dict = {}
    for B in range(1, SWEEP_ROWS + 1):
        sl = sorted_rows_launch(B, 16, multiprocessors)
        groups.setdefault(row_block(B), {}).setdefault((int_class(B), int_class(sl.rows_per_program)), B)
    return {k: list(v.values()) for k, v in groups.items()}


def rows_and_heads() -> list[tuple[int, int]]:
    """One (rows N, heads C) per class of the segmented reduction's SPLIT argument."""
    pairs = ((N, C) for C in (1, 2, 3, MAX_HEADS) for N in range(1, SWEEP_ROWS + 1))
    return _first_per_class(pairs, lambda p: int_class(segment_launch(p[0], p[1], 16).split))


def seq_lengths() -> list[int]:
    return _first_per_class(range(1, SWEEP_T + 1), int_class)


# ------------------------------------------------------------------------------------------------------------
# Recording the launches (worker side: TRITON_INTERPRET unset, a stand-in driver for the target)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str  # the kernel's function name
    fn: object  # its JITFunction
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # (index,) -> value
    attrs: dict  # (index,) -> [["tt.divisibility", 16]], ...
    options: dict  # num_warps, num_stages, num_ctas, enable_fp_fusion

    def key(self):
        return (
            self.kernel,
            tuple(self.signature.items()),
            tuple(sorted(self.constexprs.items())),
            repr(sorted(self.attrs.items())),
            tuple(sorted(self.options.items())),
        )

    def fields(self) -> dict:
        """The configuration as data: the kernel's own constexprs (the launcher's choices), the Triton class of
        each integer argument ("1": compiled in as a constant, "D": multiple of 16, "i": neither), whether every
        pointer carries the 16-byte alignment hint, the data dtype (the half type if any, else fp32)."""
        choice, ints, aligned = {}, {}, []
        for i, (name, ty) in enumerate(self.signature.items()):
            if self.fn.params[i].is_constexpr:
                choice[name] = self.constexprs[(i,)]
            elif ty == "constexpr":  # an integer argument equal to 1
                ints[name] = "1"
            elif ty.startswith("*"):
                aligned.append(bool(self.attrs.get((i,))))
            elif ty in ("i32", "i64"):
                ints[name] = "D" if self.attrs.get((i,)) else "i"
        halves = sorted({ty[1:] for ty in self.signature.values() if ty in ("*bf16", "*fp16")})
        return dict(
            choice=choice,
            ints=ints,
            aligned=all(aligned),
            dtype=halves[0] if halves else "fp32",
            num_warps=self.options["num_warps"],
        )

    def describe(self) -> str:
        f = self.fields()
        consts = ", ".join(f"{k}={v}" for k, v in f["choice"].items())
        ints = ", ".join(f"{k}={'1' if c == '1' else '16k' if c == 'D' else 'n'}" for k, c in f["ints"].items())
        return (
            f"{f['dtype']}; {consts}; warps={f['num_warps']}; {ints}{'; ' if ints else ''}"
            f"{'aligned' if f['aligned'] else 'unaligned'}"
        )


class _StandInDriver:
    """Answers the JIT's questions about "the current GPU" with the target's; never launches (the hook stops
    every launch before compilation)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _tensor(shape, dtype, aligned: bool):
    """Uninitialised (nothing runs); unaligned = one element past the allocation's 16-byte-aligned start."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.empty(n + (0 if aligned else 1), dtype=dtype)
    return (flat if aligned else flat[1:]).view(shape)


def _ids(n: int, C: int, aligned: bool):
    ids = _tensor((n,), torch.int64, aligned)
    ids.copy_(torch.arange(n) % C)  # every head present: the sorted kernel flushes between heads
    return ids


class _Cycle:
    """Hands out the variants of a launcher's non-choice dimensions in turn (the Triton class of each integer
    argument, tensor alignment), so that over the launcher's choices every variant comes up (checked by the
    test from the compiled signatures) without crossing them all with every choice."""

    def __init__(self, *dims):
        self.variants = list(itertools.product(*dims))
        self.i = 0

    def __call__(self):
        v = self.variants[self.i % len(self.variants)]
        self.i += 1
        return v


def _drive_launchers(T, multiprocessors: int):
    """Calls every launcher in optimas_fast.ops._triton once per launch choice -- the product of the launch
    helpers' distinct answers (block, warps; via the H and batch-size classes), the dtypes and the optional
    inputs -- with the integer classes and the alignment cycled over those calls."""
    Hs, Bs, NCs, Ts = hidden_classes(), row_classes(multiprocessors), rows_and_heads(), seq_lengths()
    aligns = (True, False)
    flags2 = list(itertools.product((False, True), repeat=2))
    f32 = lambda al, *s: _tensor(s, torch.float32, al)  # noqa: E731
    # bt_loss: choices = row block x dtype x (weight, margin); variants = B's classes x alignment
    cyc = {blk: _Cycle(range(len(reps)), aligns) for blk, reps in Bs.items()}
    for blk, reps in Bs.items():
        for dt in DTYPES:
            for has_w, has_mu in flags2:
                k, al = cyc[blk]()
                rc, rr, w, mu = (_tensor((reps[k % len(reps)],), getattr(torch, dt), al) for _ in range(4))
                T.bt_loss_rows(rc, rr, w if has_w else None, mu if has_mu else None, 0.1)
    # multihead: choices = H launch class x dtype; variants = H's classes x split classes x alignment
    all_B = [B for reps in Bs.values() for B in reps]
    cyc_mh, cyc_split = _Cycle(range(3), NCs, aligns), _Cycle(range(3), NCs, aligns)
    cyc_lt = _Cycle(range(3), Ts, aligns)
    cyc_fused = {grad: _Cycle(range(3), all_B, aligns) for grad in (False, True)}  # one per kernel path
    for hkey, hreps in Hs.items():
        for dt_name in DTYPES:
            dt = getattr(torch, dt_name)
            k, (N, C), al = cyc_mh()
            H = hreps[k % len(hreps)]
            hid, ids, W, b = _tensor((N, H), dt, al), _ids(N, C, al), f32(al, C, H), f32(al, C)
            T.multihead_score_fwd(hid, ids, W, b)
            T.multihead_score_bwd(hid, ids, W, f32(al, N), True, True, True)
            # fused loss: choices x (weight, margin, gradients); variants = H's, B's (and ROWS_PER_PROGRAM's)
            # classes x alignment; the two-kernel path's dW reduction also over the split classes
            for has_w, has_mu in flags2:
                for grad in (False, True):
                    k, B, al = cyc_fused[grad]()
                    H = hreps[k % len(hreps)]
                    C = 3
                    hc, hr, ids = _tensor((B, H), dt, al), _tensor((B, H), dt, al), _ids(B, C, al)
                    T.fused_head_bt(
                        hc,
                        hr,
                        ids,
                        f32(al, C, H),
                        f32(al, C),
                        f32(al, B) if has_w else None,
                        f32(al, B) if has_mu else None,
                        0.1,
                        1.0 / B,
                        grad,
                    )
            k, (N, C), al = cyc_split()
            H = hreps[k % len(hreps)]
            if H > hkey[0].block_h:
                hc, ids = _tensor((N, H), dt, al), _ids(N, C, al)
                T.fused_head_bt(hc, hc, ids, f32(al, C, H), f32(al, C), None, None, 0.0, 1.0, True)
            # last token: choices = H launch class x dtype; variants = H's and T's classes x alignment
            k, Tl, al = cyc_lt()
            H = hreps[k % len(hreps)]
            pos = _tensor((3,), torch.int64, al)
            pos.fill_(Tl - 1)
            T.last_token_fwd(_tensor((3, Tl, H), dt, al), pos)
            T.last_token_bwd(_tensor((3, H), dt, al), pos, Tl)


# The kernels of kernels/*.py (device helpers such as _bt_row_terms are compiled inside them).
KERNELS = sorted(
    name
    for mod in (_bt_loss_mod, _fused_mod, _last_token_mod, _multihead_mod)
    for name, obj in vars(mod).items()
    if isinstance(obj, KernelInterface) and name.endswith("_kernel")
)

# The launchers the sweep above calls (one line each: what they run).
LAUNCHERS = {
    "bt_loss_rows": "_bt_loss_fwd_kernel",
    "multihead_score_fwd": "_multihead_fwd_kernel",
    "multihead_score_bwd": "_multihead_dx_kernel, _segment_dw_kernel",
    "fused_head_bt": "_fused_head_bt_kernel or _fused_head_bt_sorted_kernel (+ _segment_dw_kernel)",
    "last_token_fwd": "_last_token_fwd_kernel",
    "last_token_bwd": "_last_token_bwd_kernel",
}


def record_launches(arch: int) -> list[Launch]:
    """Every distinct compilation the launchers ask for on this target, in a stable order. Worker side only."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "record_launches: TRITON_INTERPRET=1 makes @triton.jit build interpreter objects; "
            "run it in a worker without it (compile_all does)"
        )
    found: dict = {}

    def hook(*, fn, compile, **_):  # Triton also passes key, repr, is_manual_warmup, already_compiled
        opts = {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
        lc = Launch(fn.name, fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0], opts)
        found.setdefault(lc.key(), lc)
        return True  # stop here: skip compilation and the launch

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    triton.runtime.driver.set_active(_StandInDriver(arch))
    mp = _triton._multiprocessors
    _triton._multiprocessors = lambda device: TARGETS[arch][1]  # the sorted kernel's grid is per SM
    try:
        _drive_launchers(_triton, TARGETS[arch][1])
    finally:
        _triton._multiprocessors = mp
        knobs.runtime.jit_cache_hook = previous
    return sorted(found.values(), key=lambda lc: repr(lc.key()))


# ------------------------------------------------------------------------------------------------------------
# Compiling and reading the resource report
# ------------------------------------------------------------------------------------------------------------
_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_launch(lc: Launch, arch: int) -> dict:
    """Compiles one configuration for one target; returns its resource use (or the compiler's error)."""
    row = dict(kernel=lc.kernel, config=lc.describe(), arch=arch, **lc.fields())
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report; read it from stdout
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(
                ASTSource(lc.fn, lc.signature, lc.constexprs, lc.attrs),
                target=GPUTarget("cuda", arch, 32),
                options=dict(lc.options),
            )
    except Exception as e:  # noqa: BLE001 -- any compiler failure is reported, with the configuration
        row["error"] = f"{type(e).__name__}: {e}"[:4000]
        return row
    row["seconds"] = round(time.perf_counter() - t0, 3)
    text = log.getvalue()
    for name, pat in _PTXAS.items():
        m = pat.search(text)
        if m is None:
            row["error"] = f"no '{name}' in the ptxas report:\n{text[-2000:]}"
            return row
        row[name] = int(m.group(1))
    row["shared"] = int(k.metadata.shared)
    row.update(occupancy(row["regs"], row["shared"], row["num_warps"], arch))
    return row


def _worker(part: int, parts: int, archs: list[int], kernels: set | None = None) -> list[dict]:
    if parts % len(archs) == 0:
        # each target's compilations go to their own workers, so that a worker records one target's launches
        per = parts // len(archs)
        archs, part, parts = [archs[part // per]], part % per, per
    rows = []
    items = [(arch, lc) for arch in archs for lc in record_launches(arch) if not kernels or lc.kernel in kernels]
    for i, (arch, lc) in enumerate(items):
        if i % parts == part:
            rows.append(compile_launch(lc, arch))
    return rows


def compile_all(archs=(90, 80), workers: int = 2, kernels=None, timeout: float = 1800) -> list[dict]:
    """Every configuration compiled for every target (or only those of the named kernels), split over
    `workers` processes (each with TRITON_INTERPRET unset and its own empty Triton cache); rows in a stable
    order."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated
    procs = []
    with tempfile.TemporaryDirectory(prefix="triton-compile-") as tmp:
        for part in range(workers):
            wenv = dict(env, TRITON_CACHE_DIR=os.path.join(tmp, f"cache{part}"))
            out = os.path.join(tmp, f"part{part}.json")
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                f"{part}/{workers}",
                "--arch",
                ",".join(map(str, archs)),
                "--json",
                out,
            ]
            cmd += ["--kernels", ",".join(kernels)] if kernels else []
            # stderr to a file, not a pipe: a worker that writes much while another is awaited cannot block
            with open(out + ".err", "w") as err:
                procs.append((subprocess.Popen(cmd, env=wenv, cwd=root, stdout=subprocess.DEVNULL, stderr=err), out))
        rows = []
        for p, out in procs:
            p.wait(timeout=timeout)
            if p.returncode != 0:
                with open(out + ".err") as f:
                    raise RuntimeError(f"compile worker failed (exit {p.returncode}):\n{f.read()[-4000:]}")
            with open(out) as f:
                rows += json.load(f)
    return sorted(rows, key=lambda r: (-r["arch"], r["kernel"], r["config"]))


# ------------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------------
def _span(values, fmt=str) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def summary(rows: list[dict]) -> str:
    """One line per (kernel, block, warps): the ranges over its dtypes, optional inputs, integer classes and
    alignment, for each target side by side."""
    groups: dict = {}
    for r in rows:
        blk = r["choice"].get("BLOCK_H", r["choice"].get("BLOCK"))
        groups.setdefault((r["kernel"], blk, r["num_warps"]), []).append(r)
    archs = sorted({r["arch"] for r in rows}, reverse=True)
    head = "| kernel | BLOCK | warps | configs |" + "".join(
        f" sm_{a} regs | sm_{a} spill st/ld (B) | sm_{a} shared (B) | sm_{a} occupancy |" for a in archs
    )
    out = [head, "|---|---:|---:|---:|" + "---:|---:|---:|---|" * len(archs)]
    for (kernel, blk, nw), rs in sorted(groups.items()):
        line = f"| `{kernel}` | {blk} | {nw} | {len(rs) // len(archs)} |"
        for a in archs:
            ok = [r for r in rs if r["arch"] == a and "error" not in r]
            if len(ok) < len([r for r in rs if r["arch"] == a]):
                line += " compile error | | | |"
                continue
            worst = min(ok, key=lambda r: r["occupancy"])
            line += (
                f" {_span([r['regs'] for r in ok])} | {max(r['spill_stores'] for r in ok)}/"
                f"{max(r['spill_loads'] for r in ok)} | {_span([r['shared'] for r in ok])} | "
                f"{_span([r['occupancy'] for r in ok], lambda v: f'{v:.0%}')}"
                f"{' (' + worst['limiter'] + ')' if worst['occupancy'] < 1 else ''} |"
            )
        out.append(line)
    return "\n".join(out)


def markdown(rows: list[dict]) -> str:
    """One line per compilation."""
    out = [
        "| target | kernel | configuration | regs/thread | spill st/ld (B) | shared (B) | blocks/SM | "
        "occupancy (limiter) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| sm_{r['arch']} | `{r['kernel']}` | {r['config']} | compile error | | | | |")
            continue
        out.append(
            f"| sm_{r['arch']} | `{r['kernel']}` | {r['config']} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['blocks']} | "
            f"{r['occupancy']:.0%} ({r['limiter']}) |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    ap.add_argument("--workers", type=int, default=2, help="compiler processes (default 2)")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument(
        "--full",
        action="store_true",
        help="one table line per compilation (default: one per kernel, block and warps, with ranges over the rest)",
    )
    ap.add_argument("--kernels", help="only these kernels, comma-separated (e.g. _bt_loss_fwd_kernel)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # "part/parts": internal, one compile worker
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    for a in archs:
        if a not in TARGETS:
            ap.error(f"--arch: {a} is not one of {sorted(TARGETS)}")
    kernels = set(args.kernels.split(",")) if args.kernels else None
    if kernels and kernels - set(KERNELS):
        ap.error(f"--kernels: unknown {sorted(kernels - set(KERNELS))}; the kernels are {', '.join(KERNELS)}")
    if args.worker:
        part, parts = (int(x) for x in args.worker.split("/"))
        rows = _worker(part, parts, archs, kernels)
        with open(args.json, "w") as f:
            json.dump(rows, f)
        return 0
    t0 = time.perf_counter()
    rows = compile_all(archs, args.workers, kernels)
    wall = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows) if args.full else summary(rows))
    print(
        f"\n{len(rows)} compilations, {sum('error' in r for r in rows)} failed, {wall:.0f} s with "
        f"{args.workers} workers",
        file=sys.stderr,
    )
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
