"""pytest-benchmark set-up for the kernel suite (benchmarks/test_bench_ops.py).

    pip install -e ".[bench]"
    python -m pytest benchmarks/ --benchmark-only                          # CPU: small + medium shapes
    python -m pytest benchmarks/ --benchmark-only -k small                 # the quick subset
    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave     # saved under .benchmarks/
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare      # against the last saved run

Nothing here runs in the normal test suite (pyproject's testpaths = ["tests"]). The Triton kernels run on
CUDA only here: unlike tests/conftest.py this file never sets TRITON_INTERPRET (interpreted timings mean
nothing).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from _common import machine_info as optimas_machine_info


def pytest_benchmark_update_machine_info(config, machine_info):
    # pytest-benchmark's own machine dict (CPU, Python) gains ours: torch/triton versions, git revision,
    # load average, the CUDA device. Saved with --benchmark-autosave, shown by --benchmark-compare.
    machine_info["optimas_fast"] = optimas_machine_info()


def measure_copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy (a torch clone of a large buffer), counting bytes read plus bytes
    written: the ceiling a memory-bound op can approach on this device."""
    if device == "cuda":
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)  # 1 GiB, not zeros
        for _ in range(3):
            src.clone()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst = src.clone()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            del dst
        return 2 * src.numel() / statistics.median(times)
    # CPU: 256 MiB, well past the last-level cache
    src = torch.rand(64 << 20, dtype=torch.float32)
    src.clone()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        src.clone()
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


@pytest.fixture(scope="session")
def copy_bandwidth():
    """copy_bandwidth(device) -> bytes/s, measured once per session and device."""
    cache: dict[str, float] = {}

    def get(device: str) -> float:
        if device not in cache:
            cache[device] = measure_copy_bandwidth(device)
        return cache[device]

    return get


def pytest_configure(config):
    # Every (shape, dtype, grad) variant of one reference function is a dynamo recompile of the same code
    # object: lift the default limit (8) so no baseline silently falls back to eager after the 8th.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
