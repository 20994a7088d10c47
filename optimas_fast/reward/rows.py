"""Row preparation: (component, inputs, outputs) rows -> ``Rows``, the columns the planner and the encoders read.

    rows --prepare_rows--> text-level dedupe: each distinct prefix text and suffix text once; one batched
                           fast-tokenizer call per side for what the token cache lacks; truncation vectorised
                           (numpy over rows); flat int64 token buffers + offsets of the distinct prefixes/suffixes

Nothing here knows about backbones, heads' parameters or batches: a component's head id and description come
in as arguments.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimas_fast.render import REWARD_INPUT_CHARS, REWARD_OUTPUT_CHARS, format_fields

from .data import ScoreRequest
from .template import TokenCache


def _text_row(i: int, component: Any, inputs: Any, outputs: Any) -> tuple[str, str, str]:
    """Row ``i`` as text. Inputs or outputs given as a mapping of field -> value (a component's own form) are
    rendered as the loop renders them for its LRFs (``render.format_fields``: ``field: value`` lines in the
    mapping's order, each value capped), so ``score([("a", {"q": "hi"}, "yo")])`` reads what training read."""
    if isinstance(inputs, Mapping):
        inputs = format_fields(inputs, max_chars=REWARD_INPUT_CHARS)
    if isinstance(outputs, Mapping):
        outputs = format_fields(outputs, max_chars=REWARD_OUTPUT_CHARS)
    for j, v in enumerate((component, inputs, outputs)):
        if not isinstance(v, str):
            kind = "a str" if j == 0 else "a str or a mapping of field -> value"
            raise TypeError(f"requests[{i}][{j}] must be {kind}, got {type(v).__name__}")
    return component, inputs, outputs


@dataclass
class Rows:
    """N requests after the template, as columns over distinct token sequences.

    Row i is ``prefixes[prefix_of[i]] + suffixes[suffix_of[i]]`` scored by head ``head_ids[i]``. Distinct
    prefixes are distinct (text, truncation) pairs, distinct suffixes distinct output texts: equal ids mean
    equal tokens, so the ids are exact identities for the planner (no hashing, no collisions).
    """

    head_ids: np.ndarray  # (N,) int64
    prefix_of: np.ndarray  # (N,) int64 index of the row's prefix (after truncation)
    suffix_of: np.ndarray  # (N,) int64 index of the row's suffix
    prefix_tokens: np.ndarray  # (Tp,) int64 ids of all distinct prefixes (lead + body + sep), concatenated
    prefix_offsets: np.ndarray  # (P+1,) int64
    suffix_tokens: np.ndarray  # (Ts,) int64 ids of all distinct suffixes (outputs + sep), concatenated
    suffix_offsets: np.ndarray  # (S+1,) int64
    truncated: np.ndarray  # (N,) int64 prefix-body tokens the template dropped (0: the row fits)
    full_length: np.ndarray  # (N,) int64 the row's length before any truncation
    unfit: np.ndarray  # (N,) bool the suffix alone leaves no room for min_prefix_tokens (cannot be scored)

    def __len__(self) -> int:
        return len(self.head_ids)

    @property
    def prefix_lens(self) -> np.ndarray:
        return np.diff(self.prefix_offsets)[self.prefix_of]  # (N,)

    @property
    def suffix_lens(self) -> np.ndarray:
        return np.diff(self.suffix_offsets)[self.suffix_of]  # (N,)

    def take(self, idx) -> Rows:
        """The rows ``idx`` (any integer index array); token buffers are shared, not copied."""
        idx = np.asarray(idx, dtype=np.int64)
        return Rows(
            self.head_ids[idx],
            self.prefix_of[idx],
            self.suffix_of[idx],
            self.prefix_tokens,
            self.prefix_offsets,
            self.suffix_tokens,
            self.suffix_offsets,
            self.truncated[idx],
            self.full_length[idx],
            self.unfit[idx],
        )

    def row(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        p, s = int(self.prefix_of[i]), int(self.suffix_of[i])
        po, so = self.prefix_offsets, self.suffix_offsets
        return (
            tuple(self.prefix_tokens[po[p] : po[p + 1]].tolist()),
            tuple(self.suffix_tokens[so[s] : so[s + 1]].tolist()),
        )


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for the block (restored after, as it was). Why: preparing rows
    allocates millions of small objects that form no cycles (token-id tuples, dict entries, strings), and each
    allocation burst triggers collections whose full scans grow with everything alive: at 1M rows that was
    ~4 us a row of the host path (benchmarks/bench_host.py: 10.1 -> 6.4 us/row with the collector paused)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _flat(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ids (T,) and offsets (len+1,) of many id sequences."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))  # (K,)
    off = np.zeros(len(seqs) + 1, dtype=np.int64)  # (K+1,)
    np.cumsum(lens, out=off[1:])
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(off[-1]))  # (T,)
    return flat, off


def prepare_rows(
    triples: Iterable[Any],
    tokens: TokenCache,
    head_id: Callable[[str], int],
    descriptions: Mapping[str, str],
    check_fit: bool,
    parse: bool,
) -> Rows:
    """(component, inputs, outputs) rows -> Rows, through the template of ``tokens`` (its TemplateConfig).

    The rows are parsed (``parse``: ScoreRequest objects or 3-tuples), type-checked and deduplicated at text
    level in ONE pass of Python (two dict lookups per row); everything after works on distinct texts (one
    batched tokenizer call per side for what the token cache lacks) or on numpy columns (truncation,
    lengths). ``check_fit``: raise (naming the row) when a row's outputs cannot fit max_length; otherwise such
    rows are flagged in ``Rows.unfit``. ``head_id`` maps a component name to its head (raising on an unknown
    one), ``descriptions`` a component to its description (the prefix's first part)."""
    with _gc_paused():
        return _prepare_rows(triples, tokens, head_id, descriptions, check_fit, parse)


def _prepare_rows(
    triples: Iterable[Any],
    tokens: TokenCache,
    head_id: Callable[[str], int],
    descriptions: Mapping[str, str],
    check_fit: bool,
    parse: bool,
) -> Rows:
    key_of: dict = {}  # (component, inputs) -> distinct key
    sfx_of: dict = {}  # outputs text -> distinct suffix
    pk: list[int] = []  # (N,) row -> key
    sk: list[int] = []  # (N,) row -> suffix
    for i, r in enumerate(triples):
        if parse:
            if isinstance(r, ScoreRequest):
                r = (r.component, r.inputs, r.outputs)
            elif not (isinstance(r, (tuple, list)) and len(r) == 3):
                raise TypeError(
                    f"requests[{i}] must be a ScoreRequest or a (component, inputs, outputs) tuple, got {r!r:.80}"
                )
        c, x, y = r
        if type(c) is not str or type(x) is not str or type(y) is not str:
            c, x, y = _text_row(i, c, x, y)
        k = key_of.get((c, x))
        if k is None:
            k = key_of[(c, x)] = len(key_of)
        pk.append(k)
        s = sfx_of.get(y)
        if s is None:
            s = sfx_of[y] = len(sfx_of)
        sk.append(s)
    n = len(pk)
    if n == 0:
        z, z1 = np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        return Rows(z, z, z, z, z1, z, z1, z, z, np.zeros(0, dtype=bool))
    pk = np.fromiter(pk, dtype=np.int64, count=n)  # (N,)
    sk = np.fromiter(sk, dtype=np.int64, count=n)  # (N,)
    keys = list(key_of)
    key_head = np.fromiter((head_id(c) for c, _ in keys), dtype=np.int64, count=len(keys))  # (K,)
    # prefix text per key; keys with equal text (two components, same description) share a prefix
    text_of: dict[str, int] = {}
    key_text = np.fromiter(
        (text_of.setdefault(tokens.prefix_text(descriptions[c], x), len(text_of)) for c, x in keys),
        dtype=np.int64,
        count=len(keys),
    )  # (K,)
    bodies = tokens.ids_many(list(text_of))  # distinct prefix bodies
    outs = tokens.ids_many(list(sfx_of))  # distinct outputs
    lead, sep = tokens.lead, tokens.sep
    tmpl = tokens.config
    tail = tokens.tail  # SEP (encoders) / EOS (decoders with append_eos) / nothing
    suffix_tokens, suffix_offsets = _flat([o + tail for o in outs])
    body_len = np.fromiter((len(b) for b in bodies), dtype=np.int64, count=len(bodies))  # (Pt,)
    row_text = key_text[pk]  # (N,)
    s_len = np.diff(suffix_offsets)[sk]  # (N,)
    fixed = len(lead) + len(sep) + s_len  # (N,)
    room = tmpl.max_length - fixed  # (N,) prefix-body tokens that fit
    unfit = room < tmpl.min_prefix_tokens  # (N,)
    if check_fit and unfit.any():
        i = int(np.argmax(unfit))
        raise ValueError(
            f"requests[{i}]: outputs text is {int(s_len[i])} tokens: with the template it needs "
            f"{int(fixed[i]) + tmpl.min_prefix_tokens} > max_length={tmpl.max_length}; the suffix is never "
            "truncated: raise max_length or shorten the outputs"
        )
    b_len = body_len[row_text]  # (N,)
    dropped = np.where(unfit, 0, np.maximum(0, b_len - room))  # (N,)
    # distinct prefixes = distinct (text, tokens dropped): untruncated rows use the text's own id
    variant = row_text.copy()  # (N,)
    cut = dropped > 0
    extra: list[tuple[int, int]] = []
    if cut.any():
        span = int(dropped.max()) + 1
        codes, inv = np.unique(row_text[cut] * span + dropped[cut], return_inverse=True)
        variant[cut] = len(bodies) + inv
        extra = [(int(c // span), int(c % span)) for c in codes]
    left = tmpl.truncation_side == "left"
    prefixes = [lead + b + sep for b in bodies]
    prefixes += [lead + (bodies[t][d:] if left else bodies[t][: len(bodies[t]) - d]) + sep for t, d in extra]
    prefix_tokens, prefix_offsets = _flat(prefixes)
    return Rows(
        head_ids=key_head[pk],
        prefix_of=variant,
        suffix_of=sk,
        prefix_tokens=prefix_tokens,
        prefix_offsets=prefix_offsets,
        suffix_tokens=suffix_tokens,
        suffix_offsets=suffix_offsets,
        truncated=dropped,
        full_length=len(lead) + len(sep) + b_len + s_len,
        unfit=unfit,
    )
