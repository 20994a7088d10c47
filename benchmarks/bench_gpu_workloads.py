"""Whole workloads on one GPU (the part of benchmarks/gpu_check.sh that times the engine), public APIs only.

1. Reward training on a random-init ~1B Llama config (hidden 2048, 22 layers, TinyLlama's shape) in bf16
   autocast, prefix sharing on: RewardModel.train vs the reference's way (AutoModelForSequenceClassification,
   chosen and rejected as two padded passes of batch 2, AdamW; bf16 autocast here too) vs TRL's
   RewardTrainer (bf16, batch 2) when trl imports. Same token ids, same starting weights; pairs/s.
   Ours also at TRL's batch (2 pairs); each method's peak GPU memory beside its pairs/s.
2. Pool scoring, 1 prompt x 1024 candidates and 64 prompts x 32 candidates: RewardModel.score (bf16, prefix
   sharing) vs Hugging Face batched scoring (the same weights in bf16, batch 64, padded) vs vLLM's pooling runner
   (prefix caching on, the same weights saved as a sequence-classification checkpoint; 1 x 1024 only) when vllm
   imports; rows/s, and the score agreement with the HF model (same heads).

The tokenizer is built in code (WordPiece over the filler words, letters and digits): the GPU machine has no model
packages, and the workload needs token ids, not a vocabulary. The 1B model keeps TinyLlama's 32,000-row embedding.

    python benchmarks/bench_gpu_workloads.py --out benchmarks/_out/gpu_workloads.json      # CUDA, ~1-2 min
    python benchmarks/bench_gpu_workloads.py --size tiny --device cpu --pools 1x16,4x4 \
        --train-inputs 1 --baseline-pairs 4 --prefix-words 20                              # smoke run, CPU

A baseline that cannot run (trl / vllm missing or failing) is recorded with its reason, never as a result.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from _common import machine_info, write_results  # noqa: E402

from optimas_fast.reward import PreferencePair, RewardModel, RewardModelConfig, TemplateConfig, spearman  # noqa: E402
from optimas_fast.reward.testing import wordpiece_tokenizer  # noqa: E402

COMPONENTS = ("answer", "context", "reason")
FILLER = (
    "the of and to in is was for on that with as by at from it an be this are which or have has not "
    "system model data result study group method high number based between use each both value over "
    "paper answer question evidence patient trial effect level cell gene protein sample rate risk"
).split()
# (hidden, layers, intermediate, heads, kv heads, vocab): "1b" is TinyLlama-1.1B's shape; vocab None = the
# tokenizer's own
SIZES = {"1b": (2048, 22, 5632, 32, 4, 32000), "tiny": (64, 2, 128, 4, 2, None)}


# ------------------------------------------------------------------------------------------------ data
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(n))


def candidate(rng: random.Random, q: int, n: int) -> str:
    body = ["excellent"] * q + ["poor"] * (5 - q) + words(rng, max(1, n - 5)).split()
    rng.shuffle(body)
    return " ".join(body)


def make_pairs(rng: random.Random, n_inputs: int, k: int, prefix_words: int, suffix_words: int):
    """Each input has k candidates of distinct quality; every ordered pair with a quality gap."""
    out = []
    for i in range(n_inputs):
        comp, inp = COMPONENTS[i % 3], f"case {i}: " + words(rng, prefix_words)
        cands = [(q, candidate(rng, q, suffix_words)) for q in rng.sample(range(6), k)]
        out += [PreferencePair(comp, inp, a, b, (qa - qb) / 5) for qa, a in cands for qb, b in cands if qa > qb]
    return out


def pool_rows(rng: random.Random, n_prompts: int, n_cands: int, prefix_words: int, suffix_words: int):
    """n_prompts x n_cands (component, input, output) rows, a prompt's candidates next to each other."""
    rows = []
    for i in range(n_prompts):
        inp = f"case {i}: " + words(rng, prefix_words)
        rows += [("answer", inp, candidate(rng, rng.randint(0, 5), suffix_words) + f" v{j}") for j in range(n_cands)]
    return rows


def parse_pools(text: str) -> list[tuple[int, int]]:
    """ "1x1024,64x32" -> [(1, 1024), (64, 32)]: prompts x candidates per pool."""
    try:
        out = [tuple(int(n) for n in p.lower().split("x")) for p in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(p) != 2 or min(p) < 1 for p in out):
        raise argparse.ArgumentTypeError(f"--pools takes PROMPTSxCANDIDATES[,...] (e.g. 1x1024,64x32), got {text!r}")
    return out


# ------------------------------------------------------------------------------------------------ models
def tokenizer():
    """A BERT-style WordPiece tokenizer built in code: the filler words whole, any other lowercase word spelled out
    in letters and digits (see the module doc)."""
    return wordpiece_tokenizer(set(FILLER) | {"case", "excellent", "poor", "answer", "context", "reason"})


def build(size: str, device: str, seed: int, amp: str):
    """(rm, base, tok): RewardModel and a LlamaForSequenceClassification with identical weights and heads."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = tokenizer()
    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    cfg = LlamaConfig(
        vocab_size=max(vocab or 0, tok.vocab_size),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1024,
        num_labels=len(COMPONENTS),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 1B CPU init alone takes tens of seconds
        base = LlamaForSequenceClassification(cfg)
    backbone = copy.deepcopy(base.model)
    rm = RewardModel(
        backbone,
        list(COMPONENTS),
        tokenizer=tok,
        device=device,
        config=RewardModelConfig(
            seed=seed, amp=amp, score_amp=amp, prefix_sharing=True, template=TemplateConfig(max_length=512)
        ),
    )
    heads_setup = "copied from the HF model's score layer"
    try:  # same heads on both sides so scores can be compared (RewardNet keeps one (H,) weight per head)
        with torch.no_grad():
            for i, key in enumerate(rm.encoder.net.head_keys):
                rm.encoder.net.head_weight[key].copy_(base.score.weight[i])
                rm.encoder.net.head_bias[key].zero_()
    except AttributeError as e:
        heads_setup = f"not copied ({e}): score agreement is not checked"
    n_params = sum(p.numel() for p in backbone.parameters())
    return (
        rm,
        base,
        tok,
        {
            "hidden": hidden,
            "layers": layers,
            "intermediate": inter,
            "attention_heads": heads,
            "kv_heads": kv,
            "backbone_params": n_params,
            "heads_setup": heads_setup,
        },
    )


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measured(device: str, fn, *args, **kwargs) -> dict:
    """fn's result dict with GPU memory (GiB, the allocator's view) added on CUDA: ``peak_gpu_memory_gib`` (absolute,
    everything resident included: the other methods' models stay on the GPU), ``resident_before_gib`` and
    ``added_gpu_memory_gib`` = peak - resident before (what this method needed on top; TRL's includes its own
    copy of the model, which it builds inside, ours' does not: our model was resident before)."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    res = fn(*args, **kwargs)
    if device.startswith("cuda") and "skipped" not in res:
        peak = torch.cuda.max_memory_allocated()
        res.update(
            peak_gpu_memory_gib=peak / 2**30,
            resident_before_gib=before / 2**30,
            added_gpu_memory_gib=(peak - before) / 2**30,
        )
    return res


def autocast(device: str, amp: str):
    dev = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=amp == "bf16")


def row_ids(rm: RewardModel, comp: str, inputs: str, outputs: str) -> list[int]:
    t = rm.tokenise(comp, inputs, outputs)  # the same ids as ours: the same work per row
    return list(t.prefix + t.suffix)


def pad(seqs, pad_id: int, device: str):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids.to(device), (ids != pad_id).long().to(device)


# ------------------------------------------------------------------------------------------------ training
def train_reference_way(base, rm, tok, pairs, lr: float, device: str, amp: str) -> dict:
    """The reference trainer's computation: batch 2, chosen and rejected as two padded passes, AdamW."""
    data = [
        (
            row_ids(rm, p.component, p.inputs, p.chosen),
            row_ids(rm, p.component, p.inputs, p.rejected),
            rm.head_id(p.component),
            p.margin,
        )
        for p in pairs
    ]
    opt = torch.optim.AdamW(base.parameters(), lr=lr)
    base.train()

    def step(batch):
        heads = torch.tensor([b[2] for b in batch], device=device)
        rows = torch.arange(len(batch), device=device)
        with autocast(device, amp):
            rc = base(*pad([b[0] for b in batch], tok.pad_token_id, device)).logits[rows, heads]  # (2,)
            rr = base(*pad([b[1] for b in batch], tok.pad_token_id, device)).logits[rows, heads]  # (2,)
        m = torch.tensor([b[3] for b in batch], device=device)
        loss = -(m * F.logsigmoid(rc.float() - rr.float())).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(data[:2])  # warm-up (allocator, kernels), untimed
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(data), 2):
        step(data[i : i + 2])
    sync(device)
    seconds = time.perf_counter() - t0
    return {"pairs": len(data), "seconds": seconds, "pairs_per_s": len(data) / seconds, "batch_pairs": 2}


def train_ours(rm, pairs, warm, lr: float, batch_pairs: int, device: str) -> dict:
    rm.train(warm, epochs=1, lr=lr, batch_pairs=batch_pairs)  # warm-up: optimizer state, kernels, JIT
    sync(device)
    t0 = time.perf_counter()
    hist = rm.train(pairs, epochs=1, lr=lr, batch_pairs=batch_pairs)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "pairs": len(pairs),
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds,
        "steps": len(hist),
        "batch_pairs": batch_pairs,
        "final_loss": hist[-1]["loss"],
        "prefix_sharing": rm.prefix_sharing_status(),
    }


def train_trl(base, rm, tok, pairs, lr: float, device: str, amp: str) -> dict:
    """TRL's RewardTrainer on the same token ids (pre-tokenised columns), a num_labels=1 copy of the start."""
    try:
        from datasets import Dataset
        from trl import RewardConfig as TRLConfig
        from trl import RewardTrainer
    except ImportError as e:
        return {"skipped": f"trl is not importable: {e}"}
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 1
    with torch.device(device):
        twin = type(base)(cfg)
    twin.model.load_state_dict(base.model.state_dict())
    rows = [
        {
            "chosen_ids": row_ids(rm, p.component, p.inputs, p.chosen),
            "rejected_ids": row_ids(rm, p.component, p.inputs, p.rejected),
        }
        for p in pairs
    ]
    try:
        with tempfile.TemporaryDirectory() as out:
            args = TRLConfig(
                output_dir=out,
                per_device_train_batch_size=2,
                num_train_epochs=1,
                learning_rate=lr,
                save_strategy="no",
                report_to=[],
                seed=0,
                max_length=None,
                use_cpu=not device.startswith("cuda"),
                bf16=amp == "bf16",
                disable_tqdm=True,
                logging_steps=10**9,
                dataloader_num_workers=0,
            )
            trainer = RewardTrainer(model=twin, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
            sync(device)
            t0 = time.perf_counter()
            trainer.train()  # includes its first-step warm-up: TRL has no separate one
            sync(device)
            seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - recorded as the reason this baseline has no number
        return {"skipped": f"TRL RewardTrainer failed: {type(e).__name__}: {str(e)[:300]}"}
    finally:
        del twin
    return {
        "pairs": len(pairs),
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds,
        "batch_pairs": 2,
        "steps": int(trainer.state.global_step),
    }


# ------------------------------------------------------------------------------------------------ pool scoring
@torch.inference_mode()
def hf_batched_scores(model, seqs, heads, pad_id: int, device: str, batch: int) -> tuple[torch.Tensor, float]:
    model.eval()
    out = []
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(seqs), batch):
        ids, mask = pad(seqs[i : i + batch], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (b, C): head on every token, last picked
        out.append(
            logits[torch.arange(ids.shape[0], device=device), torch.tensor(heads[i : i + batch], device=device)].float()
        )
    s = torch.cat(out)
    sync(device)
    return s.cpu(), time.perf_counter() - t0


def bench_pool(rm, base, tok, rows, device: str, amp: str, vllm_timeout: int, skip_vllm: bool) -> dict:
    seqs = [row_ids(rm, *r) for r in rows]
    heads = [rm.head_id(r[0]) for r in rows]
    rm.score(rows[:4])  # warm-up (bf16 weight copy, kernels)
    rm.encoder.tokens.clear()  # cold token cache: tokenisation inside our timing
    sync(device)
    ours, rep = rm.score_with_report(rows)
    sync(device)
    hf_model = copy.deepcopy(base).to(torch.bfloat16) if amp == "bf16" else base
    hf_batched_scores(hf_model, seqs[:8], heads[:8], tok.pad_token_id, device, 64)  # warm-up
    hf, t_hf = hf_batched_scores(hf_model, seqs, heads, tok.pad_token_id, device, 64)
    res = {
        "rows": len(rows),
        "prompt_tokens": len(rm.tokenise(*rows[0]).prefix),
        "mean_row_tokens": sum(map(len, seqs)) / len(seqs),
        "ours_rows_per_s": len(rows) / rep.seconds,
        "ours_seconds": rep.seconds,
        "ours_amp": rep.amp,
        "ours_prefix_sharing": rep.prefix_sharing,
        "ours_tokens_encoded": rep.tokens_encoded,
        "hf_rows_per_s": len(rows) / t_hf,
        "hf_seconds": t_hf,
        "hf_batch": 64,
        "hf_dtype": "bfloat16" if amp == "bf16" else "float32",
        "speedup_vs_hf": t_hf / rep.seconds,
        "ours_vs_hf_max_abs_diff": float((ours - hf).abs().max()),
        "score_std": float(hf.std()),
        "ours_vs_hf_spearman": spearman(ours.tolist(), hf.tolist()),
    }
    if skip_vllm:
        res["vllm"] = {"skipped": "--skip-vllm"}
    else:
        res["vllm"] = bench_vllm(hf_model, tok, seqs, device, vllm_timeout)
        if "rows_per_s" in res["vllm"]:
            res["speedup_vs_vllm"] = res["ours_rows_per_s"] / res["vllm"]["rows_per_s"]
    if hf_model is not base:
        del hf_model
    return res


def bench_vllm(model, tok, seqs, device: str, timeout: int) -> dict:
    """vLLM's pooling runner (classify, prefix caching on) on the same token ids, in its own process (it
    takes the GPU's memory and spawns workers); the model is saved as a sequence-classification checkpoint."""
    try:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return {"skipped": "vllm is not installed"}
    except (ImportError, ValueError) as e:
        return {"skipped": f"vllm is not importable: {e}"}
    if not device.startswith("cuda"):
        return {"skipped": "the GPU workload's vLLM comparison runs on CUDA only"}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        with open(os.path.join(d, "rows.json"), "w") as f:
            json.dump(seqs, f)
        try:
            p = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--vllm-worker", d],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"skipped": f"vLLM did not finish within {timeout} s"}
        if p.returncode != 0:
            return {"skipped": f"vLLM failed (exit {p.returncode}): {p.stderr.strip()[-500:]}"}
        return json.loads(p.stdout.strip().splitlines()[-1])


def vllm_worker(d: str) -> None:
    from vllm import LLM

    with open(os.path.join(d, "rows.json")) as f:
        seqs = json.load(f)
    t0 = time.perf_counter()
    llm = LLM(
        model=d,
        runner="pooling",
        convert="classify",
        enable_prefix_caching=True,
        dtype="bfloat16",
        gpu_memory_utilization=0.35,
        max_model_len=1024,
        seed=0,
    )
    load = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": s} for s in seqs]
    llm.classify(prompts[:4], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.classify(prompts, use_tqdm=False)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "rows": len(seqs),
                "seconds": seconds,
                "rows_per_s": len(seqs) / seconds,
                "load_seconds": load,
                "prefix_caching": True,
            }
        )
    )


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--amp", choices=["bf16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    ap.add_argument("--train-inputs", type=int, default=8, help="inputs with 5 candidates each (10 pairs each)")
    ap.add_argument("--baseline-pairs", type=int, default=40, help="pairs the batch-2 baselines train on")
    ap.add_argument(
        "--pools",
        type=parse_pools,
        default=parse_pools("1x1024,64x32"),
        help="pools to score, PROMPTSxCANDIDATES[,...]; the first is compared with vLLM too",
    )
    ap.add_argument("--prefix-words", type=int, default=300)
    ap.add_argument("--suffix-words", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--vllm-timeout", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON results file (default: benchmarks/_out/gpu_workloads.json)")
    ap.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_worker:
        vllm_worker(args.vllm_worker)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "bench_gpu_workloads: no CUDA device is visible (torch.cuda.is_available() is False); "
            "use --device cpu --size tiny for a smoke run"
        )
    amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    rm, base, tok, model_info = build(args.size, args.device, args.seed, amp)
    results = {"argv": sys.argv[1:], "model": {"size": args.size, **model_info}, "amp": amp}
    print(f"model: {model_info}", file=sys.stderr, flush=True)

    # pool scoring first: ours and the HF model still hold identical weights and heads; "pool" is the first
    # pool (vLLM's comparison), "pools" all of them by name
    results["pools"] = {}
    for i, (n_prompts, n_cands) in enumerate(args.pools):
        rows = pool_rows(rng, n_prompts, n_cands, args.prefix_words, args.suffix_words)
        res = bench_pool(rm, base, tok, rows, args.device, amp, args.vllm_timeout, args.skip_vllm or i > 0)
        res["prompts"], res["candidates"] = n_prompts, n_cands
        results["pools"][f"{n_prompts}x{n_cands}"] = res
        print(f"pool {n_prompts}x{n_cands}: {json.dumps(res)}", file=sys.stderr, flush=True)
    results["pool"] = next(iter(results["pools"].values()))

    pairs = make_pairs(rng, args.train_inputs, 5, args.prefix_words, 60)
    warm = make_pairs(rng, 1, 5, args.prefix_words, 60)
    lr_ours = args.lr * math.sqrt(10 / 2)  # square-root batch scaling, as bench_reward.py
    results["train"] = {"ours": measured(args.device, train_ours, rm, pairs, warm, lr_ours, 10, args.device)}
    print(f"train ours: {results['train']['ours']}", file=sys.stderr, flush=True)
    base_pairs = pairs[: args.baseline_pairs]
    # ours at the baselines' batch (2 pairs): pairs/s and peak memory at the same batch as TRL's
    results["train"]["ours_batch2"] = measured(
        args.device, train_ours, rm, base_pairs, warm[:2], args.lr, 2, args.device
    )
    results["train"]["trl"] = (
        {"skipped": "--skip-trl"}
        if args.skip_trl
        else measured(args.device, train_trl, base, rm, tok, base_pairs, args.lr, args.device, amp)
    )
    results["train"]["reference_way"] = measured(
        args.device, train_reference_way, base, rm, tok, base_pairs, args.lr, args.device, amp
    )
    tr = results["train"]
    tr["speedup_vs_reference_way"] = tr["ours"]["pairs_per_s"] / tr["reference_way"]["pairs_per_s"]
    if "pairs_per_s" in tr["trl"]:
        tr["speedup_vs_trl"] = tr["ours"]["pairs_per_s"] / tr["trl"]["pairs_per_s"]
    print(f"train: {json.dumps(tr)}", file=sys.stderr, flush=True)
    if args.device.startswith("cuda"):
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["wall_seconds"] = time.perf_counter() - t_start
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"name": "gpu_workloads", "machine": machine_info(), **results}, f, indent=1, default=str)
        path = args.out
    else:
        path = write_results("gpu_workloads", results)
    print(
        json.dumps(
            {
                "written": path,
                "pool_speedup_vs_hf": results["pool"]["speedup_vs_hf"],
                "train_speedup_vs_reference_way": tr["speedup_vs_reference_way"],
            }
        )
    )


if __name__ == "__main__":
    main()
