"""Helpers shared by the benchmarks: median timing after warm-up, the machine description, result files.

Whole-workload scripts record where they ran with ``machine_info()`` and write their results with
``write_results(name, results)`` (JSON under benchmarks/_out/, machine info included); the pytest-benchmark
kernel suite (test_bench_ops.py) puts the same machine dict into its saved runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_out")


def timeit(fn, *, warmup: int = 2, reps: int = 10, min_time: float = 0.0) -> float:
    """Median seconds per call of fn() (after warm-up)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_peak_flops(dtype, device="cpu", m: int = 4096, k: int = 576, n: int = 1536, seconds: float = 1.0) -> float:
    """Peak FLOP/s of one (m, k) x (k, n) matmul in ``dtype`` on ``device``: the fastest of the calls made
    over ``seconds`` after as long a warm-up (the first calls build kernels and ramp the clock: a median of
    ten read 0.52-0.87x the peak here). The GEMM bound a backbone's linear layers can reach on these shapes,
    for "fraction of the bound" next to a throughput. Default: a SmolLM2-135M MLP projection, 4096 tokens."""
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    for phase in (0, 1):  # warm-up, then measure
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            if phase:
                best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_rev() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or "?"
        )
    except OSError:
        return "?"


def machine_info() -> dict:
    """Where a benchmark ran: CPU model, cores, load average, torch / triton / transformers versions, git
    revision, and the CUDA device (name, memory, capability) when one is visible."""
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_rev": git_rev(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
    }
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            gpu_capability=f"{p.major}.{p.minor}",
            gpu_multiprocessors=p.multi_processor_count,
        )
    return info


def machine() -> str:
    """One line for a log header (the same facts as machine_info())."""
    m = machine_info()
    return (
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"{m['device'] if m['device'] != 'cpu' else 'no GPU'}, Python {m['python']}"
    )


def write_results(name: str, results: dict, out_dir: str | None = None) -> str:
    """Writes {"name", "machine", **results} as <out_dir or benchmarks/_out>/<name>.json; returns the path."""
    out_dir = out_dir or OUT_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"name": name, "machine": machine_info(), **results}, f, indent=1, default=str)
    return path
