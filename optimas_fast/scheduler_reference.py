"""The scheduler's pure-Python twin: the same steps as csrc/scheduler.cpp, in plain Python.

Three pieces, each the reference for a C++ part (tests require identical results):

* :func:`flatten_requests` -- reads a list of ``(head_id, prefix_ids, suffix_ids)`` requests into flat
  columns, validating each request in order (head id, prefix, suffix, then its length) with the
  messages users see. The C++ ingest (``sched_plan_requests``) follows the same order and calls
  :func:`as_tokens` / :func:`head_id` below for anything unusual, so both raise the same errors.
* :func:`hash_seq` -- the 64-bit content hash of a token sequence (``scheduler.hash_tokens``).
* :func:`plan_python` -- the planner, with dicts, ``sorted`` and exact keys instead of hashes.

``Scheduler(..., backend="python")`` runs these; they are the benchmark's baseline. Nothing here
imports the C++ extension.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from optimas_fast._validate import is_int

__all__ = ["as_tokens", "flatten_requests", "hash_seq", "head_id", "plan_python"]

_INT32_MAX = 2**31 - 1  # cu_seqlens are int32, so no request may exceed this
_INT64_MAX = 2**63 - 1
_MASK64 = 2**64 - 1
_EMPTY = np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Request checks (also called back by the C++ ingest for unusual items)


def head_id(h, i: int) -> int:
    """Request i's head id as an int; TypeError/ValueError naming the request otherwise."""
    if not is_int(h, numpy=True):  # numpy bools are not Integral
        raise TypeError(f"requests[{i}]: head_id must be an int, got {type(h).__name__}")
    if h < 0:
        raise ValueError(f"requests[{i}]: head_id must be >= 0, got {h}")
    if h > _INT64_MAX:
        raise ValueError(f"requests[{i}]: head_id must be at most 2**63 - 1, got {h}")
    return int(h)


def as_tokens(x, name: str) -> np.ndarray:
    """A 1-D integer numpy array of token ids (a view when possible; negatives are checked later)."""
    if isinstance(x, np.ndarray):
        a = x
    elif isinstance(x, (list, tuple, range)):
        if len(x) == 0:
            return _EMPTY
        a = np.asarray(x)
    elif hasattr(x, "__array__") and not isinstance(x, (str, bytes)):  # e.g. a CPU torch tensor
        a = np.asarray(x)
    else:
        raise TypeError(f"{name}: expected a list of token ids or a 1-D integer array, got {type(x).__name__}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: token ids must be integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of token ids, got shape {a.shape}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > _INT64_MAX:
        raise ValueError(f"{name}: token ids above 2**63 - 1")
    return a


def flatten_requests(requests: Sequence) -> dict:
    """Columns of a list of requests: head_ids (N,), {prefix,suffix}_{lens (N,), offsets (N+1,), tokens (T,)}."""
    n = len(requests)
    head = np.empty(n, dtype=np.int64)  # (N,)
    parts: dict[str, list] = {"prefix": [], "suffix": []}
    for i, r in enumerate(requests):
        if not isinstance(r, (tuple, list)):
            raise TypeError(
                f"requests[{i}]: expected a (head_id, prefix_ids, suffix_ids) tuple, got {type(r).__name__}"
            )
        if len(r) != 3:
            raise ValueError(f"requests[{i}]: expected 3 items (head_id, prefix_ids, suffix_ids), got {len(r)}")
        head[i] = head_id(r[0], i)
        for side, x in (("prefix", r[1]), ("suffix", r[2])):
            name = f"requests[{i}] {side}_ids"
            a = as_tokens(x, name)
            if a.size and a.dtype.kind == "i" and a.min() < 0:
                raise ValueError(f"{name}: token ids must be >= 0")
            parts[side].append(a)
        total = len(parts["prefix"][-1]) + len(parts["suffix"][-1])
        if total < 1:
            raise ValueError(f"requests: request {i} has no tokens (prefix and suffix both empty)")
        if total > _INT32_MAX:
            raise ValueError(f"requests: request {i} has more than 2**31 - 1 tokens")
    cols = {"head_ids": head}
    for side, ps in parts.items():
        lens = np.fromiter((len(a) for a in ps), dtype=np.int64, count=n)  # (N,)
        off = np.zeros(n + 1, dtype=np.int64)  # (N+1,)
        np.cumsum(lens, out=off[1:])
        flat = np.concatenate(ps).astype(np.int64) if off[-1] else _EMPTY  # (T,)
        cols[f"{side}_lens"], cols[f"{side}_offsets"], cols[f"{side}_tokens"] = lens, off, flat
    return cols


# ------------------------------------------------------------------------------------------------
# Content hash: four lanes (token k feeds lane k % 4), combined and finalised with MurmurHash3's fmix64

_K0, _K1, _K2, _K3 = 0x243F6A8885A308D3, 0x9E3779B97F4A7C15, 0x87C37B91114253D5, 0x4CF5AD432745937F


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK64


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK64
    return k ^ (k >> 33)


def hash_seq(tokens: Sequence[int]) -> int:
    """64-bit content hash of a token sequence (non-negative ids), as an int in [0, 2**64)."""
    seed = _K0 ^ ((len(tokens) * _K1) & _MASK64)
    lanes = [(seed + j * _K1) & _MASK64 for j in range(4)]
    for k, t in enumerate(tokens):
        lanes[k & 3] = (_rotl(lanes[k & 3] ^ ((t * _K2) & _MASK64), 31) * _K3) & _MASK64
    a, b, c, d = lanes
    return _fmix64(a ^ _rotl(b, 16) ^ _rotl(c, 32) ^ _rotl(d, 48))


# ------------------------------------------------------------------------------------------------
# The planner (the algorithm is documented in optimas_fast/scheduler.py)


def plan_python(
    cols: dict, *, token_budget: int, max_rows: int, packed: bool, share_prefix: bool, by_length: bool
) -> dict[str, np.ndarray]:
    heads = cols["head_ids"].tolist()
    pl, sl = cols["prefix_lens"].tolist(), cols["suffix_lens"].tolist()
    n = len(heads)
    # Identity of each prefix/suffix: its tokens, or (length, caller hash) on the columnar path.
    if cols.get("prefix_tokens") is not None:
        pt, po = cols["prefix_tokens"].tolist(), cols["prefix_offsets"].tolist()
        st, so = cols["suffix_tokens"].tolist(), cols["suffix_offsets"].tolist()
        pkey = [tuple(pt[po[i] : po[i + 1]]) for i in range(n)]
        skey = [tuple(st[so[i] : so[i + 1]]) for i in range(n)]
    else:
        ph, sh = cols.get("prefix_hashes"), cols.get("suffix_hashes")
        pkey = None if ph is None else list(zip(pl, ph.tolist()))
        skey = None if sh is None else list(zip(sl, sh.tolist()))

    # 1. de-duplication
    dedup = list(range(n))
    if pkey is not None and skey is not None:
        seen: dict = {}
        for i in range(n):
            dedup[i] = seen.setdefault((heads[i], pkey[i], skey[i]), i)

    # 2. prefix groups (representatives, non-empty prefix, >= 2 members)
    first, count = [-1] * n, [0] * n
    if pkey is not None:
        seen = {}
        for i in range(n):
            if dedup[i] == i and pl[i] > 0:
                f = first[i] = seen.setdefault(pkey[i], i)
                count[f] += 1
    gid, G = [-1] * n, 0
    for i in range(n):
        if first[i] == i and count[i] >= 2:
            gid[i], G = G, G + 1
    prefix_group = [gid[first[dedup[i]]] if first[dedup[i]] >= 0 else -1 for i in range(n)]
    members: list[list[int]] = [[] for _ in range(G)]
    for i in range(n):
        if dedup[i] == i and prefix_group[i] >= 0:
            members[prefix_group[i]].append(i)
    group_prefix_len = [pl[m[0]] for m in members]

    # 3. pools and order
    share = share_prefix and G > 0
    units = [i for i in range(n) if dedup[i] == i]
    pool = {u: (prefix_group[u] if prefix_group[u] >= 0 else G) if share else 0 for u in units}
    rowlen = {u: sl[u] if share and prefix_group[u] >= 0 else pl[u] + sl[u] for u in units}
    if by_length:
        units.sort(key=lambda u: (pool[u], -rowlen[u], u))
    else:
        units.sort(key=lambda u: (pool[u], u))

    # 4. greedy next-fit
    rows, row_lengths, boff = [], [], [0]
    bmax, bgroup, bplen, btok, bover = [], [], [], [], []

    def emit(p, P, maxlen, tok, over):
        boff.append(len(rows))
        bmax.append(maxlen)
        bgroup.append(p if share and p < G else -1)
        bplen.append(P)
        btok.append(tok)
        bover.append(over)

    cur_rows = cur_max = cur_sum = 0
    cur_pool = -1
    for u in units:
        p = pool[u]
        P = group_prefix_len[p] if share and p < G else 0
        if p != cur_pool:
            if cur_rows:
                Pc = group_prefix_len[cur_pool] if share and cur_pool < G else 0
                emit(cur_pool, Pc, cur_max, Pc + (cur_sum if packed else cur_rows * cur_max), False)
                cur_rows = cur_max = cur_sum = 0
            cur_pool = p
        L = rowlen[u]
        if P + L > token_budget:  # alone over budget: own batch, flagged
            if cur_rows:
                emit(p, P, cur_max, P + (cur_sum if packed else cur_rows * cur_max), False)
                cur_rows = cur_max = cur_sum = 0
            rows.append(u)
            row_lengths.append(L)
            emit(p, P, L, P + L, True)
            continue
        cost = P + (cur_sum + L if packed else (cur_rows + 1) * max(cur_max, L))
        if cur_rows and (cur_rows + 1 > max_rows or cost > token_budget):
            emit(p, P, cur_max, P + (cur_sum if packed else cur_rows * cur_max), False)
            cur_rows = cur_max = cur_sum = 0
        rows.append(u)
        row_lengths.append(L)
        cur_rows += 1
        cur_max = max(cur_max, L)
        cur_sum += L
    if cur_rows:
        P = group_prefix_len[cur_pool] if share and cur_pool < G else 0
        emit(cur_pool, P, cur_max, P + (cur_sum if packed else cur_rows * cur_max), False)

    i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    group_offsets = np.zeros(G + 1, dtype=np.int64)
    np.cumsum([len(m) for m in members], out=group_offsets[1:])
    return {
        "dedup": i64(dedup),
        "prefix_group": i64(prefix_group),
        "group_offsets": group_offsets,
        "group_members": i64([i for m in members for i in m]),
        "group_prefix_len": i64(group_prefix_len),
        "batch_offsets": i64(boff),
        "rows": i64(rows),
        "row_lengths": i64(row_lengths),
        "batch_max_len": i64(bmax),
        "batch_prefix_group": i64(bgroup),
        "batch_prefix_len": i64(bplen),
        "batch_tokens": i64(btok),
        "batch_oversized": np.asarray(bover, dtype=bool),
    }
