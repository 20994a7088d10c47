"""Token-budget batch scheduler for reward-model scoring requests (C++ planner + a pure-Python twin).

A *request* is ``(head_id, prefix_ids, suffix_ids)``: the reward head (component) that scores it and two
token-id sequences (lists/tuples of ints or 1-D integer numpy arrays). Its *length* is
``len(prefix) + len(suffix)``. ``Scheduler.plan(requests)`` turns N requests into a :class:`Plan`:

1. **De-duplication.** Requests with the same head, prefix and suffix are one computation: the first of
   them (lowest index) is the *representative*; ``plan.dedup[i]`` names it for every i.
2. **Prefix groups.** Representatives with the same non-empty prefix form a group when there are at
   least two of them (a group of one shares nothing). Groups are numbered by their first member's
   index; ``plan.prefix_group[i]`` is the group of request i (its representative's), or -1.
3. **Batching.** Representatives are split into *pools*: with ``share_prefix=False`` one pool; with
   ``share_prefix=True`` one pool per prefix group (in group order) and a last pool for everything else.
   Inside a pool rows are ordered longest first (ties: lower index first) -- or kept in arrival order
   with ``order="arrival"``, the baseline -- and packed greedily: a row joins the open batch unless that
   would exceed ``max_rows`` rows or the token budget, in which case the open batch is closed first.
   A row that exceeds the budget on its own gets a batch of its own with ``oversized=True``.

Budget accounting, with ``P`` the batch's shared-prefix length (0 unless ``share_prefix`` put it in a
prefix group) and ``l_r`` the tokens row r brings (its whole sequence; only its suffix when P > 0):

* ``mode="padded"``: ``P + rows * max_len <= token_budget`` with ``max_len = max(l_r)``. The shared
  prefix is encoded once per batch (its KV cache is reused by every row), so it counts once.
* ``mode="packed"``: ``P + sum(l_r) <= token_budget``; ``Batch.cu_seqlens`` holds the int32 offsets of
  the rows in the packed token stream (the shared prefix is not in it).

A row of a shared-prefix batch may have an empty suffix (``l_r = 0``): its score is read at the
prefix's last token. Everything is deterministic for a given input: no step depends on hash order.

Three input forms, one algorithm (all give the same Plan for the same requests):

* ``plan(requests)`` -- a list of request tuples, read in one pass in C++: exact ints, lists/tuples of
  ints and 1-D integer numpy arrays need no Python call (int32/int64 arrays are not even copied), and
  a prefix object passed for many requests is recognised by identity and hashed once.
* ``plan_flat(head_ids, prefix_tokens, prefix_offsets, suffix_tokens, suffix_offsets)`` -- the
  engine's form: request i's prefix is ``prefix_tokens[prefix_offsets[i]:prefix_offsets[i+1]]``
  (int32 or int64 tokens, int64 offsets of length N+1), likewise its suffix; no per-request Python
  work at all.

  On both token forms the contents are hashed in C++ (64-bit, see :func:`hash_tokens`) and every hash
  match is confirmed by comparing tokens, so two different requests are never merged. The buffers are
  read in place while planning runs without the GIL: do not modify them from another thread meanwhile.
* ``plan_arrays(head_ids, prefix_lens, suffix_lens, prefix_hashes=None, suffix_hashes=None)`` -- the
  columnar form for callers that already hold content hashes: lengths and, optionally, per-request
  hashes as 1-D arrays. Here a hash *is* the sequence's identity (there are no tokens to confirm it):
  requests are identical when head, both lengths and both hashes agree, and share a prefix when
  prefix length and prefix hash agree. Make the hashes with :func:`hash_tokens` (once per distinct
  prefix, e.g. per prompt template) or any 64-bit hash you trust. Without ``prefix_hashes`` there are
  no prefix groups; without ``suffix_hashes`` there is no de-duplication.

``backend="cpp"`` (default) runs the C++ planner with the GIL released; ``backend="python"`` runs the
pure-Python twin in :mod:`optimas_fast.scheduler_reference`, which produces identical plans (tests check
this) and is the benchmark baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from optimas_fast._native import native
from optimas_fast._validate import is_int
from optimas_fast.scheduler_reference import as_tokens, flatten_requests, head_id, plan_python

log = logging.getLogger(__name__)

__all__ = ["Batch", "Plan", "PrefixGroup", "Scheduler", "SchedulerConfig", "hash_tokens", "hash_token_arrays"]

_INT32_MAX = 2**31 - 1  # cu_seqlens are int32, so no batch (nor single request) may exceed this
_INT64_MAX = 2**63 - 1
_MASK64 = 2**64 - 1
_TOKEN_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_EMPTY = np.zeros(0, dtype=np.int64)

_COLUMNS = (
    "dedup",
    "prefix_group",
    "group_offsets",
    "group_members",
    "group_prefix_len",
    "batch_offsets",
    "rows",
    "row_lengths",
    "batch_max_len",
    "batch_prefix_group",
    "batch_prefix_len",
    "batch_tokens",
    "batch_oversized",
)


# ------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int  # max budget-counted tokens per batch (see the module docstring), 1..2**31-1
    max_rows: int  # max rows (representative requests) per batch, >= 1
    mode: str = "padded"  # "padded": rows * max_len counts; "packed": the sum of lengths counts
    share_prefix: bool = False  # batch each prefix group on its own, its prefix counted once per batch
    order: str = "length"  # "length": longest first (minimal padding); "arrival": input order (baseline)
    backend: str = "cpp"  # "cpp": the C++ planner; "python": the pure-Python twin (tests, baseline)

    def __post_init__(self):
        for name in ("token_budget", "max_rows"):
            v = getattr(self, name)
            if not is_int(v, numpy=True):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if not 1 <= self.token_budget <= _INT32_MAX:
            raise ValueError(f"token_budget: must be in [1, 2**31 - 1] (cu_seqlens are int32), got {self.token_budget}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows: must be >= 1, got {self.max_rows}")
        for name, allowed in (
            ("mode", ("padded", "packed")),
            ("order", ("length", "arrival")),
            ("backend", ("cpp", "python")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.share_prefix, (bool, np.bool_)):
            raise TypeError(f"share_prefix: expected a bool, got {type(self.share_prefix).__name__}")


@dataclass(frozen=True)
class Batch:
    """One model batch. Row r of the batch is request ``rows[r]`` (a representative)."""

    rows: np.ndarray  # (R,) int64 representative request indices, longest first
    lengths: np.ndarray  # (R,) int64 tokens each row brings: its sequence, or its suffix if prefix_len > 0
    max_len: int  # max(lengths): the padded width in padded mode, max_seqlen in packed mode
    cu_seqlens: np.ndarray | None  # (R+1,) int32 offsets of the rows in the packed stream; None if padded
    oversized: bool  # a single request that exceeds the budget on its own
    prefix_group: int  # the shared prefix's group id (share_prefix=True), else -1
    prefix_len: int  # tokens of the shared prefix, encoded once for the batch (0 when prefix_group == -1)
    tokens: int  # budget-counted size: prefix_len + rows*max_len (padded) or + sum(lengths) (packed)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class PrefixGroup:
    """Representatives (>= 2) that share one non-empty prefix: encode it once for all of them."""

    group: int  # group id (plan.prefix_group values)
    members: np.ndarray  # (M,) int64 representative indices, ascending
    prefix_len: int  # length of the shared prefix

    @property
    def representative(self) -> int:
        return int(self.members[0])


class Plan:
    """The planner's result, stored as columns (arrays); ``batches``/``prefix_groups`` are built on use.

    Columns (every index is a request index into the planned input, N requests):
      dedup (N,) representative of each request; prefix_group (N,) group id or -1;
      group_offsets (G+1,), group_members (M,), group_prefix_len (G,): the prefix groups (CSR);
      batch_offsets (B+1,), rows (R,), row_lengths (R,): the batches' rows (CSR);
      batch_max_len, batch_prefix_group, batch_prefix_len, batch_tokens, batch_oversized: (B,) each.
    Every request is either a row of exactly one batch or a duplicate whose representative is.
    """

    def __init__(self, columns: dict[str, np.ndarray], config: SchedulerConfig):
        self.config = config
        self._columns = {k: columns[k] for k in _COLUMNS}
        for k, v in self._columns.items():
            setattr(self, k, v)
        self.n_requests = len(self.dedup)

    # ---- views ----
    def __len__(self) -> int:
        return len(self.batch_max_len)

    def __iter__(self):
        return iter(self.batches)

    def columns(self) -> dict[str, np.ndarray]:
        return dict(self._columns)

    def same_as(self, other: Plan) -> bool:
        """True when both plans have identical columns (the C++ == Python check)."""
        a, b = self._columns, other._columns
        return all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in _COLUMNS)

    @cached_property
    def batches(self) -> list[Batch]:
        off = self.batch_offsets.tolist()
        cs = np.zeros(len(self.rows) + 1, dtype=np.int64)  # (R+1,) running token count over all rows
        np.cumsum(self.row_lengths, out=cs[1:])
        packed = self.config.mode == "packed"
        out = []
        for b in range(len(self)):
            a, e = off[b], off[b + 1]
            out.append(
                Batch(
                    rows=self.rows[a:e],
                    lengths=self.row_lengths[a:e],
                    max_len=int(self.batch_max_len[b]),
                    cu_seqlens=(cs[a : e + 1] - cs[a]).astype(np.int32) if packed else None,
                    oversized=bool(self.batch_oversized[b]),
                    prefix_group=int(self.batch_prefix_group[b]),
                    prefix_len=int(self.batch_prefix_len[b]),
                    tokens=int(self.batch_tokens[b]),
                )
            )
        return out

    @cached_property
    def prefix_groups(self) -> list[PrefixGroup]:
        off = self.group_offsets.tolist()
        return [
            PrefixGroup(g, self.group_members[off[g] : off[g + 1]], int(self.group_prefix_len[g]))
            for g in range(len(off) - 1)
        ]

    # ---- fan-out ----
    @cached_property
    def request_row(self) -> np.ndarray:
        """(N,) int64: for each request, the position of its representative in ``rows`` (batch order)."""
        pos = np.empty(self.n_requests, dtype=np.int64)
        pos[self.rows] = np.arange(len(self.rows), dtype=np.int64)
        return pos[self.dedup]

    def scatter(self, row_scores):
        """Fans scores of the planned rows out to all N requests.

        ``row_scores``: (R, ...) numpy array or torch tensor, one entry per row in batch order (the
        concatenation of the batches' outputs). Returns (N, ...) of the same type: duplicates get their
        representative's score.
        """
        if len(row_scores) != len(self.rows):
            raise ValueError(f"row_scores: expected {len(self.rows)} rows (one per planned row), got {len(row_scores)}")
        return row_scores[self.request_row]

    # ---- accounting ----
    @property
    def budget_tokens(self) -> int:
        """Tokens the batches occupy as counted against the budget (padding included in padded mode)."""
        return int(self.batch_tokens.sum())

    @property
    def real_tokens(self) -> int:
        """Tokens the model must process: each batch's shared prefix once plus its rows' tokens."""
        return int(self.batch_prefix_len.sum() + self.row_lengths.sum())

    @property
    def padding_waste(self) -> float:
        """budget_tokens / real_tokens - 1 (0 for packed plans; 0 for an empty plan)."""
        real = self.real_tokens
        return self.budget_tokens / real - 1.0 if real else 0.0

    def __repr__(self) -> str:
        return (
            f"Plan(requests={self.n_requests}, representatives={len(self.rows)}, batches={len(self)}, "
            f"prefix_groups={len(self.group_prefix_len)}, mode={self.config.mode!r}, "
            f"padding_waste={self.padding_waste:.3%})"
        )


# ------------------------------------------------------------------------------------------------
# The scheduler


class Scheduler:
    """Plans token-budget batches of scoring requests. See the module docstring for the algorithm.

    Args:
        token_budget: max budget-counted tokens per batch (padded: prefix + rows*max_len; packed:
            prefix + sum of lengths), 1..2**31-1.
        max_rows: max rows per batch.
        mode: "padded" or "packed".
        share_prefix: batch each prefix group separately, counting its prefix once per batch.
        order: "length" (default, minimal padding) or "arrival" (input order; a baseline).
        backend: "cpp" (default) or "python" (the pure-Python twin; identical plans, much slower).
    """

    def __init__(
        self,
        token_budget: int,
        max_rows: int,
        mode: str = "padded",
        share_prefix: bool = False,
        *,
        order: str = "length",
        backend: str = "cpp",
    ):
        self.config = SchedulerConfig(token_budget, max_rows, mode, share_prefix, order, backend)
        if backend == "cpp":
            native()  # fail now, with build instructions, rather than at the first plan
        # Tests narrow this to force 64-bit hash collisions on the token path; keep all bits otherwise.
        self._hash_mask = _MASK64

    def plan(self, requests: Iterable[tuple[int, Any, Any]]) -> Plan:
        """Plans a list of ``(head_id, prefix_ids, suffix_ids)`` requests (token ids: lists/tuples of
        ints, 1-D integer numpy arrays or CPU tensors)."""
        if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, Iterable):
            raise TypeError(
                f"requests: expected a list of (head_id, prefix_ids, suffix_ids), got {type(requests).__name__}"
            )
        reqs = requests if isinstance(requests, (list, tuple)) else list(requests)
        if self.config.backend == "cpp":
            # One C++ pass reads and checks every request; as_tokens/head_id (the reference's checkers)
            # are called back only for unusual items, so errors read the same on both backends.
            return self._finish(
                native().sched_plan_requests(reqs, as_tokens, head_id, hash_mask=self._hash_mask, **self._kw())
            )
        return self._finish(plan_python(flatten_requests(reqs), **self._kw()))

    def plan_flat(self, head_ids, prefix_tokens, prefix_offsets, suffix_tokens, suffix_offsets) -> Plan:
        """Plans N requests given as flat token buffers (the engine's form; same plan as :meth:`plan`).

        Args:
            head_ids: (N,) integer array, each request's head.
            prefix_tokens: (Tp,) int32 or int64 token ids of all prefixes, back to back.
            prefix_offsets: (N+1,) int64, non-decreasing: request i's prefix is
                ``prefix_tokens[prefix_offsets[i]:prefix_offsets[i+1]]``.
            suffix_tokens, suffix_offsets: the same for the suffixes.
        """
        cols = _flat_columns(head_ids, prefix_tokens, prefix_offsets, suffix_tokens, suffix_offsets)
        if self.config.backend == "cpp":
            return self._finish(
                native().sched_plan_flat(
                    cols["head_ids"],
                    cols["prefix_tokens"],
                    cols["prefix_offsets"],
                    cols["suffix_tokens"],
                    cols["suffix_offsets"],
                    hash_mask=self._hash_mask,
                    **self._kw(),
                )
            )
        return self._finish(plan_python(cols, **self._kw()))

    def plan_arrays(self, head_ids, prefix_lens, suffix_lens, prefix_hashes=None, suffix_hashes=None) -> Plan:
        """Columnar form: (N,) integer arrays of head ids and prefix/suffix lengths, and optionally
        (N,) 64-bit content hashes of each prefix and suffix (int64 or uint64; see the module docstring)."""
        head = _int_column(head_ids, "head_ids", None)
        n = len(head)
        cols = {
            "head_ids": head,
            "prefix_lens": _int_column(prefix_lens, "prefix_lens", n),
            "suffix_lens": _int_column(suffix_lens, "suffix_lens", n),
        }
        _check_request_columns(cols)
        if suffix_hashes is not None and prefix_hashes is None:
            raise ValueError(
                "suffix_hashes: needs prefix_hashes too (identical suffixes after different prefixes "
                "are different requests)"
            )
        cols["prefix_hashes"] = None if prefix_hashes is None else _hash_column(prefix_hashes, "prefix_hashes", n)
        cols["suffix_hashes"] = None if suffix_hashes is None else _hash_column(suffix_hashes, "suffix_hashes", n)
        if self.config.backend == "cpp":
            return self._finish(
                native().sched_plan(
                    cols["head_ids"],
                    cols["prefix_lens"],
                    cols["suffix_lens"],
                    cols["prefix_hashes"],
                    cols["suffix_hashes"],
                    **self._kw(),
                )
            )
        return self._finish(plan_python(cols, **self._kw()))

    def _kw(self) -> dict:
        c = self.config
        return dict(
            token_budget=c.token_budget,
            max_rows=c.max_rows,
            packed=c.mode == "packed",
            share_prefix=bool(c.share_prefix),
            by_length=c.order == "length",
        )

    def _finish(self, out: dict) -> Plan:
        plan = Plan(out, self.config)
        log.debug("scheduler: %r", plan)
        return plan


# ------------------------------------------------------------------------------------------------
# Input checks (shared by both backends, so both see exactly the same validated columns)


def _int_column(x, name: str, n: int | None) -> np.ndarray:
    """A 1-D int64 C-contiguous copy/view of an integer array-like; clear errors otherwise."""
    a = np.asarray(x)
    if a.size == 0 and a.ndim == 1 and not isinstance(x, np.ndarray):
        a = _EMPTY  # an empty list comes out as float64
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name}: expected length {n} (one per request), got {len(a)}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > _INT64_MAX:
        raise ValueError(f"{name}: values above 2**63 - 1")
    return np.ascontiguousarray(a, dtype=np.int64)


def _hash_column(x, name: str, n: int) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected 64-bit integer hashes, got dtype {a.dtype}")
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{name}: expected shape ({n},) (one per request), got {a.shape}")
    # int64 hashes are reinterpreted bit for bit (two's complement), not range-checked.
    return np.ascontiguousarray(a.astype(np.uint64, copy=False))


def _check_request_columns(cols: dict) -> None:
    head, pl, sl = cols["head_ids"], cols["prefix_lens"], cols["suffix_lens"]
    for name, a in (("head_ids", head), ("prefix_lens", pl), ("suffix_lens", sl)):
        if a.size and a.min() < 0:
            i = int(np.argmax(a < 0))
            raise ValueError(f"{name}: must be >= 0, got {int(a[i])} at request {i}")
    total = pl + sl  # (N,)
    if total.size and total.min() < 1:
        i = int(np.argmax(total < 1))
        raise ValueError(f"requests: request {i} has no tokens (prefix and suffix both empty)")
    if total.size and total.max() > _INT32_MAX:
        i = int(np.argmax(total > _INT32_MAX))
        raise ValueError(f"requests: request {i} has more than 2**31 - 1 tokens")


def _token_buffer(x, name: str) -> np.ndarray:
    """A 1-D C-contiguous int32/int64 token buffer (no dtype conversion: a wrong dtype is the caller's bug)."""
    a = np.asarray(x)
    if a.size == 0 and not isinstance(x, np.ndarray):
        a = _EMPTY  # an empty list comes out as float64
    if a.dtype not in _TOKEN_DTYPES:
        raise TypeError(f"{name}: expected int32 or int64 token ids, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _flat_columns(head_ids, prefix_tokens, prefix_offsets, suffix_tokens, suffix_offsets) -> dict:
    """Validated columns of the flat form (all vectorised: no per-request Python work)."""
    head = _int_column(head_ids, "head_ids", None)
    n = len(head)
    cols = {"head_ids": head}
    for side, tok, off in (("prefix", prefix_tokens, prefix_offsets), ("suffix", suffix_tokens, suffix_offsets)):
        t = _token_buffer(tok, f"{side}_tokens")
        o = np.asarray(off)
        name = f"{side}_offsets"
        if o.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integer offsets, got dtype {o.dtype}")
        if o.ndim != 1 or len(o) != n + 1:
            raise ValueError(f"{name}: expected shape ({n + 1},) (one more than the {n} head_ids), got {o.shape}")
        o = np.ascontiguousarray(o, dtype=np.int64)
        if o[0] < 0:
            raise ValueError(f"{name}: must be >= 0, got {int(o[0])} at index 0")
        lens = np.diff(o)  # (N,)
        if lens.size and lens.min() < 0:
            i = int(np.argmax(lens < 0))
            raise ValueError(f"{name}: must not decrease, got {int(o[i])} then {int(o[i + 1])} at index {i + 1}")
        if o[-1] > len(t):
            raise ValueError(f"{name}: ends at {int(o[-1])}, past the end of {side}_tokens ({len(t)} tokens)")
        used = t[o[0] : o[-1]]  # (T,) the tokens the requests cover
        if used.size and used.min() < 0:
            pos = int(o[0] + np.argmax(used < 0))
            i = int(np.searchsorted(o, pos, side="right") - 1)
            raise ValueError(
                f"{side}_tokens: token ids must be >= 0, got {int(t[pos])} at position {pos} (request {i})"
            )
        cols[f"{side}_lens"], cols[f"{side}_offsets"], cols[f"{side}_tokens"] = lens, o, t
    _check_request_columns(cols)
    return cols


# ------------------------------------------------------------------------------------------------
# Content hash (the C++ one; scheduler_reference.hash_seq is its Python twin)


def hash_token_arrays(tokens, offsets) -> np.ndarray:
    """64-bit content hash of each sequence ``tokens[offsets[i]:offsets[i+1]]`` -> (n,) uint64."""
    t = _int_column(tokens, "tokens", None)
    o = _int_column(offsets, "offsets", None)
    if len(o) < 1 or o[0] != 0 or o[-1] != len(t) or np.any(np.diff(o) < 0):
        raise ValueError("offsets: must start at 0, never decrease and end at len(tokens)")
    return native().sched_hash_tokens(t, o)


def hash_tokens(sequences: Iterable) -> np.ndarray:
    """64-bit content hash of each token sequence (lists or 1-D integer arrays) -> (n,) uint64.

    These are the hashes the planner uses internally; pass them to ``Scheduler.plan_arrays``.
    """
    parts = [as_tokens(s, f"sequences[{i}]") for i, s in enumerate(sequences)]
    off = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=off[1:])
    flat = np.concatenate(parts).astype(np.int64, copy=False) if off[-1] else _EMPTY
    return hash_token_arrays(flat, off)
