"""Benchmark 4 (issue 2): the C++ batch planner vs its pure-Python twin, and padding waste.

Workload (seeded): N scoring requests whose total lengths are lognormal with median 300 tokens
(sigma 0.6); 16 reward heads; each request's prefix is one of 1,000 prompt templates (template lengths
lognormal, median 80); suffix = the rest (>= 1 token); 5% of requests repeat an earlier one exactly.
The planner gets the columnar form (lengths + 64-bit content hashes), as a caller with 1M requests
would pass it. Timings are the median of --repeats runs, each a full `plan_arrays` call (argument
checks, planning, building the Plan); building the per-batch Python objects (`plan.batches`) is
timed separately.

    python benchmarks/bench_scheduler.py                 # 1M requests, Python planner on 100k
    python benchmarks/bench_scheduler.py --python-n 1000000
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from optimas_fast.scheduler import Scheduler, _flatten_requests


def workload(n: int, seed: int):
    rng = np.random.default_rng(seed)
    total = np.maximum(2, np.rint(np.exp(rng.normal(np.log(300), 0.6, n)))).astype(np.int64)  # (N,)
    n_templates = 1000
    tlen = np.maximum(1, np.rint(np.exp(rng.normal(np.log(80), 0.3, n_templates)))).astype(np.int64)
    thash = rng.integers(0, 2**63, n_templates, dtype=np.int64).astype(np.uint64)
    tmpl = rng.integers(0, n_templates, n)  # (N,)
    head = rng.integers(0, 16, n)  # (N,)
    prefix_lens = tlen[tmpl]
    suffix_lens = np.maximum(1, total - prefix_lens)
    suffix_hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    # 5% exact repeats of an earlier request (same head, template and suffix)
    dup = np.flatnonzero(rng.random(n) < 0.05)
    dup = dup[dup > 0]
    src = (rng.random(len(dup)) * dup).astype(np.int64)  # an earlier index for each repeat
    for a in (head, tmpl, suffix_lens, suffix_hashes):
        a[dup] = a[src]
    prefix_lens = tlen[tmpl]
    return head, prefix_lens, suffix_lens, thash[tmpl], suffix_hashes


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="requests for the C++ planner")
    ap.add_argument("--python-n", type=int, default=100_000, help="requests for the Python planner (a prefix)")
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cols = workload(args.n, args.seed)
    lens = cols[1] + cols[2]
    B, R = args.token_budget, args.max_rows
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}")
    print(f"workload: N={args.n:,} requests, length median {int(np.median(lens))} / mean {lens.mean():.0f} / "
          f"p99 {int(np.percentile(lens, 99))} tokens; token_budget={B}, max_rows={R}")

    rows = []
    cpp_padded = Scheduler(B, R, "padded")
    t_cpp, plan = timed(lambda: cpp_padded.plan_arrays(*cols), args.repeats)
    fresh = cpp_padded.plan_arrays(*cols)
    t_objs, _ = timed(lambda: fresh.batches, 1)  # cached after the first call: time it once
    rows.append(("C++ padded, dedup + prefix groups", args.n, t_cpp, plan))
    for label, sched in (("C++ packed", Scheduler(B, R, "packed")),
                         ("C++ padded, share_prefix", Scheduler(B, R, "padded", True)),
                         ("C++ padded, no hashes (no dedup/groups)", None)):
        if sched is None:
            t, p = timed(lambda: cpp_padded.plan_arrays(*cols[:3]), args.repeats)
        else:
            t, p = timed(lambda s=sched: s.plan_arrays(*cols), args.repeats)
        rows.append((label, args.n, t, p))

    m = min(args.python_n, args.n)
    sub = tuple(c[:m] for c in cols)
    py = Scheduler(B, R, "padded", backend="python")
    t_py, plan_py = timed(lambda: py.plan_arrays(*sub), 1 if m > 200_000 else 3)
    t_cpp_sub, plan_cpp_sub = timed(lambda: cpp_padded.plan_arrays(*sub), args.repeats)
    assert plan_cpp_sub.same_as(plan_py), "C++ and Python plans differ"
    rows.append(("Python padded, dedup + prefix groups", m, t_py, plan_py))
    rows.append(("C++ padded, same subset", m, t_cpp_sub, plan_cpp_sub))

    print("\n| planner | requests | time (s) | µs / request | batches | unique | prefix groups |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, n, t, p in rows:
        print(f"| {label} | {n:,} | {t:.3f} | {t / n * 1e6:.3f} | {len(p):,} | {len(p.rows):,} | "
              f"{len(p.group_prefix_len):,} |")
    print(f"\n`plan.batches` (building {len(plan):,} Batch objects from the columns) adds {t_objs:.3f} s at N={args.n:,}.")
    print(f"Speed-up of C++ over Python, same {m:,}-request input: {t_py / t_cpp_sub:.1f}x; "
          f"per request, C++ at N={args.n:,} vs Python at N={m:,}: {(t_py / m) / (t_cpp / args.n):.1f}x")
    print(f"C++ plan of {args.n:,} requests: {t_cpp:.3f} s (target <= 1 s)")

    arrival = Scheduler(B, R, "padded", order="arrival").plan_arrays(*cols)
    print("\n| padded-mode batching | batches | real tokens | padded tokens | padding waste |")
    print("|---|---:|---:|---:|---:|")
    for label, p in (("longest first (Scheduler default)", plan), ("arrival order (baseline)", arrival)):
        print(f"| {label} | {len(p):,} | {p.real_tokens:,} | {p.budget_tokens:,} | {p.padding_waste:.2%} |")
    print("\npadding waste = padded tokens / real tokens - 1, over the unique requests after dedup")

    # The token form: Python lists in, hashed and compared in C++. Converting Python ints dominates.
    rng = np.random.default_rng(args.seed + 1)
    k = min(args.n, 20_000)
    templates = [rng.integers(0, 32000, int(t)).tolist() for t in np.rint(np.exp(rng.normal(np.log(80), 0.3, 50)))]
    reqs = [(int(cols[0][i]), templates[i % 50], rng.integers(0, 32000, int(cols[2][i])).tolist()) for i in range(k)]
    t_flat, flat = timed(lambda: _flatten_requests(reqs), 3)
    t_tok_cpp, p_tok = timed(lambda: cpp_padded._run(flat), 3)
    t_tok_py, p_tok_py = timed(lambda: py._run(flat), 1)
    assert p_tok.same_as(p_tok_py)
    print(f"\nToken form `plan(requests)`, {k:,} requests of Python lists ({int(flat['prefix_lens'].sum() + flat['suffix_lens'].sum()):,} tokens): "
          f"converting the lists {t_flat:.3f} s, then C++ hash + confirm + plan {t_tok_cpp:.3f} s "
          f"vs Python planner {t_tok_py:.3f} s ({t_tok_py / t_tok_cpp:.0f}x).")


if __name__ == "__main__":
    main()
