"""The shared-prefix attention kernel (reward/attention.py) on and off, in one process on the same rows:
decoder scoring and training with prefix sharing.

    python benchmarks/bench_shared_prefix.py --prompts 2 --candidates 16 --pairs-per-prompt 16   # multi-candidate
    python benchmarks/bench_shared_prefix.py --prompts 16 --candidates 2 --pairs-per-prompt 1    # unique pairs

Backbone: the embedded SmolLM2-135M-Instruct (pretrained, converted to a Hugging Face Llama), bf16 where the
machine has native bf16. Rows: PubMedQA prompts (300-500 tokens) with distinct short answers (as
bench_pool_vllm.py). Each mode runs ``--repeats`` times, kernel on and off alternating, after a warm-up;
reports rows/s (scoring every candidate) and pairs/s (one epoch of ``RewardModel.train``, batch 8).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from _common import machine, write_results
from bench_pool_vllm import pool_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=16, help="distinct answers per prompt")
    ap.add_argument("--pairs-per-prompt", type=int, default=16, help="training pairs drawn from each prompt's answers")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from optimas_fast.lm.embedded import ensure_converted
    from optimas_fast.reward import PreferencePair, RewardModel, RewardModelConfig, cpu_has_native_bf16

    amp = "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "none"
    print(f"machine: {machine()}  load average: {os.getloadavg()[0]:.1f}  amp: {amp}", flush=True)
    k = args.candidates
    rows = pool_rows(args.prompts, k, args.seed)
    rnd = random.Random(args.seed)
    pairs = []
    for p in range(args.prompts):
        answers = [r[2] for r in rows[p * k : (p + 1) * k]]
        for _ in range(args.pairs_per_prompt):
            a, b = rnd.sample(answers, 2)
            pairs.append(PreferencePair("answer", rows[p * k][1], a, b, 1.0))
    rm = RewardModel(
        str(ensure_converted()),
        {"answer": "answers a biomedical question from its abstract"},
        config=RewardModelConfig(amp=amp, score_amp=amp, seed=args.seed),
    )
    warm = pool_rows(2, 4, seed=args.seed + 99)
    rm.score(warm)
    rm.train([PreferencePair("answer", warm[0][1], warm[0][2], warm[1][2], 1.0)] * 4, epochs=1, lr=1e-5, batch_pairs=4)
    res: dict = {"rows": len(rows), "pairs": len(pairs), "score_rows_per_s": {}, "train_pairs_per_s": {}}
    for _ in range(args.repeats):
        for kernel in (True, False):
            rm.encoder.config.shared_prefix_kernel = kernel
            t0 = time.perf_counter()
            rm.score(rows)
            res["score_rows_per_s"].setdefault(str(kernel), []).append(len(rows) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            rm.train(pairs, epochs=1, lr=1e-5, batch_pairs=8)
            res["train_pairs_per_s"].setdefault(str(kernel), []).append(len(pairs) / (time.perf_counter() - t0))
    for what in ("score_rows_per_s", "train_pairs_per_s"):
        on, off = res[what]["True"], res[what]["False"]
        print(
            f"{what}: kernel {' / '.join(f'{v:.2f}' for v in on)} vs per-row cache "
            f"{' / '.join(f'{v:.2f}' for v in off)}",
            flush=True,
        )
    print("results:", write_results("bench_shared_prefix", {"args": vars(args), "results": res}))


if __name__ == "__main__":
    main()
