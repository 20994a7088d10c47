"""Where reward training's memory goes: ours (RewardModel.train) or TRL's RewardTrainer, one system per process,
on the unique PubMedQA pairs of make_unique_pairs.py (the setting of bench_reward.py --unique).

Reports, per system:
- the resident tensors by role: weights, gradients, optimizer state (AdamW moments), the bf16 scoring copy of
  the backbone (ours, score_weights="cast");
- the tensors autograd saves for backward during one step (``torch.autograd.graph.saved_tensors_hooks``, each
  storage counted once), by dtype and by shape family (the fp32 q/k/v/out of the attention backward show up
  as fp32 (B, heads, T, d) tensors);
- the peak RSS of each phase (model load, warm-up scoring, each training step, held-out scoring), measured by
  resetting the kernel's high-water mark (``/proc/self/clear_refs``) before the phase and reading ``VmHWM``
  after it, and the process's peak RSS overall;
- optionally (--torch-profile) torch.profiler's op-level memory (``profile_memory=True``) of one step: the ops
  that allocate the most.

    python benchmarks/profile_reward_memory.py --unique benchmarks/_out/unique_pairs --kind encoder --system ours
    python benchmarks/profile_reward_memory.py --unique benchmarks/_out/unique_pairs --kind encoder --system trl

Extra settings of ours go through --set key=value (RewardModelConfig fields, e.g. --set score_weights=autocast).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import numpy as np
import torch
from bench_reward import TemplateIds, ours_correct, unique_model

from optimas_fast.reward import RewardModel, RewardModelConfig, TemplateConfig, cpu_has_native_bf16
from optimas_fast.reward.formats import load_pairs
from optimas_fast.reward.lean import apply_lean_modules
from optimas_fast.reward.trainer import Trainer

MiB = 1024 * 1024


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return float("nan")


class Phases:
    """Peak RSS per phase: the kernel's high-water mark reset before, read after (Linux >= 4.0)."""

    def __init__(self):
        self.rows: list[dict] = []

    def start(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def end(self, name: str, **extra) -> None:
        self.rows.append(
            {
                "phase": name,
                "peak_rss_mib": round(_status("VmHWM"), 1),
                "rss_after_mib": round(_status("VmRSS"), 1),
                **extra,
            }
        )


class SavedTensors:
    """Bytes autograd saves for backward, each storage once, by dtype and by (dtype, rank, last dim)."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self.by_kind: dict[str, int] = defaultdict(int)

    def pack(self, t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self.seen:
            self.seen[key] = n
            self.by_kind[f"{str(t.dtype).replace('torch.', '')} rank{t.dim()} last{tuple(t.shape)[-1:]}"] += n
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def summary(self) -> dict:
        by_dtype: dict[str, float] = defaultdict(float)
        for k, n in self.by_kind.items():
            by_dtype[k.split()[0]] += n / MiB
        top = sorted(self.by_kind.items(), key=lambda kv: -kv[1])[:8]
        return {
            "total_mib": round(sum(self.seen.values()) / MiB, 1),
            "by_dtype_mib": {k: round(v, 1) for k, v in by_dtype.items()},
            "largest_kinds_mib": {k: round(v / MiB, 1) for k, v in top},
        }


def tensor_bytes(ts) -> float:
    seen, n = set(), 0
    for t in ts:
        if t is None:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return round(n / MiB, 1)


def optimizer_bytes(opt) -> float:
    return tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def top_ops(prof, n: int = 12) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        if e.cpu_memory_usage > 0:
            rows.append({"op": e.key, "calls": e.count, "alloc_mib": round(e.cpu_memory_usage / MiB, 1)})
    return sorted(rows, key=lambda r: -r["alloc_mib"])[:n]


def run_ours(args, train, held, template, bf16: bool) -> dict:
    ph = Phases()
    ph.start()
    name, model, tok = unique_model(args.kind, "ours", args.seed, args.decoder, args.max_length)
    extra = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)  # numbers, true / false / null
        except json.JSONDecodeError:
            extra[k] = v  # a plain string
    cfg = RewardModelConfig(seed=args.seed, amp="bf16" if bf16 else "none", template=template, **extra)
    rm = RewardModel(model, dict(train.components), tokenizer=tok, config=cfg)
    ph.end("load + build")
    ph.start()
    rm.score([(p.component, p.inputs, p.chosen) for p in train[:2]])  # the bench's warm-up
    cast = rm.encoder.precision.cast_copy
    ph.end("warm-up score", bf16_copy_mib=tensor_bytes(cast[1].parameters()) if cast else 0.0)
    rm.encoder.tokens.clear()
    saved = SavedTensors()
    step = Trainer.step
    steps: list[dict] = []

    def traced(self, *a, **k):
        ph.start()
        saved.seen.clear()
        saved.by_kind.clear()
        with saved.hooks():
            out = step(self, *a, **k)
        ph.end(f"train step {len(steps)}")
        steps.append(saved.summary())
        return out

    Trainer.step = traced
    prof = None
    try:
        if args.torch_profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                rm.train(train[: args.batch_pairs], epochs=1, lr=args.lr, batch_pairs=args.batch_pairs)
        t0 = time.perf_counter()
        rm.train(train, epochs=1, lr=args.lr, batch_pairs=args.batch_pairs)
        seconds = time.perf_counter() - t0
    finally:
        Trainer.step = step
    net = rm.encoder.net
    resident = {
        "weights_mib": tensor_bytes(net.parameters()),
        "grads_mib": tensor_bytes(p.grad for p in net.parameters()),
        "optimizer_state_mib": optimizer_bytes(rm.trainer.optimizer),
        "bf16_copy_mib": tensor_bytes(rm.encoder.precision.cast_copy[1].parameters())
        if rm.encoder.precision.cast_copy
        else 0.0,
    }
    ph.start()
    acc = float(np.mean(ours_correct(rm, held)))
    ph.end("held-out score")
    return {
        "backbone": name,
        "config": extra,
        "resident": resident,
        "phases": ph.rows,
        "saved_for_backward_per_step": steps,
        "seconds": seconds,
        "heldout_acc": acc,
        "torch_profile_top_ops": top_ops(prof) if prof else None,
    }


def run_trl(args, train, held, template, bf16: bool) -> dict:
    import tempfile

    from bench_reward import Baseline
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    ph = Phases()
    ph.start()
    name, model, tok = unique_model(args.kind, "trl", args.seed, args.decoder, args.max_length)
    ids = TemplateIds(tok, template, is_encoder=(args.kind == "encoder"))
    base = Baseline(model, tok, ids)
    ph.end("load + build")
    ph.start()
    base.score([(p.component, p.inputs, p.chosen) for p in train[:2]])
    ph.end("warm-up score")
    saved = SavedTensors()
    steps: list[dict] = []

    class Cb(TrainerCallback):
        def on_step_begin(self, *a, **k):
            ph.start()
            saved.seen.clear()
            saved.by_kind.clear()

        def on_step_end(self, *a, **k):
            ph.end(f"train step {len(steps)}")
            steps.append(saved.summary())

    rows = [
        {
            "chosen_ids": base.ids(p.component, p.inputs, p.chosen),
            "rejected_ids": base.ids(p.component, p.inputs, p.rejected),
        }
        for p in train
    ]
    with tempfile.TemporaryDirectory() as out:
        targs = TRLConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_pairs,
            num_train_epochs=1,
            learning_rate=args.lr,
            bf16=bf16,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            max_length=None,
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=10**9,
            dataloader_num_workers=0,
        )
        trainer = RewardTrainer(
            model=model, args=targs, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Cb()]
        )
        t0 = time.perf_counter()
        with saved.hooks():
            trainer.train()
        seconds = time.perf_counter() - t0
    resident = {
        "weights_mib": tensor_bytes(model.parameters()),
        "grads_mib": tensor_bytes(p.grad for p in model.parameters()),
        "optimizer_state_mib": optimizer_bytes(trainer.optimizer),
    }
    ph.start()
    base.logits = lambda seqs, heads: Baseline.logits(base, seqs, [0] * len(seqs))
    acc = float(np.mean(base.correct(held)))
    ph.end("held-out score")
    return {
        "backbone": name,
        "resident": resident,
        "phases": ph.rows,
        "saved_for_backward_per_step": steps,
        "seconds": seconds,
        "heldout_acc": acc,
    }


def speed_ab(args, train, template, bf16: bool) -> dict:
    """Seconds per training step for several train_chunk_tokens settings in ONE process on one model, round-robin
    over the same batches (lr 0: the weights stay put, so every setting does the same work): an A/B that a shared
    machine's load affects alike."""
    from optimas_fast.reward.trainer import PairBatch, pair_rows

    _, model, tok = unique_model(args.kind, "ours", args.seed, args.decoder, args.max_length)
    rm = RewardModel(
        model,
        dict(train.components),
        tokenizer=tok,
        config=RewardModelConfig(seed=args.seed, amp="bf16" if bf16 else "none", template=template),
    )
    B = args.batch_pairs
    batches = [
        PairBatch(pair_rows(rm.encoder, train[i : i + B]), [1.0] * len(train[i : i + B]))
        for i in range(0, len(train) - B + 1, B)
    ]
    backbone = rm.encoder.net.backbone

    def set_lean(mode: str) -> None:  # lean_activations is read at build: switch the module instances directly
        for m in backbone.modules():
            vars(m).pop("forward", None)
        if mode != "none":
            apply_lean_modules(backbone, mlp=mode == "all")

    if args.ab_lean:
        settings = {mode: (lambda mode=mode: set_lean(mode)) for mode in ("norm", "all", "none")}
    elif args.ab_bucket:  # read live by each encode call
        settings = {
            "bucket32": lambda: setattr(rm.encoder.config, "padding_bucket", 32),
            "exact": lambda: setattr(rm.encoder.config, "padding_bucket", None),
        }
    elif args.ab_checkpointing:  # read live by each step
        settings = {
            "checkpointing": lambda: setattr(rm.encoder.config, "gradient_checkpointing", True),
            "plain": lambda: setattr(rm.encoder.config, "gradient_checkpointing", False),
        }
    else:
        settings = {
            str(c): (lambda c=c: setattr(rm.encoder.config, "train_chunk_tokens", None if c == 0 else c))
            for c in args.ab_chunks
        }
    times: dict[str, list[float]] = {k: [] for k in settings}
    rm.trainer.step(batches[0], 0.0)  # warm-up: optimizer state, first-call costs
    for _ in range(args.ab_reps):
        for batch in batches:
            for k, apply in settings.items():
                apply()
                t0 = time.perf_counter()
                rm.trainer.step(batch, 0.0)
                times[k].append(time.perf_counter() - t0)
    return {
        "ab_seconds_per_step_median": {k: round(float(np.median(v)), 3) for k, v in times.items()},
        "ab_seconds_per_step_mean": {k: round(float(np.mean(v)), 3) for k, v in times.items()},
        "steps_each": len(next(iter(times.values()))),
        "load_average_end": os.getloadavg(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unique", required=True, metavar="DIR", help="make_unique_pairs.py output")
    ap.add_argument("--kind", choices=["encoder", "decoder"], default="encoder")
    ap.add_argument("--decoder", choices=["random", "smollm2"], default="random")
    ap.add_argument("--system", choices=["ours", "trl"], default="ours")
    ap.add_argument("--train-pairs", type=int, default=32)
    ap.add_argument("--heldout-pairs", type=int, default=16)
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ours: a RewardModelConfig field")
    ap.add_argument("--torch-profile", action="store_true", help="ours: op-level memory of one extra step first")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument(
        "--ab-chunks",
        type=int,
        nargs="+",
        default=None,
        metavar="TOKENS",
        help="instead: a same-process speed A/B of these train_chunk_tokens (0 = no chunking)",
    )
    ap.add_argument(
        "--ab-lean", action="store_true", help="instead: a same-process speed A/B of lean_activations norm / all / none"
    )
    ap.add_argument(
        "--ab-checkpointing",
        action="store_true",
        help="instead: a same-process speed A/B of gradient_checkpointing on / off",
    )
    ap.add_argument(
        "--ab-bucket", action="store_true", help="instead: a same-process speed A/B of padding_bucket 32 / None"
    )
    ap.add_argument("--ab-reps", type=int, default=2, help="--ab-chunks / --ab-lean: passes over the batches")
    args = ap.parse_args()
    args.lr = args.lr or {"encoder": 5e-5, "decoder": 2e-5 if args.decoder == "smollm2" else 3e-4}[args.kind]
    train = load_pairs(os.path.join(args.unique, "train.jsonl"))
    held = load_pairs(os.path.join(args.unique, "heldout.jsonl"))
    template = TemplateConfig(max_length=args.max_length, prefix_format=train.prefix_format or "{inputs}")
    train, held = train[: args.train_pairs], held[: args.heldout_pairs]
    bf16 = {"auto": cpu_has_native_bf16(), "bf16": True, "fp32": False}[args.precision]
    if args.ab_chunks or args.ab_lean or args.ab_checkpointing or args.ab_bucket:
        print(
            json.dumps(
                {
                    "kind": args.kind,
                    "decoder": args.decoder,
                    "pairs": len(train),
                    "batch_pairs": args.batch_pairs,
                    "load_average_start": os.getloadavg(),
                    **speed_ab(args, train, template, bf16),
                },
                indent=1,
            )
        )
        return
    run = run_ours if args.system == "ours" else run_trl
    out = {
        "system": args.system,
        "kind": args.kind,
        "decoder": args.decoder,
        "pairs": len(train),
        "batch_pairs": args.batch_pairs,
        "precision": "bf16" if bf16 else "fp32",
        "load_average_start": os.getloadavg(),
        **run(args, train, held, template, bf16),
    }
    # the phases tile the run, and resetting the high-water mark resets ru_maxrss too: the peak is their max
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in out["phases"])
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
