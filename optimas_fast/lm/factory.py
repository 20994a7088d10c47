"""``make_lm(spec)``: build an LM from a config string or dict (YAML configs, ``Choice`` over LM names).

Strings:
    "embedded"                           the offline default (SmolLM2-135M-Instruct, CPU), shared per process
    "llamacpp"                           the same embedded GGUF run by llama.cpp in-process, shared per process
    "llamacpp:<file.gguf>"               any GGUF file through llama.cpp
    "openai:<model>"                     api.openai.com (or $OPENAI_BASE_URL), key from $OPENAI_API_KEY
    "openai:<model>@<base_url>"          any OpenAI-compatible server, e.g. openai:qwen@http://127.0.0.1:8000/v1
    "hf:<path or hub id>"                a local Hugging Face causal LM
    "vllm:<model>"                       vLLM in-process (optional extra)
Dicts: {"backend": "openai" | "embedded" | "llamacpp" | "hf" | "vllm", ...constructor keyword arguments}, e.g.
    {"backend": "openai", "model": "gpt-4o-mini", "max_concurrency": 16}
    {"backend": "hf", "path": "/models/qwen", "dtype": "float32"}
Keyword arguments to ``make_lm`` override the spec's. An ``LM`` instance is returned unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from optimas_fast.lm.base import LM
from optimas_fast.lm.embedded import EmbeddedLM
from optimas_fast.lm.hf_local import HFLocalLM
from optimas_fast.lm.llamacpp import LlamaCppLM
from optimas_fast.lm.openai_client import OpenAIClient
from optimas_fast.lm.vllm_engine import VLLMEngine

__all__ = ["make_lm", "BACKENDS"]

BACKENDS = ("embedded", "llamacpp", "openai", "hf", "vllm")
_FORMS = (
    "'embedded', 'llamacpp', 'llamacpp:<file.gguf>', 'openai:<model>', 'openai:<model>@<base_url>', "
    "'hf:<path>', 'vllm:<model>', or a dict with 'backend'"
)


def _parse_string(spec: str) -> dict:
    spec = spec.strip()
    if spec in ("embedded", "llamacpp"):
        return {"backend": spec}
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in BACKENDS or not rest:
        raise ValueError(f"make_lm: cannot parse spec {spec!r}; expected {_FORMS}")
    if backend == "openai":
        model, at, url = rest.partition("@")  # the first '@': URLs may carry user@host, model names do not
        if not model or (at and not url):
            raise ValueError(f"make_lm: spec {spec!r} needs 'openai:<model>' or 'openai:<model>@<base_url>'")
        return {
            "backend": "openai",
            "model": model,
            "base_url": url or os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        }
    if backend == "hf":
        return {"backend": "hf", "path": rest}
    if backend == "vllm":
        return {"backend": "vllm", "model": rest}
    if backend == "llamacpp":
        return {"backend": "llamacpp", "gguf_path": rest}
    raise ValueError(f"make_lm: backend {backend!r} takes no argument; use 'embedded'")


def make_lm(spec: Any, **overrides: Any) -> LM:
    """Builds the LM described by ``spec`` (see the module docstring)."""
    if isinstance(spec, LM):
        if overrides:
            raise ValueError("make_lm: keyword overrides cannot apply to an already-built LM")
        return spec
    if isinstance(spec, str):
        cfg = _parse_string(spec)
    elif isinstance(spec, Mapping):
        cfg = dict(spec)
        if "backend" not in cfg:
            raise ValueError(f"make_lm: a dict spec needs a 'backend' key (one of {BACKENDS}), got keys {sorted(cfg)}")
    else:
        raise TypeError(f"make_lm: spec must be a str, a dict or an LM, got {type(spec).__name__}")
    cfg.update(overrides)
    backend = cfg.pop("backend")
    if backend == "embedded":
        return EmbeddedLM.shared(**cfg)  # one model load per process, whichever component asks
    if backend == "llamacpp":
        return LlamaCppLM.shared(**cfg)  # one model load per process per settings
    if backend == "openai":
        if "model" not in cfg:
            raise ValueError("make_lm: backend 'openai' needs 'model'")
        cfg.setdefault("base_url", os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
        return OpenAIClient(cfg.pop("base_url"), cfg.pop("model"), **cfg)
    if backend == "hf":
        path = cfg.pop("path", None) or cfg.pop("model_or_path", None)
        if path is None:
            raise ValueError("make_lm: backend 'hf' needs 'path'")
        return HFLocalLM(path, **cfg)
    if backend == "vllm":
        if "model" not in cfg:
            raise ValueError("make_lm: backend 'vllm' needs 'model'")
        return VLLMEngine(cfg.pop("model"), **cfg)
    raise ValueError(f"make_lm: unknown backend {backend!r}; expected one of {BACKENDS}")
