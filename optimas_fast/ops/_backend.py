"""Which backend runs an op: `torch` (reference, any device), `cpp` (CPU tensors, OpenMP), `triton`
(CUDA tensors; CPU tensors only under TRITON_INTERPRET=1). OPTIMAS_FAST_BACKEND or a per-call
`backend=` forces one; `auto` picks the fastest one available for the tensors' device and dtype.
Nothing here touches a GPU at import time."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from optimas_fast._native import native, native_available

BACKENDS = ("torch", "cpp", "triton")
ENV = "OPTIMAS_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was forced (env or argument) but cannot run these tensors on this machine."""


def requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV, "auto")
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        src = "backend" if backend is not None else ENV
        raise ValueError(f"{src}: unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    return name


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status(device_type: str) -> tuple[bool, str]:
    if not _triton_importable():
        return False, "triton is not installed"
    if device_type == "cuda":
        if _interpret():
            return False, "TRITON_INTERPRET=1 is set: Triton runs interpreted, CUDA tensors are not supported"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, "triton on CUDA"
    if device_type == "cpu":
        if _interpret():
            return True, "triton interpreter (TRITON_INTERPRET=1), for testing: slow"
        return False, "Triton runs on CUDA tensors; on CPU tensors only with TRITON_INTERPRET=1"
    return False, f"Triton does not run on {device_type} tensors"


def cpp_status(device_type: str) -> tuple[bool, str]:
    if device_type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, got {device_type} tensors"
    if not native_available():
        try:
            native()
        except ImportError as e:
            return False, str(e)
    return True, f"C++/OpenMP, {native().max_threads()} threads"


def select(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend that runs an op on tensors of this device/dtype (raises if a forced one can't).

    Called on every op call, so the answer is cached per (request, device type, dtype, TRITON_INTERPRET):
    what it depends on besides them (installed packages, the native library, CUDA's presence) is fixed for
    a process. Why: the status checks cost ~10 us a call, a third of a whole bt_loss at B = 4096 on CPU."""
    return _select(requested(backend), device.type, dtype, _interpret())


@functools.lru_cache(maxsize=256)
def _select(name: str, dev: str, dtype: torch.dtype, interpret: bool) -> str:
    if name == "auto":
        # float64 goes to the reference: the fast kernels compute in float32 and would silently lose
        # precision.
        if dtype == torch.float64:
            return "torch"
        if dev == "cuda" and triton_status("cuda")[0]:
            return "triton"
        if dev == "cpu" and cpp_status("cpu")[0]:
            return "cpp"
        return "torch"
    if name == "torch":
        return name
    ok, why = (cpp_status if name == "cpp" else triton_status)(dev)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} was requested but cannot run here: {why}")
    if dtype == torch.float64:
        raise TypeError(
            f"backend {name!r} computes in float32 and does not take float64 tensors; "
            "use backend='torch' (the reference) for float64"
        )
    return name


def backend_info() -> dict:
    """Which backends exist here and which one each op uses on CPU and CUDA tensors (float32)."""
    info: dict = {"requested": requested(None), "available": {}, "why": {}, "selected": {}}
    for dev in ("cpu", "cuda"):
        for name, status in (("cpp", cpp_status), ("triton", triton_status)):
            ok, why = status(dev)
            info["available"][f"{name}/{dev}"] = ok
            info["why"][f"{name}/{dev}"] = why
        info["available"][f"torch/{dev}"] = dev == "cpu" or torch.cuda.is_available()
        ok = info["available"][f"torch/{dev}"]
        info["why"][f"torch/{dev}"] = "reference (plain PyTorch)" if ok else "no CUDA device"
        try:
            info["selected"][dev] = select(torch.device(dev), torch.float32)
        except (BackendUnavailableError, TypeError) as e:
            info["selected"][dev] = f"error: {e}"
    info["cuda_device_present"] = torch.cuda.is_available()
    return info
