"""Candidate-pool scoring: ours (RewardModel.score) vs vLLM's pooling runner (prefix caching on) vs Hugging Face
batched scoring, side by side in one run on the same rows, token ids and backbone.

    # in the vLLM virtual environment (README "vLLM on CPU"):
    python benchmarks/bench_pool_vllm.py                       # 8 prompts x 16 and 1 prompt x 1024, bf16
    python benchmarks/bench_pool_vllm.py --pools 8x16 --no-vllm   # without vllm (ours vs HF only)

Rows: PubMedQA question + abstract as the prompt (300-500 tokens with the template), short answers with a
rationale as candidates (unique per prompt). Backbone: the embedded SmolLM2-135M-Instruct (pretrained, converted
to a Hugging Face Llama); one reward head. Every engine scores the SAME token ids (ours renders them; the
others get them as token-id prompts), in bf16 where the machine has native bf16 (else fp32 everywhere):

* ours: ``RewardModel.score`` (dedupe, prefix groups: each prompt's KV cache computed once, token budget);
* vLLM: ``LLM(runner="pooling", enable_prefix_caching=True).classify`` on the exported seq-cls checkpoint;
* HF: ``AutoModelForSequenceClassification`` on the same export, right-padded batches of ``--hf-batch`` rows in
  the pool's order (what a user of HF scoring writes).

Reports rows/s, seconds, the prefix-sharing token reduction rho = (P + S) / (P / K + S) that caching the prompt
allows (P prompt tokens, S candidate tokens, K candidates per prompt), the agreement of the scores (max
|diff| over the score spread), and the physical bound: the rows/s the backbone's FLOPs per row allow at the
measured GEMM rate of this device and dtype (linear layers over the S candidate tokens and the amortised P / K
prompt tokens, attention counted at the same rate; no padding), with each engine's fraction of it. vLLM
must be built under ``if __name__ == "__main__"`` (it spawns its engine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

from _common import gemm_peak_flops, machine, write_results

from optimas_fast.examples.data import PUBMEDQA_FILE, default_data_dir

DATA = str(default_data_dir() / PUBMEDQA_FILE)  # the package's own copy (or $OPTIMAS_FAST_DATA)
LABELS = ("yes", "no", "maybe")


def pool_rows(n_prompts: int, k: int, seed: int) -> list[tuple[str, str, str]]:
    """(component, inputs, outputs) rows: n_prompts PubMedQA prompts x k distinct candidate answers each."""
    rnd = random.Random(seed)
    with open(os.environ.get("OPTIMAS_FAST_DATA", os.path.dirname(DATA)) + "/pubmedqa_train.jsonl") as f:
        items = [json.loads(line) for line in f]
    rnd.shuffle(items)
    rows = []
    for it in items[:n_prompts]:
        prompt = f"Question: {it['question']}\n\nAbstract: {' '.join(it['context'])}"
        sentences = [s for s in " ".join(it["context"]).split(". ") if len(s) > 20] or ["the abstract is unclear"]
        seen = set()
        while len(seen) < k:
            label = rnd.choice(LABELS)
            why = rnd.choice(sentences)[:160]
            cand = f"{label}: {why} (rationale {len(seen)})"
            seen.add(cand)
        rows += [("answer", prompt, c) for c in sorted(seen)]
    return rows


def flops_per_row(backbone, P: float, S: float, k: int) -> float:
    """Forward FLOPs one row costs with the prompt shared by its k candidates: 2 x linear weights per token
    over S + P / k tokens, plus attention (QK and PV: 4 x heads x head_dim per query-key pair) over the
    candidate's causal context and the prompt's (amortised)."""
    import torch.nn as nn

    linear = sum(m.weight.numel() for m in backbone.modules() if isinstance(m, nn.Linear))
    cfg = backbone.config
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn = 4.0 * heads * hd * layers  # per query-key pair
    cand = S * 2.0 * linear + attn * S * (P + (S + 1) / 2)
    prompt = P * 2.0 * linear + attn * P * (P + 1) / 2
    return cand + prompt / k


def parse_pools(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        p, _, k = part.partition("x")
        out.append((int(p), int(k)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default="8x16,1x1024", help="comma list of PROMPTSxCANDIDATES")
    ap.add_argument("--hf-batch", type=int, default=16, help="rows per HF batch")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM (e.g. in the main venv)")
    ap.add_argument("--no-hf", action="store_true", help="skip HF batched scoring (slow on CPU at 1x1024)")
    ap.add_argument(
        "--per-row-cache",
        action="store_true",
        help="also time ours with config.shared_prefix_kernel=False (each row's copy of the cache)",
    )
    ap.add_argument("--dtype", default="auto", help="auto (bf16 with native bf16 or CUDA) | bfloat16 | float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from optimas_fast.lm.embedded import ensure_converted
    from optimas_fast.reward import RewardModel, RewardModelConfig, cpu_has_native_bf16

    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and (torch.cuda.is_available() or cpu_has_native_bf16()))
    dtype = torch.bfloat16 if bf16 else torch.float32
    print(f"machine: {machine()}  load average: {os.getloadavg()[0]:.1f}  dtype: {dtype}", flush=True)
    path = str(ensure_converted())
    rm = RewardModel(
        path,
        {"answer": "answers a biomedical question from its abstract"},
        config=RewardModelConfig(score_amp="bf16" if bf16 else "none", seed=args.seed),
    )
    export = tempfile.mkdtemp(prefix="pool-export-")
    meta = rm.export_hf(export)
    bias = meta["dropped_bias"][0]
    dev = rm.encoder.device
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForSequenceClassification

        hf = AutoModelForSequenceClassification.from_pretrained(export, dtype=dtype).to(dev).eval()
    llm = None
    if not args.no_vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        from vllm import LLM, PoolingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        llm = LLM(
            model=export,
            runner="pooling",
            dtype="bfloat16" if bf16 else "float32",
            max_model_len=2048,
            enable_prefix_caching=True,
            seed=args.seed,
        )
        print(f"vLLM load: {time.perf_counter() - t0:.1f} s", flush=True)

    peak = gemm_peak_flops(dtype, dev, k=rm.encoder.net.hidden_size)
    print(
        f"measured GEMM rate ({dtype}, 4096 x {rm.encoder.net.hidden_size} x 1536): {peak / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    results = []
    warm = pool_rows(2, 4, seed=args.seed + 99)  # unrelated prompts: warm-up must not fill the prefix cache for free
    rm.score(warm)
    for n_prompts, k in parse_pools(args.pools):
        rows = pool_rows(n_prompts, k, args.seed)
        toks = [rm.tokenise(*r) for r in rows]
        ids = [list(t.prefix) + list(t.suffix) for t in toks]
        P = sum(len(t.prefix) for t in toks) / len(toks)
        S = sum(len(t.suffix) for t in toks) / len(toks)
        rho = (P + S) / (P / k + S)
        bound = peak / flops_per_row(rm.encoder.net.backbone, P, S, k)  # rows/s at the GEMM rate
        rec = {
            "pool": f"{n_prompts}x{k}",
            "rows": len(rows),
            "prompt_tokens": P,
            "candidate_tokens": S,
            "rho": rho,
            "gemm_flops_per_s": peak,
            "bound_rows_per_s": bound,
        }
        t0 = time.perf_counter()
        ours, rep = rm.score_with_report(rows)
        ours = ours.double() - bias  # (N,) on the export's scale (bias dropped)
        rec["ours_s"] = time.perf_counter() - t0
        rec["ours_tokens_encoded"] = rep.tokens_encoded  # incl. padding; the prompt once per batch
        if args.per_row_cache:
            rm.encoder.config.shared_prefix_kernel = False
            t0 = time.perf_counter()
            rowcache = rm.score(rows).double() - bias
            rec["ours_rowcache_s"] = time.perf_counter() - t0
            rm.encoder.config.shared_prefix_kernel = True
            rec["ours_rowcache_agree"] = float((rowcache - ours).abs().max() / (ours.max() - ours.min()))
        if hf is not None:
            pad = hf.config.pad_token_id
            out = []
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(ids), args.hf_batch):
                    chunk = ids[i : i + args.hf_batch]
                    T = max(map(len, chunk))
                    x = torch.tensor([c + [pad] * (T - len(c)) for c in chunk], device=dev)  # (b, T)
                    m = torch.arange(T, device=dev)[None] < torch.tensor([len(c) for c in chunk], device=dev)[:, None]
                    out.append(hf(input_ids=x, attention_mask=m.long()).logits[:, 0].float().cpu())
            rec["hf_s"] = time.perf_counter() - t0
            hf_scores = torch.cat(out).double()
            rec["hf_agree"] = float((hf_scores - ours).abs().max() / (ours.max() - ours.min()))
        if llm is not None:
            t0 = time.perf_counter()
            res = llm.classify(
                [TokensPrompt(prompt_token_ids=x) for x in ids],
                pooling_params=PoolingParams(use_activation=False),
                use_tqdm=False,
            )
            rec["vllm_s"] = time.perf_counter() - t0
            v = torch.tensor([r.outputs.probs[0] for r in res], dtype=torch.float64)
            rec["vllm_agree"] = float((v - ours).abs().max() / (ours.max() - ours.min()))
        for name in ("ours", "ours_rowcache", "hf", "vllm"):
            if f"{name}_s" in rec:
                rec[f"{name}_rows_per_s"] = len(rows) / rec[f"{name}_s"]
                rec[f"{name}_of_bound"] = rec[f"{name}_rows_per_s"] / bound
        results.append(rec)
        line = " | ".join(
            f"{n} {rec[f'{n}_rows_per_s']:.1f} rows/s ({rec[f'{n}_of_bound']:.0%} of bound)"
            for n in ("ours", "ours_rowcache", "vllm", "hf")
            if f"{n}_rows_per_s" in rec
        )
        vs = "".join(
            f", ours/{n} {rec['ours_rows_per_s'] / rec[f'{n}_rows_per_s']:.2f}x"
            for n in ("ours_rowcache", "vllm", "hf")
            if f"{n}_rows_per_s" in rec
        )
        agree = " ".join(f"{n} {rec[f'{n}_agree']:.3f}" for n in ("ours_rowcache", "hf", "vllm") if f"{n}_agree" in rec)
        print(
            f"| {rec['pool']} | P={P:.0f} S={S:.0f} rho={rho:.2f} | bound {bound:.1f} rows/s | {line}{vs} | "
            f"agreement(max|diff|/spread): {agree} |",
            flush=True,
        )
    print("results:", write_results("bench_pool_vllm", {"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
