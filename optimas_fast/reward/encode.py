"""Encoding: planned rows -> pooled fp32 hidden states (R, H), one function per batch layout.

    encode_rows     padded: each row independently, right-padded to the longest row of the batch (rounded up
                    to a bucket, config.padding_bucket)
    encode_shared   shared-prefix (decoders): each distinct prefix once (KV cache), every suffix against it
    encode_packed   packed: one padding-free (1, L) pack, a block mask keeping rows (or prefix groups) apart
    encode_planned  every planned batch through the layout the configuration asks for (shared runs merged)

Pooling. A decoder's last token has seen the whole sequence, so decoders use the hidden state of the last
suffix token. An encoder's last token ([SEP]) is not a summary of anything in particular; encoders use mean
pooling over the tokens (what MiniLM / sentence-transformers were trained with) or the [CLS] state
(``pooling="cls"``).

Prefix sharing (decoders only) is exact: the result equals independent encoding up to float rounding (tests
check it). Bidirectional encoders cannot do this (every prefix token attends to the suffix).

The functions read the encoder through ``EncoderView`` (what they need of it, nothing more): this module does
not import encoder.py, which composes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from optimas_fast import ops
from optimas_fast.scheduler import Plan

from . import attention
from .config import RewardModelConfig
from .rows import Rows


class EncoderView(Protocol):
    """What the encoding functions read of an encoder (reward/encoder.py's ``Encoder``)."""

    config: RewardModelConfig
    device: torch.device
    hf_config: Any
    is_encoder: bool
    pooling: str  # "last" | "mean" | "cls"
    pad_id: int
    token_budget: int
    shares_prefix: bool
    net: nn.Module  # RewardNet: .hidden_size
    _cache_kw: str  # the backbone's KV-cache argument name

    def forward_backbone(self, inference: bool) -> tuple[nn.Module, Any]: ...

    def _run(self, backbone: nn.Module, **kw) -> Any: ...

    def packs_by_positions(self) -> bool: ...

    def shares_in_packs(self) -> bool: ...

    def _shared_prefix_kernel(self) -> bool: ...


# backbones whose packed forward (position_ids + a 4-D mask) is exactly their padded one (tests: bert, llama)
PACKABLE_ENCODERS = ("bert",)
PACKABLE_DECODERS = ("llama", "qwen2", "qwen3")


def _spans(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, a + n) for a, n in zip(starts, lens)])`` without a Python loop (int64)."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    begin = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=begin[1:])  # where each span starts in the output
    return np.repeat(starts - begin, lens) + np.arange(total, dtype=np.int64)


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache, each (B, kv_heads, L, d): ``cache.layers``
    (transformers >= 4.56) or the older key_cache / value_cache lists."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _gather_padded(
    tokens: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    T: int,
    pad: int,
    out: np.ndarray | None = None,
    col0: np.ndarray | None = None,
) -> np.ndarray:
    """Writes ``tokens[starts[r] : starts[r] + lens[r]]`` into row r of ``out`` (R, T) from column col0[r]
    (default 0), by index arithmetic over the (R, T) grid: no Python loop over rows."""
    R = len(starts)
    if out is None:
        out = np.full((R, T), pad, dtype=np.int64)  # (R, T)
    j = np.arange(T, dtype=np.int64)[None, :]  # (1, T)
    c0 = np.zeros((R, 1), dtype=np.int64) if col0 is None else col0[:, None]  # (R, 1)
    rel = j - c0  # (R, T) position inside the copied span
    m = (rel >= 0) & (rel < lens[:, None])  # (R, T)
    out[m] = tokens[(starts[:, None] + rel)[m]]
    return out


def padded_width(longest: int, bucket: int | None) -> int:
    """A padded batch's width for its ``longest`` row: rounded up to a multiple of ``bucket`` tokens, or of the
    largest power of two <= longest / 8 when that is smaller (padding <= 12.5%); ``bucket=None``: ``longest``.
    See ``RewardModelConfig.padding_bucket`` for why."""
    if bucket is None or longest <= 0:
        return longest
    m = max(1, min(bucket, 1 << max(0, (longest // 8).bit_length() - 1)))
    return -(-longest // m) * m


def _pool(enc: EncoderView, hidden: torch.Tensor, mask: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    if enc.pooling == "last":
        return ops.last_token_hidden(hidden, lens, padding_side="right")  # (R, H)
    if enc.pooling == "cls":
        return hidden[:, 0]  # (R, H)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (R, T, 1)
    return (hidden * m).sum(1) / lens.to(hidden.dtype).clamp_min(1.0)[:, None]  # (R, H)


def _ids_mask(enc: EncoderView, ids: np.ndarray, lens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = ids.shape[1]
    lens_t = torch.from_numpy(lens)  # (R,)
    mask = (torch.arange(T)[None, :] < lens_t[:, None]).long()  # (R, T)
    return torch.from_numpy(ids).to(enc.device), mask.to(enc.device), lens_t.to(enc.device)


def encode_rows(enc: EncoderView, rows: Rows, idx: np.ndarray, inference: bool) -> tuple[torch.Tensor, int]:
    """Rows ``idx`` encoded independently: pooled states (R, H) in fp32, and tokens pushed (padding incl.)."""
    p, s = rows.prefix_of[idx], rows.suffix_of[idx]  # (R,)
    po, so = rows.prefix_offsets, rows.suffix_offsets
    lp, ls = po[p + 1] - po[p], so[s + 1] - so[s]  # (R,)
    L = lp + ls  # (R,)
    T = padded_width(int(L.max()), enc.config.padding_bucket)
    ids = _gather_padded(rows.prefix_tokens, po[p], lp, T, enc.pad_id)  # (R, T) prefix part
    _gather_padded(rows.suffix_tokens, so[s], ls, T, enc.pad_id, out=ids, col0=lp)  # suffix after it
    ids_t, mask, lens = _ids_mask(enc, ids, L)
    backbone, ctx = enc.forward_backbone(inference)
    with ctx:
        hidden = enc._run(backbone, input_ids=ids_t, attention_mask=mask).last_hidden_state  # (R, T, H)
    # pool in fp32: a bf16 sum over hundreds of tokens would lose the mean's low bits
    return _pool(enc, hidden.float(), mask, lens), ids.size


def encode_packed(
    enc: EncoderView, rows: Rows, idx: np.ndarray, inference: bool, share: np.ndarray | None = None
) -> tuple[torch.Tensor, int]:
    """Rows ``idx`` as ONE padding-free pack (1, L): pooled states (R, H) in fp32, and tokens pushed (no
    padding).

    Layout: the pack is a run of *groups*, each a prefix followed by the suffixes of its rows. A row with
    ``share[k]`` (rows of planner prefix groups, where ``shares_in_packs()``) joins the group of every
    other shared row with the same prefix, so that prefix is in the pack once (a prefix tree of depth
    one); any other row is a group of its own (its prefix, then its suffix). The attention mask keeps each
    token inside its group; within a group a prefix token is seen by every row of the group and a suffix
    token only by its own row; decoders add causality. Positions restart at 0 per group and each suffix
    continues from its prefix's length, so every row sees exactly what it would see alone (tests check
    scores and gradients against padded batches). With a flash-attention kernel (``packs_by_positions``)
    there is no mask and no sharing: each row is its own segment, found by the kernel from the positions."""
    R = len(idx)
    dev = enc.device
    by_positions = enc.packs_by_positions()
    if not enc.shares_in_packs():
        share = None
    po, so = rows.prefix_offsets, rows.suffix_offsets
    p, s = rows.prefix_of[idx], rows.suffix_of[idx]  # (R,)
    ls = so[s + 1] - so[s]  # (R,)
    alone = -1 - np.arange(R, dtype=np.int64)  # a key no prefix id takes
    key = alone if share is None else np.where(share, p, alone)  # (R,) group key
    _, first, grp = np.unique(key, return_index=True, return_inverse=True)  # (G,), (G,), (R,)
    grp = grp.reshape(-1)
    order = np.argsort(grp, kind="stable")  # (R,) rows by group, arrival order inside each
    gp = p[first]  # (G,) each group's prefix
    lp = po[gp + 1] - po[gp]  # (G,)
    G = len(gp)
    # segments in pack order: group g's prefix, then its rows' suffixes
    n_in = np.bincount(grp, minlength=G)  # (G,) rows per group
    seg_of_prefix = np.zeros(G, dtype=np.int64)
    np.cumsum(n_in[:-1] + 1, out=seg_of_prefix[1:])  # (G,) segment index of group g's prefix
    rank = np.arange(R) - np.repeat(np.cumsum(n_in) - n_in, n_in)  # (R,) place of order[m] in its group
    seg_of_row = np.empty(R, dtype=np.int64)
    seg_of_row[order] = seg_of_prefix[grp[order]] + 1 + rank  # (R,) segment index of row k's suffix
    S = G + R
    seg_len = np.empty(S, dtype=np.int64)
    seg_len[seg_of_prefix], seg_len[seg_of_row] = lp, ls
    seg_off = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(seg_len, out=seg_off[1:])  # (S+1,) where each segment starts in the pack
    L = int(seg_off[-1])
    ids = np.empty(L, dtype=np.int64)  # (L,)
    ids[_spans(seg_off[seg_of_prefix], lp)] = rows.prefix_tokens[_spans(po[gp], lp)]
    ids[_spans(seg_off[seg_of_row], ls)] = rows.suffix_tokens[_spans(so[s], ls)]
    seg_group = np.empty(S, dtype=np.int64)
    seg_group[seg_of_prefix], seg_group[seg_of_row] = np.arange(G), grp
    seg_owner = np.empty(S, dtype=np.int64)  # the row a segment belongs to; -1: a shared prefix, seen by
    seg_owner[seg_of_prefix] = np.where(key[first] >= 0, -1, first)  # every row of its group (and seeing
    seg_owner[seg_of_row] = np.arange(R)  # only them); a lone row owns its prefix (encoders look both ways)
    seg_pos0 = np.zeros(S, dtype=np.int64)
    seg_pos0[seg_of_row] = lp[grp]  # a suffix continues from its prefix's length
    tok_seg = np.repeat(np.arange(S), seg_len)  # (L,)
    pos = seg_pos0[tok_seg] + np.arange(L) - seg_off[tok_seg]  # (L,)
    g_t = torch.from_numpy(seg_group[tok_seg]).to(dev)  # (L,)
    if by_positions:
        # no mask: transformers reads the packed rows off the position ids (each restarts at 0) and gives
        # a flash-attention kernel their cu_seqlens (varlen), or builds the block-causal mask itself
        mask = None
    else:
        o_t = torch.from_numpy(seg_owner[tok_seg]).to(dev)  # (L,)
        allowed = (g_t[:, None] == g_t[None, :]) & ((o_t[None, :] < 0) | (o_t[None, :] == o_t[:, None]))  # (L, L)
        if not enc.is_encoder:
            allowed &= torch.ones(L, L, dtype=torch.bool, device=dev).tril_()  # causal: key j <= query i
        mask = allowed[None, None]  # (1, 1, L, L) True = may attend
        if getattr(enc.hf_config, "_attn_implementation", None) == "eager":  # eager adds it to the scores
            mask = torch.zeros(mask.shape, device=dev).masked_fill_(~mask, torch.finfo(torch.float32).min)
    backbone, ctx = enc.forward_backbone(inference)
    kw = {} if enc.is_encoder else {"use_cache": False}
    with ctx:
        hidden = enc._run(
            backbone,
            input_ids=torch.from_numpy(ids)[None].to(dev),
            attention_mask=mask,
            position_ids=torch.from_numpy(pos)[None].to(dev),
            **kw,
        ).last_hidden_state[0]
    hidden = hidden.float()  # (L, H)
    if enc.pooling == "last":  # a row's last suffix token; an empty suffix reads its prefix's last token
        last = np.where(ls > 0, seg_off[seg_of_row] + ls - 1, seg_off[seg_of_prefix[grp] + 1] - 1)  # (R,)
        return hidden.index_select(0, torch.from_numpy(last).to(dev)), L
    # cls / mean: encoders, where every row is a group of its own (prefix sharing is decoders' only)
    if enc.pooling == "cls":
        return hidden.index_select(0, torch.from_numpy(seg_off[seg_of_prefix[grp]]).to(dev)), L  # (R, H)
    total = torch.zeros(G, hidden.shape[1], device=dev, dtype=hidden.dtype).index_add_(0, g_t, hidden)  # (G, H)
    n_tok = torch.from_numpy(lp + np.bincount(grp, weights=ls, minlength=G).astype(np.int64)).to(dev, hidden.dtype)
    return (total / n_tok[:, None]).index_select(0, torch.from_numpy(grp).to(dev)), L  # (R, H)


def encode_shared(enc: EncoderView, rows: Rows, idx: np.ndarray, inference: bool) -> tuple[torch.Tensor, int]:
    """Decoder rows ``idx`` from one or more prefix groups (planner prefix-group batches, see
    ``encode_planned``): each distinct prefix is encoded once (KV cache; G prefixes right-padded into one
    call), every suffix against its own prefix's cache rows. Returns last-suffix-token states (R, H) in fp32,
    in ``idx`` order, and tokens pushed (padding incl.)."""
    po, so = rows.prefix_offsets, rows.suffix_offsets
    groups, inverse = np.unique(rows.prefix_of[idx], return_inverse=True)  # (G,), (R,) row -> its prefix
    lp = po[groups + 1] - po[groups]  # (G,)
    s = rows.suffix_of[idx]  # (R,)
    ls = so[s + 1] - so[s]  # (R,)
    p_ids = _gather_padded(
        rows.prefix_tokens, po[groups], lp, padded_width(int(lp.max()), enc.config.padding_bucket), enc.pad_id
    )  # (G, Lp)
    s_ids = _gather_padded(
        rows.suffix_tokens, so[s], ls, padded_width(int(ls.max()), enc.config.padding_bucket), enc.pad_id
    )  # (R, Ls)
    p_ids_t, p_mask, p_lens = _ids_mask(enc, p_ids, lp)
    s_ids_t, s_mask, s_lens = _ids_mask(enc, s_ids, ls)
    gidx = torch.from_numpy(inverse.astype(np.int64)).to(enc.device)  # (R,) cache row of each suffix row
    backbone, ctx = enc.forward_backbone(inference)
    kernel = enc._shared_prefix_kernel() and int(lp.min()) >= 1
    # activation checkpointing (training): transformers runs no KV cache then, so the kernel's attention takes the
    # prefix's keys/values as the prefix call makes them (attention.capture_kv); the per-row cache path needs a cache
    checkpointed = not inference and enc.config.gradient_checkpointing
    if checkpointed and not kernel:
        raise ValueError(
            "config.gradient_checkpointing=True with prefix sharing on a decoder runs through the shared-prefix "
            "attention kernel (config.shared_prefix_kernel=True, attn_implementation='sdpa', a llama / qwen2 / qwen3 "
            "backbone with full attention, non-empty prefixes); without it set config.prefix_sharing=False, or bound "
            "activations with config.train_chunk_tokens"
        )
    with ctx:
        if checkpointed:
            with attention.capture_kv() as kv:
                enc._run(backbone, input_ids=p_ids_t, attention_mask=p_mask, use_cache=False)
            layers = [kv[i] for i in range(len(kv))]  # (G, kv_heads, Lp, d) per layer
        else:
            out = enc._run(backbone, input_ids=p_ids_t, attention_mask=p_mask, use_cache=True)
            # per layer keys/values (G, heads, Lp, d); the output field follows the argument's name
            cache = getattr(out, enc._cache_kw)
        # positions continue from each row's real prefix length (rotary positions ignore the padding)
        pos = p_lens.index_select(0, gidx)[:, None] + torch.arange(s_ids.shape[1], device=enc.device)  # (R, Ls)
        if kernel:
            # the kernel attends to each prefix once (attention.py); no cache expanded per row
            sp = attention.SharedPrefix(layers if checkpointed else _cache_layers(cache), inverse, lp)
            with attention.shared_prefix(sp):
                hidden = enc._run(
                    backbone, input_ids=s_ids_t, position_ids=pos, use_cache=False
                ).last_hidden_state  # (R, Ls, H)
        else:
            # one cache row per suffix row: an index gather, differentiable, so training backpropagates
            # through each shared prefix exactly once per batch
            cache.batch_select_indices(gidx)
            # a shorter prefix's padding stays masked: (R, Lp + Ls), the suffix after the padded prefix block
            mask = torch.cat([p_mask.index_select(0, gidx), s_mask], dim=1)
            hidden = enc._run(
                backbone,
                input_ids=s_ids_t,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{enc._cache_kw: cache},
            ).last_hidden_state  # (R, Ls, H)
    h = ops.last_token_hidden(hidden, s_lens, padding_side="right").float()  # (R, H)
    return h, p_ids.size + s_ids.size


def _runs(enc: EncoderView, plan: Plan, batches: Sequence[int]) -> list[tuple[list[int], bool]]:
    """The batches as (run, shared) in order: consecutive shared-prefix batches merged into runs of at most
    token_budget padded tokens and max_rows rows (shared=True); every other batch alone. A batch is shared
    when it is a planner prefix-group batch of 2+ rows with non-empty suffixes (an empty suffix has no last
    suffix token) on a decoder that shares prefixes, without packing. Why merge: the planner gives each
    prefix group its own batch, and with unique pairs (one prompt, two responses) that is two short rows
    per backbone call. One call over G prefixes then one over their suffixes makes bigger GEMMs and fewer
    Python layer calls, with the same prefix-token saving."""
    off, lens = plan.batch_offsets, plan.row_lengths
    budget, max_rows = enc.token_budget, enc.config.max_rows
    runs: list[tuple[list[int], bool]] = []
    if not enc.config.packing and not enc.shares_prefix:  # every batch alone (encoders, no sharing)
        return [([b], False) for b in batches]
    if enc.config.packing:  # consecutive packs merged up to the pack budget (unique pairs: 2-row groups)
        pack = min(budget, enc.config.pack_tokens)
        t = r = 0
        for b in batches:
            bt, br = int(plan.batch_tokens[b]), int(off[b + 1] - off[b])
            if runs and t + bt <= pack and r + br <= max_rows:
                runs[-1][0].append(b)
                t, r = t + bt, r + br
            else:
                runs.append(([b], False))
                t, r = bt, br
        return runs
    g = r = lp = ls = 0  # the open shared run: prefixes, rows, longest prefix, longest suffix (g=0: none)
    for b in batches:
        a, z = int(off[b]), int(off[b + 1])
        if not (enc.shares_prefix and plan.batch_prefix_group[b] >= 0 and z - a > 1 and lens[a:z].min() > 0):
            runs.append(([b], False))
            g = 0
            continue
        blp, bls = int(plan.batch_prefix_len[b]), int(lens[a:z].max())  # row lengths: suffixes here
        nlp, nls = max(lp, blp), max(ls, bls)
        if g and (g + 1) * nlp + (r + z - a) * nls <= budget and r + z - a <= max_rows:
            runs[-1][0].append(b)
            g, r, lp, ls = g + 1, r + z - a, nlp, nls
        else:
            runs.append(([b], True))
            g, r, lp, ls = 1, z - a, blp, bls
    return runs


def encode_planned(
    enc: EncoderView, rows: Rows, plan: Plan, inference: bool, batches: Sequence[int] | None = None
) -> tuple[torch.Tensor, int]:
    """Every planned batch (or only ``batches``, ascending batch indices) through the backbone: states of
    their rows in ``plan.rows`` order ((U, H) for all batches), and tokens pushed."""
    hs, tokens = [], 0
    off = plan.batch_offsets
    for run, shared in _runs(enc, plan, range(len(off) - 1) if batches is None else batches):
        idx = np.concatenate([plan.rows[off[b] : off[b + 1]] for b in run])  # (R,) request indices, in order
        if enc.config.packing:
            # rows of planner prefix groups (encode_packed decides whether they share inside the pack)
            share = np.concatenate([np.full(off[b + 1] - off[b], plan.batch_prefix_group[b] >= 0) for b in run])  # (R,)
            h, n = encode_packed(enc, rows, idx, inference, share)
        elif shared:
            h, n = encode_shared(enc, rows, idx, inference)
        else:
            h, n = encode_rows(enc, rows, idx, inference)
        hs.append(h)
        tokens += n
    if not hs:
        return torch.empty(0, enc.net.hidden_size, device=enc.device), 0
    return torch.cat(hs, 0), tokens
