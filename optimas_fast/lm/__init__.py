"""Language-model layer: one interface (LM.generate), several backends, a persistent cache, usage/cost.

    from optimas_fast.lm import make_lm, usage_scope, UsageLedger, Budget, use_ledger
    lm = make_lm("embedded")                      # or "openai:gpt-4o-mini", "openai:m@http://host/v1", ...
    with use_ledger(UsageLedger(Budget(max_usd=2.0))) as ledger, usage_scope("solver"):
        out = lm.generate(["Is the sky blue? Answer yes or no."], n=2, temperature=0.7, max_tokens=8)
    ledger.by_component()["solver"]               # Usage(prompt_tokens=..., calls=2, cost_usd=...)

Importing this package does not import torch or transformers; backends load them when built.
See ``optimas_fast.lm.usage`` for how the System attributes usage to components (``usage_scope``)
and how budgets stop a run (``BudgetExceeded``).
"""

from optimas_fast.lm.base import LM, Completion, Message, Prompt, Request, SamplingParams, Usage
from optimas_fast.lm.cache import LMCache, cache_key, default_cache_dir, resolve_cache
from optimas_fast.lm.embedded import EmbeddedLM
from optimas_fast.lm.errors import (
    BudgetExceeded,
    LMAuthError,
    LMError,
    LMRequestError,
    LMResponseError,
    LMServerError,
    MissingDependencyError,
)
from optimas_fast.lm.factory import make_lm
from optimas_fast.lm.hf_local import HFLocalLM
from optimas_fast.lm.llamacpp import LlamaCppLM
from optimas_fast.lm.openai_client import OpenAIClient
from optimas_fast.lm.usage import (
    UNSCOPED,
    Budget,
    UsageLedger,
    current_component,
    current_ledger,
    default_ledger,
    register_price,
    set_default_ledger,
    usage_scope,
    use_ledger,
)
from optimas_fast.lm.vllm_engine import VLLMEngine

__all__ = [
    "LlamaCppLM",
    "LM",
    "Completion",
    "Usage",
    "Message",
    "Prompt",
    "Request",
    "SamplingParams",
    "LMCache",
    "cache_key",
    "default_cache_dir",
    "resolve_cache",
    "EmbeddedLM",
    "HFLocalLM",
    "OpenAIClient",
    "VLLMEngine",
    "make_lm",
    "LMError",
    "LMAuthError",
    "LMRequestError",
    "LMResponseError",
    "LMServerError",
    "BudgetExceeded",
    "MissingDependencyError",
    "UNSCOPED",
    "Budget",
    "UsageLedger",
    "usage_scope",
    "current_component",
    "use_ledger",
    "current_ledger",
    "default_ledger",
    "set_default_ledger",
    "register_price",
]
