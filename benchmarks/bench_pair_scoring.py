"""Pair scoring: ``RewardModel.score`` on held-out preference pairs vs the reference's way, per precision setting.

The workload of issue 18 §5: the unique PubMedQA pairs of make_unique_pairs.py (one pair per question, ~325
prompt tokens and ~42 response tokens), every pair's chosen and rejected rows scored. Ours: ``RewardModel.score``
on the rows with the engine's defaults and with each ``--setting`` (RewardModelConfig fields, e.g.
``score_amp=none``); the baseline: the reference's way (``*ForSequenceClassification``, batch 2, fp32, rows in
the given order), the same token ids. All settings run in one process on one model, round-robin over
``--reps`` repetitions (so drift in the machine's speed hits every setting alike); the median is reported, with
the agreement of each setting's pair decisions with fp32's.

    python benchmarks/bench_pair_scoring.py --unique benchmarks/_out/unique_pairs --kind encoder --pairs 160
    python benchmarks/bench_pair_scoring.py --unique benchmarks/_out/unique_pairs --kind smollm2 --pairs 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine  # noqa: E402
from bench_reward import Baseline, TemplateIds, unique_model  # noqa: E402

from optimas_fast.reward import RewardModel, RewardModelConfig, TemplateConfig  # noqa: E402
from optimas_fast.reward.formats import load_pairs  # noqa: E402


def parse_setting(text: str) -> dict:
    """ "score_amp=none,score_weights=autocast" -> {"score_amp": "none", "score_weights": "autocast"}."""
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        out[k] = {"none": "none", "None": None, "true": True, "false": False}.get(v, int(v) if v.isdigit() else v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unique", required=True, help="folder of make_unique_pairs.py (heldout.jsonl, train.jsonl)")
    ap.add_argument("--kind", choices=["encoder", "decoder", "smollm2"], default="encoder")
    ap.add_argument("--pairs", type=int, default=160, help="pairs scored (held-out first, then train)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--setting",
        action="append",
        default=None,
        help="RewardModelConfig overrides of one setting of ours, e.g. score_amp=none (repeatable; "
        "default: the engine's defaults and score_amp=none)",
    )
    ap.add_argument("--no-reference", action="store_true", help="leave the reference's way out")
    ap.add_argument("--profile", default=None, help="torch.profiler table of this setting's last run (a name)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    held = load_pairs(os.path.join(args.unique, "heldout.jsonl"))
    pairs = (list(held) + list(load_pairs(os.path.join(args.unique, "train.jsonl"))))[: args.pairs]
    rows = [(p.component, p.inputs, o) for p in pairs for o in (p.chosen, p.rejected)]
    kind = "encoder" if args.kind == "encoder" else "decoder"
    decoder = "smollm2" if args.kind == "smollm2" else "random"
    template = TemplateConfig(max_length=args.max_length, prefix_format=held.prefix_format or "{inputs}")
    name, model, tok = unique_model(kind, "ours", 0, decoder, args.max_length)
    rm = RewardModel(model, dict(held.components), tokenizer=tok, config=RewardModelConfig(template=template))
    settings = {"default": {}}
    for s in args.setting or ["score_amp=none"]:
        settings[s] = parse_setting(s)
    base = None
    if not args.no_reference:
        _, ref_model, ref_tok = unique_model(kind, "reference", 0, decoder, args.max_length)
        base = Baseline(ref_model, ref_tok, TemplateIds(ref_tok, template, is_encoder=(kind == "encoder")))
    n_tok = sum(
        len(t.prefix) + len(t.suffix) for t in (rm.encoder.tokenise(r[0], r[1], r[2]) for r in rows)
    )  # tokens as the template makes them (prefix counted per row)

    def run_ours(overrides: dict, profile: bool = False):
        saved = {k: getattr(rm.encoder.config, k) for k in overrides}
        for k, v in overrides.items():
            setattr(rm.encoder.config, k, v)
        try:
            rm.score(rows[:2])  # warm: the bf16 copy, oneDNN primitives
            rm.encoder.tokens.clear()  # cold token cache: tokenising is inside the clock
            t0 = time.perf_counter()
            if profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    s = rm.score(rows)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
            else:
                s = rm.score(rows)
            return s, time.perf_counter() - t0
        finally:
            for k, v in saved.items():
                setattr(rm.encoder.config, k, v)

    times = {k: [] for k in settings}
    if base is not None:
        times["reference"] = []
    scores = {}
    for _ in range(args.reps):
        for k, ov in settings.items():
            s, dt = run_ours(ov)
            times[k].append(dt)
            scores[k] = s
        if base is not None:
            s, dt = base.score(rows)
            times["reference"].append(dt)
            scores["reference"] = s
    if args.profile:
        run_ours(settings[args.profile], profile=True)
    ref_fp32 = scores.get("score_amp=none")
    out = {
        "machine": machine(),
        "argv": sys.argv[1:],
        "backbone": name,
        "pairs": len(pairs),
        "rows": len(rows),
        "tokens_per_row": n_tok / len(rows),
        "load_average": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "results": {},
    }
    ref_rate = len(rows) / statistics.median(times["reference"]) if base is not None else None
    for k, ts in times.items():
        med = statistics.median(ts)
        r = {"rows_per_s": len(rows) / med, "seconds": ts}
        if ref_rate and k != "reference":
            r["vs_reference"] = r["rows_per_s"] / ref_rate
        if ref_fp32 is not None and k not in ("reference", "score_amp=none"):
            d, d0 = (scores[k][0::2] - scores[k][1::2]).numpy(), (ref_fp32[0::2] - ref_fp32[1::2]).numpy()
            r["pair_agreement_with_fp32"] = float(np.mean(np.sign(d) == np.sign(d0)))
            r["max_abs_diff_vs_fp32"] = float((scores[k] - ref_fp32).abs().max())
        out["results"][k] = r
        print(
            f"{k:40s} {r['rows_per_s']:7.2f} rows/s"
            + (f"  {r['vs_reference']:.2f}x reference" if "vs_reference" in r else "")
            + (f"  agree {r['pair_agreement_with_fp32']:.3f}" if "pair_agreement_with_fp32" in r else ""),
            flush=True,
        )
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
