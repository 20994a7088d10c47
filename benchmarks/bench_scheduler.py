"""Benchmark: the batch planner's host cost per request, for every input form, against the Python reference.

Token workload (seeded), the shape of a large candidate pool: N requests over 16 reward heads; each
prefix is one of 1,000 tokenised prompts (lengths lognormal, median 80); each suffix (the candidate) is
lognormal with median --suffix-median tokens (sigma 0.6), ids below 32,000; 5% of requests repeat an
earlier one exactly. The Scheduler is the engine's: padded, share_prefix=True, token_budget 16384,
max_rows 64. The same requests go in as

* ``plan_flat``: int32 token buffers + int64 offsets, each request holding its own copy of its prompt
  (what the engine builds after tokenising each distinct text once);
* ``plan`` on tuples ``(head, prompt_array, suffix_array)``: numpy int64 arrays, one array object per
  prompt shared by its requests (as a caller that tokenised each prompt once holds them);
* ``plan`` on tuples of Python lists of ints (the prompt's list shared likewise);

and every form must give the same plan. ``plan_arrays`` (lengths + precomputed 64-bit hashes) runs on the
columnar workload of the earlier benchmark (total lengths lognormal, median 300). Baselines: the
pure-Python reference (``backend="python"``) and the previous release's ``plan`` path (a Python loop
flattening the requests, then the C++ planner), on a prefix of the same requests.

Each timing is the median of --repeats full calls (checks, planning, building the Plan), as wall-clock
time and as this process's CPU time: on a shared machine the wall clock also counts other processes,
so the load average is printed with the results.

    python benchmarks/bench_scheduler.py                  # 1M requests (about a minute, ~3 GB peak)
    python benchmarks/bench_scheduler.py --n 100000 --python-n 5000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import machine, write_results

from optimas_fast._native import native
from optimas_fast.scheduler import Scheduler
from optimas_fast.scheduler_reference import flatten_requests

VOCAB = 32000
N_PROMPTS = 1000


def token_workload(n: int, suffix_median: float, seed: int):
    """Flat form of the token workload + the prompts: (head, ptok, poff, stok, soff, prompt_of, prompts)."""
    rng = np.random.default_rng(seed)
    plen = np.maximum(1, np.rint(np.exp(rng.normal(np.log(80), 0.3, N_PROMPTS)))).astype(np.int64)
    prompts = [rng.integers(0, VOCAB, int(k)).astype(np.int64) for k in plen]
    head = rng.integers(0, 16, n)  # (N,)
    prompt_of = rng.integers(0, N_PROMPTS, n)  # (N,)
    slen = np.maximum(1, np.rint(np.exp(rng.normal(np.log(suffix_median), 0.6, n)))).astype(np.int64)  # (N,)
    dup = np.flatnonzero(rng.random(n) < 0.05)
    dup = dup[dup > 0]
    src = (rng.random(len(dup)) * dup).astype(np.int64)  # an earlier index for each repeat
    for i, j in zip(dup.tolist(), src.tolist()):  # in order, so a repeat of a repeat copies the final values
        head[i], prompt_of[i], slen[i] = head[j], prompt_of[j], slen[j]
    soff = np.zeros(n + 1, dtype=np.int64)  # (N+1,)
    np.cumsum(slen, out=soff[1:])
    stok = rng.integers(0, VOCAB, int(soff[-1]), dtype=np.int32)  # (Ts,)
    for i, j in zip(dup.tolist(), src.tolist()):  # a repeat copies its source's suffix
        stok[soff[i] : soff[i + 1]] = stok[soff[j] : soff[j + 1]]
    poff = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(plen[prompt_of], out=poff[1:])
    allp = np.concatenate(prompts).astype(np.int32)
    pstart = np.concatenate([[0], np.cumsum(plen)[:-1]])
    # each request's own copy of its prompt: index of every prefix token into the concatenated prompts
    idx = np.repeat(pstart[prompt_of] - poff[:-1], plen[prompt_of]) + np.arange(int(poff[-1]))
    ptok = allp[idx]  # (Tp,) int32
    return head, ptok, poff, stok, soff, prompt_of, prompts


def columnar_workload(n: int, seed: int):
    """The plan_arrays workload: (head, prefix_lens, suffix_lens, prefix_hashes, suffix_hashes)."""
    rng = np.random.default_rng(seed)
    total = np.maximum(2, np.rint(np.exp(rng.normal(np.log(300), 0.6, n)))).astype(np.int64)  # (N,)
    tlen = np.maximum(1, np.rint(np.exp(rng.normal(np.log(80), 0.3, N_PROMPTS)))).astype(np.int64)
    thash = rng.integers(0, 2**63, N_PROMPTS, dtype=np.int64).astype(np.uint64)
    tmpl = rng.integers(0, N_PROMPTS, n)  # (N,)
    head = rng.integers(0, 16, n)  # (N,)
    suffix_lens = np.maximum(1, total - tlen[tmpl])
    suffix_hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    dup = np.flatnonzero(rng.random(n) < 0.05)
    dup = dup[dup > 0]
    src = (rng.random(len(dup)) * dup).astype(np.int64)
    for a in (head, tmpl, suffix_lens, suffix_hashes):
        a[dup] = a[src]
    return head, tlen[tmpl], suffix_lens, thash[tmpl], suffix_hashes


def timed(fn, repeats: int):
    """(median wall seconds, median CPU seconds, last result) over `repeats` calls."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        out = None  # free the previous result first: its pages would otherwise be counted twice
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return statistics.median(wall), statistics.median(cpu), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="requests for the C++ planner, every form")
    ap.add_argument("--python-n", type=int, default=20_000, help="requests for the Python reference (a prefix)")
    ap.add_argument("--old-n", type=int, default=100_000, help="requests for the previous plan() path (a prefix)")
    ap.add_argument("--suffix-median", type=float, default=64, help="median candidate (suffix) length in tokens")
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, B, R, reps = args.n, args.token_budget, args.max_rows, args.repeats
    print(f"machine: {machine()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    head, ptok, poff, stok, soff, prompt_of, prompts = token_workload(n, args.suffix_median, args.seed)
    tok_per_req = (len(ptok) + len(stok)) / n
    print(
        f"token workload: N={n:,} requests, {N_PROMPTS:,} prompts, {tok_per_req:.0f} tokens/request on average "
        f"(prefix {len(ptok) / n:.0f} + suffix {len(stok) / n:.0f}); token_budget={B}, max_rows={R}, "
        "padded, share_prefix=True"
    )
    sched = Scheduler(B, R, "padded", True)
    rows = []  # (label, requests, wall, cpu)

    t, c, ref = timed(lambda: sched.plan_flat(head, ptok, poff, stok, soff), reps)
    rows.append(("`plan_flat`: int32 buffers + int64 offsets", n, t, c))

    s64 = stok.astype(np.int64)  # (Ts,) the suffix arrays are views of it
    heads, so = head.tolist(), soff.tolist()
    reqs = [(heads[i], prompts[p], s64[so[i] : so[i + 1]]) for i, p in enumerate(prompt_of.tolist())]
    t, c, plan = timed(lambda: sched.plan(reqs), reps)  # noqa: F821 (the lambda runs before `del reqs`)
    assert plan.same_as(ref), "tuples-of-numpy plan differs from the flat plan"
    rows.append(("`plan`: tuples of numpy int64 arrays", n, t, c))

    m_old = min(args.old_n, n)
    t_old, c_old, _ = timed(lambda: _previous_plan_path(sched, reqs[:m_old]), 1)  # noqa: F821 (runs before the del)
    m_py = min(args.python_n, n)
    py = Scheduler(B, R, "padded", True, backend="python")
    t_py, c_py, plan_py = timed(lambda: py.plan(reqs[:m_py]), 1)  # noqa: F821 (runs before the del)
    assert plan_py.same_as(sched.plan(reqs[:m_py])), "C++ and Python plans differ"
    del reqs, s64

    vocab = np.array(list(range(VOCAB)), dtype=object)  # shared int objects: lists of ~70M refs, not ints
    objs = vocab[stok]
    plists = [p.tolist() for p in prompts]
    lists = [(heads[i], plists[p], objs[so[i] : so[i + 1]].tolist()) for i, p in enumerate(prompt_of.tolist())]
    del objs
    t, c, plan = timed(lambda: sched.plan(lists), reps)  # noqa: F821 (the lambda runs before `del lists`)
    assert plan.same_as(ref), "lists plan differs from the flat plan"
    rows.append(("`plan`: tuples of Python lists of ints", n, t, c))
    del lists, plan

    rows.append(("previous `plan` path (Python flatten + C++ plan), tuples of numpy", m_old, t_old, c_old))
    rows.append(('Python reference `backend="python"`, tuples of numpy', m_py, t_py, c_py))

    cols = columnar_workload(n, args.seed)
    t, c, arr = timed(lambda: Scheduler(B, R, "padded").plan_arrays(*cols), reps)
    rows.append(("`plan_arrays`: lengths + precomputed hashes (median 300 tokens)", n, t, c))
    m_arr = min(100_000, n)
    sub = tuple(x[:m_arr] for x in cols)
    t_pa, c_pa, p_pa = timed(lambda: Scheduler(B, R, "padded", backend="python").plan_arrays(*sub), 1)
    assert p_pa.same_as(Scheduler(B, R, "padded").plan_arrays(*sub))
    rows.append(("Python reference `plan_arrays`", m_arr, t_pa, c_pa))

    print("\n| planner input | requests | wall (s) | CPU (s) | µs / request (wall) | µs / request (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, k, t, c in rows:
        print(f"| {label} | {k:,} | {t:.3f} | {c:.3f} | {t / k * 1e6:.3f} | {c / k * 1e6:.3f} |")
    print(
        f"\nplan: {len(ref):,} batches, {len(ref.rows):,} unique rows, {len(ref.group_prefix_len):,} prefix groups; "
        f"C++ over the Python reference, per request (CPU): {rows[4][3] / m_py / (rows[0][3] / n):.0f}x (flat), "
        f"{rows[4][3] / m_py / (rows[1][3] / n):.0f}x (tuples)"
    )

    arrival = Scheduler(B, R, "padded", order="arrival").plan_arrays(*cols)
    print("\n| padded-mode batching (columnar workload) | batches | real tokens | padded tokens | padding waste |")
    print("|---|---:|---:|---:|---:|")
    for label, p in (("longest first (Scheduler default)", arr), ("arrival order (baseline)", arrival)):
        print(f"| {label} | {len(p):,} | {p.real_tokens:,} | {p.budget_tokens:,} | {p.padding_waste:.2%} |")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    path = write_results(
        "bench_scheduler",
        {
            "args": vars(args),
            "tokens_per_request": tok_per_req,
            "rows": [
                dict(
                    input=label,
                    requests=k,
                    wall_s=t,
                    cpu_s=c,
                    us_per_request_wall=t / k * 1e6,
                    us_per_request_cpu=c / k * 1e6,
                )
                for label, k, t, c in rows
            ],
            "padding_waste": {"length": arr.padding_waste, "arrival": arrival.padding_waste},
            "load_average_end": list(os.getloadavg()),
        },
    )
    print(f"results: {path}")


def _previous_plan_path(sched: Scheduler, reqs):
    """What plan(requests) did before the C++ ingest: flatten in Python, then plan the int64 buffers."""
    cols = flatten_requests(reqs)
    return native().sched_plan_flat(
        cols["head_ids"],
        cols["prefix_tokens"],
        cols["prefix_offsets"],
        cols["suffix_tokens"],
        cols["suffix_offsets"],
        hash_mask=2**64 - 1,
        **sched._kw(),
    )


if __name__ == "__main__":
    main()
