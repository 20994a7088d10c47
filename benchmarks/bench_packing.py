"""Padding-free packed batches vs padded batches in the reward engine (issue 9 section 2), side by side.

Data: the unique TRL-style PubMedQA pairs (``python benchmarks/make_unique_pairs.py --out DIR``; prompts of
~220-480 MiniLM tokens, responses ~42): the first --pairs train pairs. Scoring pushes both responses of every
pair ((component, prompt, chosen) and (..., rejected): 2 candidates per prompt); training runs --steps steps
of --batch-pairs pairs. Backbones: MiniLM-L6 (pretrained encoder) and a Llama-like decoder (random init,
hidden 384, 6 layers, MiniLM's tokenizer). Modes, each a fresh RewardModel from the same weights, the
engine's defaults otherwise (bf16 where the CPU has native bf16):

    encoder   padded (the planner's length-sorted batches) | packed
    decoder   padded + prefix sharing (default: KV cache) | packed + prefix sharing (prefix once per pack)
              padded, no sharing | packed, no sharing

Reported per mode: scoring rows/s, tokens through the backbone over the rows' real tokens (padding waste
when above 1; below 1 when prefixes are shared), the largest score difference from the first mode of its
backbone, training pairs/s. One process, one mode after another, on an idle machine.

    python benchmarks/bench_packing.py --data benchmarks/_out/unique_pairs --pairs 64 --steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _common import machine, write_results

from optimas_fast.reward import RewardModel, RewardModelConfig, load_backbone, load_pairs
from optimas_fast.reward.template import TemplateConfig

MODES = {
    "encoder": [("padded", dict(packing=False)), ("packed", dict(packing=True))],
    "decoder": [
        ("padded+shared", dict(packing=False, prefix_sharing=True)),
        ("packed+shared", dict(packing=True, prefix_sharing=True)),
        ("padded", dict(packing=False, prefix_sharing=False)),
        ("packed", dict(packing=True, prefix_sharing=False)),
    ],
}


def backbone(kind: str, seed: int):
    model, tok = load_backbone("minilm")
    if kind == "encoder":
        return model, tok
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaModel(cfg), tok


def run_mode(kind: str, mode: dict, state: dict, tok, pairs, args) -> tuple[dict, torch.Tensor]:
    net, _ = backbone(kind, args.seed)
    net.load_state_dict(state)
    cfg = RewardModelConfig(
        seed=args.seed, pack_tokens=args.pack_tokens, template=TemplateConfig(max_length=512), architecture=kind, **mode
    )
    rm = RewardModel(net, ["answer"], tokenizer=tok, config=cfg, device="cpu")
    reqs = [r for p in pairs for r in (("answer", p.inputs, p.chosen), ("answer", p.inputs, p.rejected))]
    rm.score(reqs[:4])  # warm-up (the bf16 scoring copy, allocator)
    rm.encoder.tokens.clear()
    t0 = time.perf_counter()
    scores, rep = rm.score_with_report(reqs)
    t_score = time.perf_counter() - t0
    real = rep.tokens_naive
    t0 = time.perf_counter()
    rm.train(pairs[: args.steps * args.batch_pairs], epochs=1, batch_pairs=args.batch_pairs)
    t_train = time.perf_counter() - t0
    n_train = min(len(pairs), args.steps * args.batch_pairs)
    return {
        "rows": len(reqs),
        "score_s": t_score,
        "rows_per_s": len(reqs) / t_score,
        "tokens_encoded": rep.tokens_encoded,
        "tokens_real": real,
        "tokens_ratio": rep.tokens_encoded / real,
        "batches": rep.n_batches,
        "amp": rep.amp,
        "train_pairs": n_train,
        "train_s": t_train,
        "pairs_per_s": n_train / t_train,
    }, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="benchmarks/_out/unique_pairs", help="make_unique_pairs.py output")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--pack-tokens", type=int, default=1024)
    ap.add_argument("--only", choices=["encoder", "decoder"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs = load_pairs(os.path.join(args.data, "train.jsonl"), component="answer")[: args.pairs]
    res = {}
    for kind in [args.only] if args.only else ["encoder", "decoder"]:
        net, tok = backbone(kind, args.seed)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        first = None
        for name, mode in MODES[kind]:
            r, s = run_mode(kind, mode, state, tok, pairs, args)
            first = s if first is None else first
            r["max_abs_diff_vs_first"] = float((s - first).abs().max())
            r["score_spread"] = float(first.std())
            res[f"{kind}/{name}"] = r
            print(
                f"{kind:8s} {name:14s} score {r['rows_per_s']:6.1f} rows/s  tokens {r['tokens_ratio']:.3f}x real "
                f"({r['batches']} batches)  |diff| {r['max_abs_diff_vs_first']:.2e} (spread {r['score_spread']:.2f})"
                f"  train {r['pairs_per_s']:.2f} pairs/s  [{r['amp']}]",
                flush=True,
            )
    print(machine(), f"load average {os.getloadavg()}", file=sys.stderr)
    print(f"wrote {write_results('bench_packing', {**res, 'args': vars(args)})}", file=sys.stderr)


if __name__ == "__main__":
    main()
