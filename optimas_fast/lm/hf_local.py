"""A local Hugging Face causal LM with batched generation.

Batching: every ``generate`` call (from any thread) tokenizes its requests in the calling thread and
hands them to one background *batcher* per model, which runs up to ``batch_size`` requests with the same
sampling settings in one ``model.generate`` (left padding). So a System evaluating examples on 8 worker
threads, each asking for one completion, still gets batched decoding: on the 2-core CPU of our CI
machine batch 16 gives ~7x the tokens/s of one prompt at a time (benchmarks/RESULTS.md, "LM").
Requests of one call are sorted by prompt length first, so a batch pads little.

Sampling at temperature > 0 is done per row with its own ``torch.Generator`` (Gumbel-max over the
tempered logits, then a greedy pick): a sample depends on its prompt and its seed, not on which other
requests shared its batch. Greedy decoding needs no randomness.

Chat prompts use the tokenizer's chat template when it has one (``use_chat_template=None``); otherwise
messages are joined as ``role: content`` lines followed by ``assistant:``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimas_fast._validate import check_int, check_number
from optimas_fast.lm.base import LM, Request, SamplingParams, cut_at_stop
from optimas_fast.lm.cache import LMCache, resolve_cache
from optimas_fast.lm.errors import MissingDependencyError
from optimas_fast.lm.types import Completion, Prompt, Usage
from optimas_fast.lm.usage import UsageLedger

__all__ = ["HFLocalLM", "GumbelSampler", "left_pad", "resolve_dtype"]

logger = logging.getLogger(__name__)


def resolve_dtype(dtype: Any, device: str):
    """'auto' -> fp32 on the CPU, bf16 (else fp16) on CUDA; also accepts names and torch dtypes.

    Why fp32 on the CPU although bf16 decodes ~1.5x faster there (measured on the CI CPU, which has
    AVX512-BF16: 175 vs 121 tokens/s batched, 26 vs 17 one at a time): in bf16 the padding of a batch
    changes greedy outputs (7 of 16 prompts differed between batched and one-at-a-time decoding in
    benchmarks/bench_lm.py, 0 of 16 in fp32), so results would depend on which requests happened to share
    a batch. Pass dtype="bfloat16" to trade that for speed.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto', one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[dtype]


@dataclass
class _Item:
    ids: list[int]  # prompt token ids
    request: Request
    params: SamplingParams
    future: Future


class _Batcher:
    """Collects requests from any thread; one worker thread runs them in batches of equal settings."""

    def __init__(self, run_batch, batch_size: int, wait_s: float, idle_exit_s: float = 10.0):
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.wait_s = wait_s  # how long the first request of a batch waits for company
        self.idle_exit_s = idle_exit_s  # the worker exits when idle this long (restarted on demand)
        self._pending: list[_Item] = []
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, items: list[_Item]) -> None:
        with self._cv:
            self._pending.extend(items)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="optimas-lm-batcher", daemon=True)
                self._worker.start()
            self._cv.notify_all()

    def _take(self) -> list[_Item] | None:
        with self._cv:
            if not self._pending and not self._cv.wait_for(lambda: self._pending, timeout=self.idle_exit_s):
                self._worker = None
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._pending) < self.batch_size:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cv.wait(timeout=left):
                    break
            key = _group_key(self._pending[0].params)
            batch = [it for it in self._pending if _group_key(it.params) == key][: self.batch_size]
            taken = {id(it) for it in batch}
            self._pending = [it for it in self._pending if id(it) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                outs = self.run_batch(batch)
                for it, out in zip(batch, outs):
                    it.future.set_result(out)
            except BaseException as e:  # a failed batch fails its requests, never the worker
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)


def _group_key(p: SamplingParams) -> tuple:
    return (p.temperature, p.max_tokens, p.stop)


class HFLocalLM(LM):
    """``HFLocalLM(model_or_path)``: a local causal LM (a directory, a hub id, or a loaded model)."""

    def __init__(
        self,
        model_or_path: Any,
        *,
        tokenizer: Any = None,  # required when passing a loaded model; loaded from the path otherwise
        dtype: Any = "auto",  # "auto" (fp32 on CPU, bf16 on CUDA; see resolve_dtype), a name, or a torch.dtype
        device: str = "cpu",  # "cpu", "cuda", "cuda:1", ...
        batch_size: int = 16,  # most requests decoded together
        batch_wait_ms: float = 5.0,  # how long a lone request waits for others to batch with
        use_chat_template: bool | None = None,  # None: when the tokenizer has one
        name: str | None = None,  # identifier in cache keys and usage reports (default: from the path)
        cache: bool | str | os.PathLike | LMCache | None = True,  # see resolve_cache
        ledger: UsageLedger | None = None,  # None: the current ledger
        on_error: str = "raise",  # "raise" or "record"
        local_files_only: bool | None = None,  # None: True for a local directory (never reach a hub for it)
    ):
        try:
            import torch
            import transformers
        except ImportError as e:  # pragma: no cover - both are core dependencies
            raise MissingDependencyError(f"HFLocalLM needs torch and transformers: {e}") from e
        check_int(batch_size, "HFLocalLM: batch_size", min=1)
        check_number(batch_wait_ms, "HFLocalLM: batch_wait_ms", min=0)  # NaN is refused too (it was let through)
        if not isinstance(device, str):
            raise TypeError(f"HFLocalLM: device must be a str, got {type(device).__name__}")
        if on_error not in ("raise", "record"):
            raise ValueError(f"HFLocalLM: on_error must be 'raise' or 'record', got {on_error!r}")
        self.device = device
        self.dtype = resolve_dtype(dtype, device)

        if isinstance(model_or_path, (str, Path)):
            path = str(model_or_path)
            if local_files_only is None:
                local_files_only = os.path.isdir(path)
            if local_files_only and not os.path.isdir(path):
                raise FileNotFoundError(f"HFLocalLM: model_or_path {path!r} is not a directory")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=self.dtype, local_files_only=local_files_only
            )
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
            default_name = f"hf:{Path(path).name if os.path.isdir(path) else path}"
        elif isinstance(model_or_path, torch.nn.Module):
            if tokenizer is None:
                raise TypeError("HFLocalLM: pass tokenizer= together with a loaded model")
            model = model_or_path.to(self.dtype)
            default_name = f"hf:{getattr(getattr(model, 'config', None), '_name_or_path', '') or type(model).__name__}"
        else:
            raise TypeError(
                f"HFLocalLM: model_or_path must be a path or a torch module, got {type(model_or_path).__name__}"
            )
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"  # decoder-only batches must end at the same column
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        self.use_chat_template = (
            getattr(tokenizer, "chat_template", None) is not None
            if use_chat_template is None
            else bool(use_chat_template)
        )
        self.name = name or default_name
        self.model_name = self.name
        self.batch_size = batch_size
        self.cache = resolve_cache(cache)
        self.ledger = ledger
        self.on_error = on_error
        self.priced = False
        self._batcher = _Batcher(self._run_batch, batch_size, batch_wait_ms / 1000.0)
        self._seed_rng = random.SystemRandom()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return ids

    # --- LM hooks -------------------------------------------------------------------------------
    def cache_identity(self) -> dict:
        return {
            "backend": "hf",
            "name": self.name,
            "dtype": str(self.dtype).replace("torch.", ""),
            "chat_template": self.use_chat_template,
        }

    def render(self, prompt: Prompt) -> str:
        """The exact text the model reads for ``prompt``."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if isinstance(prompt, str):
            return prompt
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    def _encode(self, prompt: Prompt) -> list[int]:
        # the chat template already writes the special tokens (BOS, role markers): add none of our own
        return self.tokenizer(self.render(prompt), add_special_tokens=not self.use_chat_template)["input_ids"]

    def estimate_prompt_tokens(self, prompt: Prompt) -> int:
        return len(self._encode(prompt))

    def _generate(self, requests: list[Request], params: SamplingParams) -> list[Completion | Exception]:
        encoded = [self._encode(r.prompt) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))  # similar lengths pad little
        futures: dict[int, Future] = {}
        items = []
        for i in order:
            fut: Future = Future()
            futures[i] = fut
            items.append(_Item(encoded[i], requests[i], params, fut))
        self._batcher.submit(items)
        out: list[Completion | Exception] = []
        for i in range(len(requests)):
            try:
                out.append(futures[i].result())
            except Exception as e:
                out.append(e)
        return out

    # --- the batched decode (batcher thread) -----------------------------------------------------
    def _run_batch(self, items: list[_Item]) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList

        params = items[0].params
        pad = self.tokenizer.pad_token_id
        input_ids, attention = left_pad([it.ids for it in items], pad)  # (B, T) each
        width = input_ids.shape[1]
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(self.eos_ids) or None,
            # neutralise sampling defaults a checkpoint may ship (top_k=50, ...): we sample ourselves
            temperature=None,
            top_p=None,
            top_k=None,
        )
        if params.temperature > 0:
            gens = []
            for it in items:
                g = torch.Generator(device=self.device)
                g.manual_seed(it.request.seed if it.request.seed is not None else self._seed_rng.randrange(2**31))
                gens.append(g)
            kwargs["logits_processor"] = LogitsProcessorList([GumbelSampler(gens, params.temperature)])
        if params.stop:
            kwargs["stop_strings"] = list(params.stop)
            kwargs["tokenizer"] = self.tokenizer
        with torch.inference_mode():
            seqs = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs
            )  # (B, T + new)
        new = seqs[:, width:].tolist()
        outs = []
        for row, it in enumerate(items):
            toks = new[row]
            end = next((j for j, t in enumerate(toks) if t in self.eos_ids), None)
            hit_eos = end is not None
            toks = toks[: end + 1] if hit_eos else toks  # count the EOS the model produced
            text = self.tokenizer.decode([t for t in toks if t not in self.eos_ids], skip_special_tokens=True)
            text, cut = cut_at_stop(text, params.stop)
            finish = "stop" if (hit_eos or cut) else "length"
            outs.append(
                Completion(text, Usage(prompt_tokens=len(it.ids), completion_tokens=len(toks)), finish_reason=finish)
            )
        return outs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype}, device={self.device!r})"


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int):
    """Token id rows left-padded to one width (decoder-only batches must end at the same column):
    (ids (B, T), attention mask (B, T)), both long, on the CPU."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s) :] = 1
    return ids, mask


class GumbelSampler:
    """Turns greedy decoding into per-row temperature sampling: argmax(logits / T + Gumbel noise) is a
    sample from softmax(logits / T); each row draws its noise from its own generator. A ``transformers``
    logits processor (the HF backend and the LoRA policy both decode with it), public for that reason."""

    def __init__(self, generators, temperature: float):
        self.generators = generators
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature  # (B, V)
        noise = torch.stack(
            [torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators]
        )  # (B, V) uniform
        gumbel = -torch.log(-torch.log(noise.clamp_(1e-20, 1.0 - 1e-7)))
        return scores + gumbel
