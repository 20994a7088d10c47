"""LRF engine benchmark: optimas-fast RewardModel vs the reference way of training/scoring a reward model.

Baseline (the reference implementation's way): AutoModelForSequenceClassification with num_labels = C,
chosen and rejected as two separate forward passes padded to the longest row of the batch, batch size 2, the
classification head applied to every token (decoders) and the component's logit picked afterwards; token
ids are prepared before the clock starts (as the reference's dataset.map does).

Ours: RewardModel.train / RewardModel.score on the same pairs / rows with the same backbone weights:
dedupe of candidates shared by several pairs, chosen+rejected in one call, scheduler batches, prefix
sharing on the decoder (KV cache of the shared prefix), multi-head ops on gathered states only.

Workloads (synthetic, deterministic): each input has K candidates with distinct hidden qualities; pairs are
all ordered pairs (the Optimas construction), margin = quality gap. Quality is visible in the candidate text
(counts of marker words), so both trainers can learn it.

Fair accuracy comparison. The baseline takes one AdamW step per 2 pairs at lr; ours takes one step per
input's pairs (K(K-1)/2 = 10 for K = 5, whose 5 unique rows go through the backbone in one call), i.e. ~5x
fewer updates per epoch. Ours therefore runs at lr * sqrt(batch_pairs / 2): the square-root scaling rule for
Adam-type optimizers (Malladi et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms",
NeurIPS 2022). Held-out accuracy is measured on several hundred pairs (--heldout-inputs x 10) for both, with
a 95% cluster-bootstrap CI over held-out inputs (pairs of one input are correlated) for each accuracy and for
the paired difference ours - baseline. Held-out scoring is untimed.

Scoring precision. Ours scores with RewardModelConfig defaults (score_amp="auto": bf16 on CPUs with native bf16
GEMMs, e.g. avx512_bf16, through a bf16 copy of the backbone, score_weights="cast"); the same pool is also
scored in fp32 (score_amp="none") and with bf16 autocast over the fp32 weights (score_weights="autocast") on
--check-inputs inputs, which gives their speeds and their agreement with fp32 (max |diff|, overall
Spearman, mean within-input Spearman, top-1 agreement). The baseline is always fp32, batch 2, transformers'
default attention.

    python benchmarks/bench_reward.py              # CPU-sized defaults
    python benchmarks/bench_reward.py --full       # the issue's sizes (520 pairs, 400 held-out, 64 x 32 pool)

Unique-pair mode (--unique DIR): TRL-style PubMedQA pairs where every pair is unique (make_unique_pairs.py; made
in DIR when missing), read through optimas_fast.reward.load_pairs, trained at the same data, batch size
(--batch-pairs), epochs and learning rate: ours (RewardModel.train, the engine's defaults), ours through
optimas_fast.trl.RewardTrainer (with --trl: a TRL script with its import changed, TRL's arguments, text rows
from the JSONL), TRL's RewardTrainer (with --trl), and the reference's way (batch 2, fp32, chosen and rejected in
separate passes, lr / sqrt(batch / 2)). Ours and TRL run
bf16 where the CPU has native bf16 (--precision auto), else fp32. Each system runs in its own process so that
its peak RSS is its own. Reports pairs/s, peak RSS, held-out accuracy with 95% bootstrap intervals (pairs are
independent: one per question) and rho = 2(P+S)/(P+2S), the token reduction that sharing a pair's prompt allows
(P prompt tokens, S response tokens, as the template tokenises them):

    python benchmarks/bench_reward.py --unique benchmarks/_out/unique_pairs --trl --json unique.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from optimas_fast.backbones import minilm_path  # noqa: E402
from optimas_fast.reward import (  # noqa: E402
    DEFAULT_BACKBONE,
    PreferencePair,
    RewardModel,
    RewardModelConfig,
    TemplateConfig,
    backend_report,
    cpu_has_native_bf16,
    load_backbone,
    spearman,
)
from optimas_fast.reward.formats import load_pairs  # noqa: E402
from optimas_fast.reward.template import TokenCache  # noqa: E402

FILLER = (
    "the of and to in is was for on that with as by at from it an be this are which or have has not "
    "were but had their more one all been also its other can new two time first used may into such "
    "system model data result study group method high number based between use each both value over "
    "under during while where these those than most some many well only after before same large small "
    "paper answer question evidence patient trial effect level cell gene protein sample rate risk"
).split()
COMPONENTS = ("answer", "context", "reason")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(n))


def candidate(rng: random.Random, q: int, n_tokens: int) -> str:
    marks = ["excellent"] * q + ["poor"] * (5 - q)
    body = marks + words(rng, max(1, n_tokens - len(marks))).split()
    rng.shuffle(body)
    return " ".join(body)


def make_pairs(rng: random.Random, n_inputs: int, k: int, prefix_tok: int, suffix_tok: int, n_components: int = 3):
    pairs = []
    for i in range(n_inputs):
        comp, inp = COMPONENTS[i % n_components], f"case {i}: " + words(rng, prefix_tok)
        cands = [(q, candidate(rng, q, suffix_tok)) for q in rng.sample(range(6), k)]
        for qa, ta in cands:
            for qb, tb in cands:
                if qa > qb:
                    pairs.append(PreferencePair(comp, inp, ta, tb, (qa - qb) / 5))
    return pairs


# ------------------------------------------------------------------------------------------------ baseline
class Baseline:
    """The reference trainer's computation, stripped of Trainer overhead (which only makes it slower)."""

    def __init__(self, model, tok, rm: RewardModel):
        self.model, self.tok, self.rm = model, tok, rm  # rm: same template text and head ids

    def ids(self, comp: str, inputs: str, outputs: str) -> list[int]:
        t = self.rm.tokenise(comp, inputs, outputs)  # identical token ids to ours: same work per row
        return list(t.prefix + t.suffix)

    def _pad(self, seqs):
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.tok.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, (ids != self.tok.pad_token_id).long()

    def logits(self, seqs, heads):
        ids, mask = self._pad(seqs)
        out = self.model(input_ids=ids, attention_mask=mask).logits  # (2, C): head on every token for decoders
        return out[torch.arange(len(seqs)), torch.tensor(heads)]

    def train(self, pairs, epochs: int, lr: float, seed: int) -> tuple[float, int]:
        data = [
            (
                self.ids(p.component, p.inputs, p.chosen),
                self.ids(p.component, p.inputs, p.rejected),
                self.rm.head_id(p.component),
                p.margin,
            )
            for p in pairs
        ]
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.model.train()
        g = random.Random(seed)
        t0 = time.perf_counter()
        steps = 0
        for _ in range(epochs):
            order = list(range(len(data)))
            g.shuffle(order)
            for i in range(0, len(order), 2):
                batch = [data[j] for j in order[i : i + 2]]
                heads = [b[2] for b in batch]
                rc = self.logits([b[0] for b in batch], heads)  # pass 1: chosen
                rr = self.logits([b[1] for b in batch], heads)  # pass 2: rejected
                m = torch.tensor([b[3] for b in batch])
                loss = -(m * F.logsigmoid(rc - rr)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
        return time.perf_counter() - t0, steps

    @torch.inference_mode()
    def score(self, rows) -> tuple[torch.Tensor, float]:
        self.model.eval()
        t0 = time.perf_counter()
        data = [(self.ids(*r), self.rm.head_id(r[0])) for r in rows]
        out = []
        for i in range(0, len(data), 2):
            b = data[i : i + 2]
            out.append(self.logits([x[0] for x in b], [x[1] for x in b]))
        return torch.cat(out), time.perf_counter() - t0

    @torch.inference_mode()
    def correct(self, pairs, batch: int = 16) -> np.ndarray:
        """Per-pair 1 / 0.5 / 0 (tie) for the held-out set; untimed, so unique rows in larger batches
        (same math as batch 2: padded positions are masked out)."""
        self.model.eval()
        rows = sorted({(p.component, p.inputs, o) for p in pairs for o in (p.chosen, p.rejected)})
        data = [(self.ids(*r), self.rm.head_id(r[0])) for r in rows]
        order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
        score = {}
        for i in range(0, len(order), batch):
            b = [data[j] for j in order[i : i + batch]]
            for j, v in zip(order[i : i + batch], self.logits([x[0] for x in b], [x[1] for x in b]).tolist()):
                score[rows[j]] = v
        d = np.array(
            [score[(p.component, p.inputs, p.chosen)] - score[(p.component, p.inputs, p.rejected)] for p in pairs]
        )
        return (d > 0) + 0.5 * (d == 0)


# ------------------------------------------------------------------------------------------------ TRL
def bench_trl(
    model, base: Baseline, train, held, epochs: int, lr: float, seed: int, batch: int = 2, bf16: bool = False
) -> dict:
    """The same pairs through TRL's RewardTrainer (second baseline): its own collator puts chosen and rejected
    of 2 pairs in one padded forward pass, one reward head (num_labels=1), linear LR decay, AdamW; token ids
    are the same as ours (pre-tokenised columns, so its tokeniser never runs inside the clock)."""
    import tempfile

    from datasets import Dataset
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    rows = [
        {
            "chosen_ids": base.ids(p.component, p.inputs, p.chosen),
            "rejected_ids": base.ids(p.component, p.inputs, p.rejected),
        }
        for p in train
    ]
    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            num_train_epochs=epochs,
            learning_rate=lr,
            bf16=bf16,
            save_strategy="no",
            report_to=[],
            seed=seed,
            max_length=None,
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=10**9,
            dataloader_num_workers=0,
        )
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=base.tok
        )
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    trl_base = Baseline(model, base.tok, base.rm)
    trl_base.logits = lambda seqs, heads: Baseline.logits(trl_base, seqs, [0] * len(seqs))  # one head
    correct = trl_base.correct(held)
    n = len(train) * epochs
    return {
        "trl_pairs_per_s": n / seconds,
        "trl_seconds": seconds,
        "trl_heldout_acc": float(correct.mean()),
        "trl_steps": int(trainer.state.global_step),
    }, correct


# ------------------------------------------------------------------------------------------------ set-ups
def encoder_pair(seed: int, max_len: int):
    torch.manual_seed(seed)
    backbone, tok = load_backbone(DEFAULT_BACKBONE)
    path = backbone.config._name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(COMPONENTS), local_files_only=True)
    rm = RewardModel(
        backbone,
        list(COMPONENTS),
        tokenizer=tok,
        config=RewardModelConfig(seed=seed, template=TemplateConfig(max_length=max_len)),
    )
    return "MiniLM-L6 encoder (pretrained, 22.7M)", rm, Baseline(base, tok, rm)


def decoder_pair(seed: int, max_len: int, hidden: int = 384, layers: int = 6):
    _, tok = load_backbone(DEFAULT_BACKBONE)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=max(1024, max_len),
        num_labels=len(COMPONENTS),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    base = LlamaForSequenceClassification(cfg)
    backbone = type(base.model)(cfg)
    backbone.load_state_dict(base.model.state_dict())  # identical backbone weights on both sides
    rm = RewardModel(
        backbone,
        list(COMPONENTS),
        tokenizer=tok,
        config=RewardModelConfig(seed=seed, template=TemplateConfig(max_length=max_len)),
    )
    with torch.no_grad():  # identical heads too: scores must then agree with the baseline's (checked)
        for i, key in enumerate(rm.encoder.net.head_keys):
            rm.encoder.net.head_weight[key].copy_(base.score.weight[i])
            rm.encoder.net.head_bias[key].zero_()
    n = sum(p.numel() for p in backbone.parameters()) / 1e6
    return f"Llama-like decoder (random init, hidden {hidden}, {layers} layers, {n:.1f}M)", rm, Baseline(base, tok, rm)


def trl_twin(model, seed: int):
    """A num_labels=1 copy of a baseline model (same backbone weights) for TRL, made before any training."""
    import copy

    cfg = copy.deepcopy(model.config)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    twin = type(model)(cfg)
    missing, _ = twin.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("classifier.", "score."))}, strict=False
    )
    assert all(k.startswith(("classifier.", "score.")) for k in missing), missing
    return twin


# ------------------------------------------------------------------------------------------------ runs
def ours_correct(rm: RewardModel, pairs) -> np.ndarray:
    n = len(pairs)
    s = (
        rm.score(
            [(p.component, p.inputs, p.chosen) for p in pairs] + [(p.component, p.inputs, p.rejected) for p in pairs]
        )
        .double()
        .numpy()
    )
    d = s[:n] - s[n:]
    return (d > 0) + 0.5 * (d == 0)


def cluster_bootstrap(groups: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int = 4000, seed: int = 0) -> dict:
    """95% percentile CIs of mean(a), mean(b) and mean(a - b), resampling whole groups (held-out inputs)."""
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    sa, sb, cnt = (np.array([x[m].sum() for m in members]) for x in (a, b, np.ones_like(a)))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(ids), size=(reps, len(ids)))  # (reps, G)
    n = cnt[pick].sum(1)
    ma, mb = sa[pick].sum(1) / n, sb[pick].sum(1) / n
    q = lambda x: [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]  # noqa: E731
    return {"a": q(ma), "b": q(mb), "diff": q(ma - mb)}


def bench_training(
    name, rm, base, train, held, epochs, lr, batch_pairs, seed, trl_model=None, ours_epochs=None, head_lr_mult=None
):
    """``ours_epochs`` (default: ``epochs``) lets ours train longer than the baselines: speedups are then
    throughput ratios (pairs/s) and the ``*_wall_ratio`` fields compare total training times."""
    ours_epochs = ours_epochs or epochs
    base.score([(p.component, p.inputs, p.chosen) for p in train[:2]])  # warm-up, untimed
    rm.score([(p.component, p.inputs, p.chosen) for p in train[:2]])
    t_base, steps_base = base.train(train, epochs, lr, seed)
    c_base = base.correct(held)
    lr_ours = lr * math.sqrt(batch_pairs / 2)  # square-root rule for Adam: batch 2 -> batch_pairs
    t0 = time.perf_counter()
    extra = {} if head_lr_mult is None else {"head_lr": head_lr_mult * lr_ours}
    hist = rm.train(train, epochs=ours_epochs, lr=lr_ours, batch_pairs=batch_pairs, **extra)
    t_ours = time.perf_counter() - t0
    c_ours = ours_correct(rm, held)
    groups = np.array([hash((p.component, p.inputs)) for p in held])
    ci = cluster_bootstrap(groups, c_ours, c_base, seed=seed)
    n, n_ours = len(train) * epochs, len(train) * ours_epochs
    trl = {}
    if trl_model is not None:
        trl, c_trl = bench_trl(trl_model, base, train, held, epochs, lr, seed)
        trl["speedup_vs_trl"] = (n_ours / t_ours) / trl["trl_pairs_per_s"]
        trl["trl_wall_ratio"] = trl["trl_seconds"] / t_ours
        trl["acc_diff_ours_minus_trl_ci95"] = cluster_bootstrap(groups, c_ours, c_trl, seed=seed)["diff"]
    return {
        **trl,
        "backbone": name,
        "pairs": len(train),
        "epochs": epochs,
        "ours_epochs": ours_epochs,
        "ours_head_lr_mult": head_lr_mult if head_lr_mult is not None else "default (20)",
        "baseline_steps": steps_base,
        "ours_steps": len(hist),
        "baseline_lr": lr,
        "ours_lr": lr_ours,
        "ours_batch_pairs": batch_pairs,
        "baseline_pairs_per_s": n / t_base,
        "ours_pairs_per_s": n_ours / t_ours,
        "speedup": (n_ours / t_ours) / (n / t_base),
        "baseline_wall_ratio": t_base / t_ours,
        "baseline_seconds": t_base,
        "ours_seconds": t_ours,
        "heldout_pairs": len(held),
        "heldout_inputs": len(set(groups.tolist())),
        "heldout_acc_baseline": float(c_base.mean()),
        "heldout_acc_ours": float(c_ours.mean()),
        "acc_ci95_baseline": ci["b"],
        "acc_ci95_ours": ci["a"],
        "acc_diff_ours_minus_baseline": float(c_ours.mean() - c_base.mean()),
        "acc_diff_ci95": ci["diff"],
        "score_amp_ours_eval": "bf16" if rm.uses_bf16(True) else "fp32",
    }


def score_with(rm: RewardModel, rows, **config):
    """score_with_report with RewardModelConfig fields temporarily set (warmed up, cold token cache)."""
    saved = {k: getattr(rm.encoder.config, k) for k in config}
    for k, v in config.items():
        setattr(rm.encoder.config, k, v)
    try:
        rm.score(rows[:2])
        rm.encoder.tokens.clear()
        return rm.score_with_report(rows)
    finally:
        for k, v in saved.items():
            setattr(rm.encoder.config, k, v)


def bench_scoring(name, rm, base, n_inputs, n_cands, prefix_tok, suffix_tok, seed, check_inputs):
    rng = random.Random(seed)
    rows = []
    for i in range(n_inputs):
        inp = f"case {i}: " + words(rng, prefix_tok)
        rows += [
            (COMPONENTS[i % 3], inp, candidate(rng, rng.randint(0, 5), suffix_tok) + f" v{j}") for j in range(n_cands)
        ]
    base.score(rows[:2])  # warm-up both (first-call allocator / kernel selection costs)
    rm.score(rows[:2])
    s_base, t_base = base.score(rows)
    rm.encoder.tokens.clear()  # cold token cache: tokenisation is inside our timing
    s_ours, rep = rm.score_with_report(rows)
    # the same pool (first check_inputs inputs) in fp32, and with bf16 autocast over the fp32 weights instead
    # of the default bf16 weight copy: their speeds and their agreement with fp32, beside the default's
    n_chk = min(check_inputs, n_inputs) * n_cands
    s32, rep32 = score_with(rm, rows[:n_chk], score_amp="none")
    s_ac, rep_ac = score_with(rm, rows[:n_chk], score_weights="autocast")
    _, rep_chk = score_with(rm, rows[:n_chk])  # the default on the subset, timed like the other two
    t_cast_chk = rep_chk.seconds
    sub = s_ours[:n_chk]
    within = [spearman(sub[i : i + n_cands].tolist(), s32[i : i + n_cands].tolist()) for i in range(0, n_chk, n_cands)]
    top1 = np.mean(
        [int(sub[i : i + n_cands].argmax()) == int(s32[i : i + n_cands].argmax()) for i in range(0, n_chk, n_cands)]
    )
    # decoders: same weights, same heads, same last-token read-out -> same scores (prefix sharing is exact);
    # encoders: the baseline reads BERT's pooler, we mean-pool (by design), so there is nothing to compare
    err = float((s_base[:n_chk] - s32).abs().max()) if not rm.encoder.is_encoder else None
    return {
        "backbone": name,
        "rows": len(rows),
        "baseline_rows_per_s": len(rows) / t_base,
        "ours_rows_per_s": len(rows) / rep.seconds,
        "speedup": t_base / rep.seconds,
        "ours_amp": rep.amp,
        "ours_attention": rep.attention,
        "baseline_attention": str(getattr(base.model.config, "_attn_implementation", "unknown")),
        "baseline_seconds": t_base,
        "ours_seconds": rep.seconds,
        "fp32_check_rows": n_chk,
        "ours_fp32_rows_per_s": n_chk / rep32.seconds,
        "speedup_fp32": (n_chk / rep32.seconds) / (len(rows) / t_base),
        "bf16_vs_fp32_max_abs_diff": float((sub - s32).abs().max()),
        "fp32_score_std": float(s32.std()),
        "bf16_vs_fp32_spearman": spearman(sub.tolist(), s32.tolist()),
        "bf16_vs_fp32_mean_within_input_spearman": float(np.mean(within)),
        "bf16_vs_fp32_top1_agreement": float(top1),
        "ours_score_weights": rm.encoder.config.score_weights,
        "autocast_rows_per_s": n_chk / rep_ac.seconds,
        "default_rows_per_s_same_subset": n_chk / t_cast_chk,
        "autocast_vs_fp32_max_abs_diff": float((s_ac - s32).abs().max()),
        "autocast_vs_fp32_mean_within_input_spearman": float(
            np.mean(
                [
                    spearman(s_ac[i : i + n_cands].tolist(), s32[i : i + n_cands].tolist())
                    for i in range(0, n_chk, n_cands)
                ]
            )
        ),
        "max_abs_score_diff_fp32_vs_baseline": err,
        "prefix_sharing": rep.prefix_sharing,
        "tokens_ours": rep.tokens_encoded,
        "tokens_naive": rep.tokens_naive,
        "backbone_calls": rep.n_batches,
    }


# ------------------------------------------------------------------------------------------------ unique pairs
class TemplateIds:
    """The engine's token ids for a row without building a RewardModel (the same TokenCache and TemplateConfig
    as ours): what the baselines train on, so every system sees identical ids. One head (TRL-style data)."""

    def __init__(self, tok, template: TemplateConfig, is_encoder: bool):
        self.cache = TokenCache(tok, template, is_encoder)

    def tokenise(self, comp: str, inputs: str, outputs: str):
        return self.cache.encode(0, comp, inputs, outputs)

    def head_id(self, comp: str) -> int:
        return 0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def unique_model(kind: str, system: str, seed: int, decoder: str, max_len: int):
    """(name, model, tokenizer) for one system, built alone. Ours gets the bare backbone (AutoModel-like), the
    baselines a num_labels=1 *ForSequenceClassification model with the same backbone weights (same seed)."""
    if kind == "encoder":
        path = str(minilm_path())
        tok = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        model = (
            AutoModel.from_pretrained(path, local_files_only=True)
            if system == "ours"
            else AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
        )
        return "MiniLM-L6 encoder (pretrained, 22.7M)", model, tok
    if decoder == "smollm2":
        from optimas_fast.lm.embedded import ensure_converted

        path = str(ensure_converted())
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        torch.manual_seed(seed)
        model = (
            AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            if system == "ours"
            else AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, local_files_only=True, dtype=torch.float32
            )
        )
        model.config.pad_token_id = tok.pad_token_id
        return "SmolLM2-135M decoder (pretrained, converted from the embedded GGUF)", model, tok
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    hidden, layers = 384, 6
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=max(1024, max_len),
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)  # same RNG stream on every side: identical backbone weights
    if system == "ours":
        model = model.model  # the bare LlamaModel; the score layer is dropped
    n = sum(p.numel() for p in (model.parameters())) / 1e6
    return f"Llama-like decoder (random init, hidden {hidden}, {layers} layers, ~{n:.0f}M)", model, tok


def _trl_rows(path: str, n: int) -> list[dict]:
    """The first n rows of a TRL-format JSONL file, as a TRL user hands them to RewardTrainer."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n]


def unique_run(args) -> dict:
    """One system on the unique-pair data (runs in its own process: --unique-system)."""
    train = load_pairs(os.path.join(args.unique, "train.jsonl"))
    held = load_pairs(os.path.join(args.unique, "heldout.jsonl"))
    train, held = train[: args.train_pairs or None], held[: args.heldout_pairs or None]
    kind, system = args.unique_kind, args.unique_system
    lr = args.lr or {"encoder": 5e-5, "decoder": 2e-5 if args.decoder == "smollm2" else 3e-4}[kind]
    bf16 = {"auto": cpu_has_native_bf16(), "bf16": True, "fp32": False}[args.precision] and system != "reference"
    template = TemplateConfig(max_length=args.max_length, prefix_format=train.prefix_format or "{inputs}")
    name, model, tok = unique_model(kind, system, args.seed, args.decoder, args.max_length)
    ids = TemplateIds(tok, template, is_encoder=(kind == "encoder"))
    toks = [ids.tokenise(p.component, p.inputs, o) for p in train for o in (p.chosen, p.rejected)]
    P = float(np.mean([len(t.prefix) for t in toks]))
    S = float(np.mean([len(t.suffix) for t in toks]))
    out = {
        "kind": kind,
        "system": system,
        "backbone": name,
        "pairs": len(train),
        "heldout_pairs": len(held),
        "epochs": args.epochs,
        "precision": "bf16" if bf16 else "fp32",
        "prompt_tokens": P,
        "response_tokens": S,
        "rho": 2 * (P + S) / (P + 2 * S),
    }
    B = args.batch_pairs
    if system == "ours_trl":
        # the drop-in path: a TRL script with its import changed (optimas_fast.trl), TRL's arguments as the TRL
        # baseline gets them; it reads the JSONL itself, so parsing and tokenising are inside our timing
        import tempfile

        from optimas_fast.trl import RewardConfig as OursTRLConfig
        from optimas_fast.trl import RewardTrainer as OursTRLTrainer

        with tempfile.TemporaryDirectory() as out_dir:
            t0 = time.perf_counter()
            trainer = OursTRLTrainer(
                model=model,
                processing_class=tok,
                train_dataset=_trl_rows(os.path.join(args.unique, "train.jsonl"), len(train)),
                args=OursTRLConfig(
                    output_dir=out_dir,
                    per_device_train_batch_size=B,
                    num_train_epochs=args.epochs,
                    learning_rate=lr,
                    bf16=bf16,
                    save_strategy="no",
                    report_to=[],
                    seed=args.seed,
                    max_length=None,
                    disable_tqdm=True,
                    logging_steps=10**9,
                ),
            )
            trainer.train()
            seconds = time.perf_counter() - t0
        out.update(
            steps=int(trainer.state["global_step"]),
            lr=lr,
            batch_pairs=B,
            prefix_sharing=trainer.model.prefix_sharing_status(),
            append_eos=trainer.append_eos,
            schedule="TRL default (linear decay), through optimas_fast.trl.RewardTrainer",
        )
        correct = ours_correct(trainer.model, held)
    elif system == "ours":
        rm = RewardModel(
            model,
            dict(train.components),
            tokenizer=tok,
            config=RewardModelConfig(seed=args.seed, amp="bf16" if bf16 else "none", template=template),
        )
        rm.score([(p.component, p.inputs, p.chosen) for p in train[:2]])  # warm-up, untimed
        rm.encoder.tokens.clear()  # cold token cache: tokenisation is inside our timing
        out["rss_before_train_mib"] = _rss_mib()
        t0 = time.perf_counter()
        hist = rm.train(train, epochs=args.epochs, lr=lr, batch_pairs=B)
        seconds = time.perf_counter() - t0
        out.update(
            steps=len(hist),
            lr=lr,
            batch_pairs=B,
            prefix_sharing=rm.prefix_sharing_status(),
            schedule="ours default (TrainConfig)",
        )
        correct = ours_correct(rm, held)
    else:
        base = Baseline(model, tok, ids)
        base.score([(p.component, p.inputs, p.chosen) for p in train[:2]])  # warm-up, untimed
        out["rss_before_train_mib"] = _rss_mib()
        if system == "reference":
            lr_ref = lr / math.sqrt(B / 2)  # square-root rule for Adam: batch B -> batch 2 (see module docstring)
            seconds, steps = base.train(train, args.epochs, lr_ref, args.seed)
            out.update(steps=steps, lr=lr_ref, batch_pairs=2, schedule="constant")
            correct = base.correct(held)
        else:
            r, correct = bench_trl(model, base, train, held, args.epochs, lr, args.seed, batch=B, bf16=bf16)
            seconds, steps = r["trl_seconds"], r["trl_steps"]
            out.update(steps=steps, lr=lr, batch_pairs=B, schedule="TRL default (linear decay)")
    out.update(
        seconds=seconds,
        pairs_per_s=len(train) * args.epochs / seconds,
        peak_rss_mib=_peak_rss_mib(),
        heldout_acc=float(np.mean(correct)),
        correct=[float(c) for c in correct],
    )
    return out


def unique_main(args) -> dict:
    """Runs every system in its own process, then compares them (speedups, accuracy differences with CIs)."""
    if not os.path.isfile(os.path.join(args.unique, "train.jsonl")):
        from make_unique_pairs import generate

        print(json.dumps(generate(args.unique, seed=args.seed)), file=sys.stderr, flush=True)
    with open(os.path.join(args.unique, "train.jsonl")) as f:
        n_train = sum(1 for _ in f)
    systems = ["ours"] + (["ours_trl", "trl"] if args.trl else []) + ["reference"]
    kinds = [args.only] if args.only else ["encoder", "decoder"]
    results = {"machine": machine(), "argv": sys.argv[1:], "load_average_start": os.getloadavg(), "unique": []}
    print(f"{results['machine']}\nunique pairs from {args.unique} ({n_train} train pairs in the file)", flush=True)
    passthrough = [
        "--unique",
        args.unique,
        "--seed",
        str(args.seed),
        "--epochs",
        str(args.epochs),
        "--batch-pairs",
        str(args.batch_pairs),
        "--precision",
        args.precision,
        "--decoder",
        args.decoder,
        "--max-length",
        str(args.max_length),
        "--train-pairs",
        str(args.train_pairs or 0),
        "--heldout-pairs",
        str(args.heldout_pairs or 0),
    ] + (["--lr", str(args.lr)] if args.lr else [])
    for kind in kinds:
        runs = {}
        for system in systems:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *passthrough,
                "--unique-kind",
                kind,
                "--unique-system",
                system,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind}/{system} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[system] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = {k: v for k, v in runs[system].items() if k != "correct"}
            print(json.dumps(r), flush=True)
        ours = runs["ours"]
        groups = np.arange(len(ours["correct"]))  # one pair per question: pairs are the resampling unit
        c = {s: np.array(r["correct"]) for s, r in runs.items()}
        summary = {
            "kind": kind,
            "backbone": ours["backbone"],
            "rho": ours["rho"],
            "prompt_tokens": ours["prompt_tokens"],
            "response_tokens": ours["response_tokens"],
            "pairs": ours["pairs"],
            "heldout_pairs": ours["heldout_pairs"],
            "batch_pairs": args.batch_pairs,
            "epochs": args.epochs,
        }
        for s, r in runs.items():
            ci = cluster_bootstrap(groups, c["ours"], c[s], seed=args.seed)  # a = ours, b = this system
            summary[f"{s}_pairs_per_s"] = r["pairs_per_s"]
            summary[f"{s}_peak_rss_mib"] = r["peak_rss_mib"]
            summary[f"{s}_precision"] = r["precision"]
            summary[f"{s}_heldout_acc"] = r["heldout_acc"]
            summary[f"{s}_acc_ci95"] = ci["b"]
            if s != "ours":
                summary[f"speedup_vs_{s}"] = ours["pairs_per_s"] / r["pairs_per_s"]
                summary[f"acc_diff_ours_minus_{s}_ci95"] = ci["diff"]
            if "ours_trl" in runs and s in ("trl", "reference"):  # the drop-in path against the baselines
                d = cluster_bootstrap(groups, c["ours_trl"], c[s], seed=args.seed)["diff"]
                summary[f"ours_trl_speedup_vs_{s}"] = runs["ours_trl"]["pairs_per_s"] / r["pairs_per_s"]
                summary[f"acc_diff_ours_trl_minus_{s}_ci95"] = d
        targets = {"encoder": {"trl": 1.3, "reference": 2.0}, "decoder": {"trl": 0.8 * ours["rho"], "reference": 4.0}}
        summary["targets"] = {
            f"{who}speedup_vs_{s}": t
            for s, t in targets[kind].items()
            if s in runs
            for who in ("", "ours_trl_")
            if who == "" or "ours_trl" in runs
        }
        results["unique"].append(summary)
        print(json.dumps(summary), flush=True)
    results["load_average_end"] = os.getloadavg()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's sizes (slow on CPU)")
    ap.add_argument("--train-inputs", type=int, default=4, help="inputs with K candidates each (pairs = K(K-1)/2 each)")
    ap.add_argument("--k", type=int, default=5, help="candidates per training input")
    ap.add_argument("--heldout-inputs", type=int, default=40, help="held-out inputs (K(K-1)/2 pairs each)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--ours-epochs", type=int, default=None, help="epochs for ours (default: --epochs)")
    ap.add_argument(
        "--train-components",
        type=int,
        default=3,
        choices=[1, 2, 3],
        help="components the training pairs spread over (1: every pair on one head, as TRL's single head)",
    )
    ap.add_argument(
        "--head-lr-mult",
        type=float,
        default=None,
        help="ours: head learning rate = this x backbone lr (default: the library's 20)",
    )
    ap.add_argument("--score-inputs", type=int, default=2)
    ap.add_argument("--score-cands", type=int, default=32)
    ap.add_argument("--check-inputs", type=int, default=8, help="pool inputs also scored in fp32 (agreement check)")
    ap.add_argument("--skip", action="append", default=[], choices=["training", "scoring"])
    ap.add_argument("--only", choices=["encoder", "decoder"], default=None)
    ap.add_argument(
        "--trl", action="store_true", help="also train through TRL's RewardTrainer (needs `pip install trl`)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument(
        "--unique",
        default=None,
        metavar="DIR",
        help="unique-pair mode: train / held-out JSONL from make_unique_pairs.py in DIR (made if missing)",
    )
    ap.add_argument("--batch-pairs", type=int, default=8, help="unique mode: pairs per step, ours and TRL")
    ap.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="unique mode, ours and TRL: auto = bf16 where the CPU has native bf16 (the reference: fp32)",
    )
    ap.add_argument(
        "--decoder",
        choices=["random", "smollm2"],
        default="random",
        help="unique mode: random-init Llama-like decoder, or the embedded SmolLM2-135M (pretrained)",
    )
    ap.add_argument("--max-length", type=int, default=512, help="unique mode: template max_length")
    ap.add_argument("--train-pairs", type=int, default=0, help="unique mode: use the first N train pairs (0 = all)")
    ap.add_argument("--heldout-pairs", type=int, default=0, help="unique mode: first N held-out pairs (0 = all)")
    ap.add_argument("--lr", type=float, default=None, help="unique mode: learning rate (default by backbone)")
    ap.add_argument("--unique-kind", choices=["encoder", "decoder"], help=argparse.SUPPRESS)
    ap.add_argument("--unique-system", choices=["ours", "ours_trl", "trl", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.unique:
        if args.unique_system:  # a child process: one system, its result as the last stdout line
            print(json.dumps(unique_run(args)), flush=True)
            return
        results = unique_main(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if args.full:
        args.train_inputs, args.heldout_inputs, args.score_inputs = 52, 40, 64  # 520 train / 400 held-out pairs
    t_start, load_start = time.perf_counter(), os.getloadavg()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train = make_pairs(rng, args.train_inputs, args.k, 300, 60, args.train_components)
    held = make_pairs(rng, args.heldout_inputs, args.k, 300, 60, args.train_components)
    results = {
        "machine": machine(),
        "argv": sys.argv[1:],
        "load_average_start": load_start,
        "backends": backend_report(),
        "training": [],
        "scoring": [],
    }
    print(
        f"{results['machine']}\nload average at start: {load_start}\n"
        f"train pairs={len(train)} held-out pairs={len(held)} pool={args.score_inputs}x{args.score_cands}",
        flush=True,
    )
    setups = [("encoder", encoder_pair, 5e-5), ("decoder", decoder_pair, 3e-4)]
    for kind, make, lr in setups:
        if args.only and args.only != kind:
            continue
        if "training" not in args.skip:
            name, rm, base = make(args.seed, 512)
            trl_model = trl_twin(base.model, args.seed) if args.trl else None
            r = bench_training(
                name,
                rm,
                base,
                train,
                held,
                args.epochs,
                lr,
                batch_pairs=args.k * (args.k - 1) // 2,
                seed=args.seed,
                trl_model=trl_model,
                ours_epochs=args.ours_epochs,
                head_lr_mult=args.head_lr_mult,
            )
            results["training"].append(r)
            print(json.dumps(r), flush=True)
        if "scoring" not in args.skip:
            name, rm, base = make(args.seed, 512)  # fresh weights: scores must agree with the baseline's
            r = bench_scoring(
                name, rm, base, args.score_inputs, args.score_cands, 400, 40, args.seed, args.check_inputs
            )
            results["scoring"].append(r)
            print(json.dumps(r), flush=True)
    results["load_average_end"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - t_start
    print(f"load average at end: {results['load_average_end']}; wall {results['wall_seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
