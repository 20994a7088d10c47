"""Benchmark: the reward engine's host path (everything in ``RewardModel.score`` but the backbone) per row.

Workload (seeded): N rows over --components reward heads; each row's inputs are one of --prefixes distinct
texts (20-60 words), its outputs one of --outputs distinct texts (2-12 words, default: every row its own).
The backbone is a *null* backbone: an nn.Module with a ``.config`` whose forward returns zeros of shape
(R, T, H), so only host work is timed (parse, text dedupe, batched tokenising, truncation, planning, padding,
heads, the scatter back). The tokenizer is MiniLM's (a real fast tokenizer), the token cache starts cold.

Reported: µs per row end to end (wall clock, and this process's CPU time over all its threads: on a shared
machine the wall clock also counts other processes, so the load average is printed)
(the target is <= 10 µs/row at 1M rows with 1k prefixes), split into
prepare (parse + text dedupe in one pass, batched tokenising -- the native WordPiece for printable-ASCII texts,
``--tokenizer hf`` for Hugging Face's alone --, truncation), plan (C++ planner), encode (padding + the null backbone),
and, for the real MiniLM-L6 on a small sample (--minilm-rows), the share of wall time in the backbone.

    python benchmarks/bench_host.py                       # 1M rows, 1k prefixes (about 1-2 min, ~2 GB)
    python benchmarks/bench_host.py --rows 100000         # a quick run
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import types

import torch
import torch.nn as nn
from _common import machine, write_results

from optimas_fast.reward import RewardModel, RewardModelConfig, TemplateConfig, load_backbone
from optimas_fast.reward.encode import encode_planned

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega river stone cloud lamp answer question because therefore"
).split()


class NullBackbone(nn.Module):
    """Stands in for a transformer: zeros (R, T, H) for any ids, so the timing is host work only."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.config = types.SimpleNamespace(
            hidden_size=hidden,
            model_type="null",
            _attn_implementation="none",
            to_dict=lambda: {"model_type": "null", "hidden_size": hidden},
        )

    def forward(self, input_ids, attention_mask=None, **_):
        R, T = input_ids.shape
        return types.SimpleNamespace(last_hidden_state=torch.zeros(R, T, self.config.hidden_size))  # (R, T, H)


def workload(rows: int, prefixes: int, outputs: int | None, components: int, seed: int):
    rng = random.Random(seed)
    comps = [f"c{k}" for k in range(components)]
    inputs = [f"case {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for i in range(prefixes)]
    n_out = rows if outputs is None else outputs
    outs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + f" #{j}" for j in range(n_out)]
    comp_of = [rng.choice(comps) for _ in range(prefixes)]
    reqs = []
    for r in range(rows):
        i = r % prefixes
        reqs.append((comp_of[i], inputs[i], outs[r] if outputs is None else outs[rng.randrange(n_out)]))
    return comps, reqs


def host_run(args, tok) -> dict:
    comps, reqs = workload(args.rows, args.prefixes, args.outputs, args.components, args.seed)
    cfg = RewardModelConfig(
        architecture="encoder",
        attn_implementation=None,
        score_amp="none",
        template=TemplateConfig(max_length=args.max_length),
        token_cache_size=None,
        seed=args.seed,
    )
    rm = RewardModel(NullBackbone(), comps, tokenizer=tok, config=cfg, device="cpu")
    if args.tokenizer == "hf":
        rm.encoder.tokens.native = None  # every text through Hugging Face's Rust tokenizer (the baseline)
    n = len(reqs)
    # stages, each on a cold token cache where tokenising is part of it
    t1 = time.perf_counter()
    rows = rm.encoder.prepare_requests(reqs)  # parse + text dedupe (one pass), batched tokenising, truncation
    t2 = time.perf_counter()
    plan = rm.encoder.plan(rows)
    t3 = time.perf_counter()
    with torch.inference_mode():
        h, _ = encode_planned(rm.encoder, rows, plan, inference=True)
    t4 = time.perf_counter()
    rm.encoder.tokens.clear()
    t5, c5 = time.perf_counter(), time.process_time()
    scores, rep = rm.score_with_report(reqs)  # end to end, cold cache again
    t6, c6 = time.perf_counter(), time.process_time()
    assert scores.shape == (n,)
    us = lambda s: 1e6 * s / n  # noqa: E731
    return {
        "rows": n,
        "prefixes": args.prefixes,
        "distinct_outputs": args.outputs or n,
        "unique_rows": rep.n_unique,
        "batches": rep.n_batches,
        "us_per_row_end_to_end": us(t6 - t5),
        "cpu_us_per_row_end_to_end": us(c6 - c5),
        "us_per_row_host": us(rep.host_seconds),
        "us_per_row_prepare": us(t2 - t1),
        "us_per_row_plan": us(t3 - t2),
        "us_per_row_encode_null": us(t4 - t3),
        "seconds": t6 - t5,
    }


def minilm_share(args) -> dict:
    backbone, tok = load_backbone("minilm")
    comps, reqs = workload(args.minilm_rows, max(1, args.minilm_rows // 16), None, 2, args.seed)
    rm = RewardModel(backbone, comps, tokenizer=tok, config=RewardModelConfig(seed=args.seed), device="cpu")
    rm.score(reqs[:16])  # warm-up (and the bf16 copy, where scoring runs bf16)
    rm.encoder.tokens.clear()
    _, rep = rm.score_with_report(reqs)
    return {
        "rows": len(reqs),
        "seconds": rep.seconds,
        "rows_per_s": len(reqs) / rep.seconds,
        "backbone_share": 1 - rep.host_seconds / rep.seconds,
        "us_per_row_host": 1e6 * rep.host_seconds / len(reqs),
        "amp": rep.amp,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--prefixes", type=int, default=1000)
    ap.add_argument("--outputs", type=int, default=None, help="distinct outputs texts (default: one per row)")
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--minilm-rows", type=int, default=256, help="0 skips the MiniLM backbone-share run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tokenizer",
        choices=["native", "hf"],
        default="native",
        help="native: the engine's default (C++ WordPiece for printable-ASCII texts, HF for the rest); "
        "hf: every text through Hugging Face's Rust tokenizer",
    )
    args = ap.parse_args()
    _, tok = load_backbone("minilm")
    res = {"host": host_run(args, tok)}
    if args.minilm_rows:
        res["minilm"] = minilm_share(args)
    print(machine(), f"load average {os.getloadavg()}", file=sys.stderr)
    h = res["host"]
    print(
        f"host path, null backbone, {args.tokenizer} tokenizer: {h['rows']} rows, {h['prefixes']} prefixes, "
        f"{h['distinct_outputs']} distinct "
        f"outputs -> {h['us_per_row_end_to_end']:.2f} us/row end to end (target <= 10; CPU time of this process "
        f"{h['cpu_us_per_row_end_to_end']:.2f} us/row, all threads), host {h['us_per_row_host']:.2f}"
        f" us/row [prepare {h['us_per_row_prepare']:.2f}, plan "
        f"{h['us_per_row_plan']:.2f}, encode(null) {h['us_per_row_encode_null']:.2f}]"
    )
    if "minilm" in res:
        m = res["minilm"]
        print(
            f"MiniLM-L6 ({m['amp']}), {m['rows']} rows: {m['rows_per_s']:.1f} rows/s, backbone share "
            f"{m['backbone_share']:.1%}, host {m['us_per_row_host']:.1f} us/row"
        )
    path = write_results("bench_host", {**res, "args": vars(args)})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
