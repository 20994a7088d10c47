"""Scheduler tests: C++ planner == pure-Python planner (optimas_fast.scheduler_reference), on every input
form (request lists, flat buffers, columns), and the plan's properties checked from scratch against the
raw requests (dedup map, prefix groups, budgets, ordering, fan-out), plus edge cases and every bad input."""

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimas_fast.scheduler import Plan, Scheduler, hash_token_arrays, hash_tokens
from optimas_fast.scheduler_reference import hash_seq

MODES = ("padded", "packed")
_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# helpers


def both(token_budget, max_rows, mode="padded", share_prefix=False, order="length"):
    return (
        Scheduler(token_budget, max_rows, mode, share_prefix, order=order),
        Scheduler(token_budget, max_rows, mode, share_prefix, order=order, backend="python"),
    )


def flat(reqs, dtype=np.int32, gap=0):
    """The flat form of a request list: head ids and, per side, one token buffer + (N+1,) offsets. `gap`
    leaves that many unused tokens in front of the first request and behind the last."""
    head = np.array([r[0] for r in reqs], dtype=np.int64)
    out = [head]
    for side in (1, 2):
        lens = np.array([len(r[side]) for r in reqs], dtype=np.int64)
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64) + gap
        tok = np.full(int(off[-1]) + gap, 9999, dtype=dtype)
        for i, r in enumerate(reqs):
            tok[off[i] : off[i + 1]] = r[side]
        out += [tok, off]
    return tuple(out)


def plan_both(reqs, *args, **kw):
    """Plans with both backends and every token input form; all must agree. Returns the C++ plan."""
    cpp, py = both(*args, **kw)
    a = cpp.plan(reqs)
    assert_same(a, py.plan(reqs))
    f = flat(reqs)
    assert_same(a, cpp.plan_flat(*f))
    assert_same(a, py.plan_flat(*f))
    return a


def assert_same(a: Plan, b: Plan):
    ca, cb = a.columns(), b.columns()
    for k in ca:
        assert ca[k].dtype == cb[k].dtype, k
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    assert a.same_as(b)


def check_plan(plan: Plan, reqs, cfg):
    """Verifies every promised property of `plan` directly from the requests (no planner code reused)."""
    reqs = [(int(h), tuple(int(t) for t in p), tuple(int(t) for t in s)) for h, p, s in reqs]
    n = len(reqs)
    assert plan.n_requests == n
    # dedup: the first identical request represents
    first = {}
    for i, r in enumerate(reqs):
        first.setdefault(r, i)
    rep = [first[r] for r in reqs]
    assert plan.dedup.dtype == np.int64 and plan.dedup.tolist() == rep
    reps = sorted(set(rep))
    rows = plan.rows.tolist()
    assert sorted(rows) == reps, "every representative in exactly one batch"
    # prefix groups: >= 2 representatives with one non-empty prefix, numbered by first member
    by_prefix = defaultdict(list)
    for r in reps:
        if reqs[r][1]:
            by_prefix[reqs[r][1]].append(r)
    groups = sorted((m for m in by_prefix.values() if len(m) >= 2), key=lambda m: m[0])
    assert [g.members.tolist() for g in plan.prefix_groups] == groups
    gid = {}
    for g in plan.prefix_groups:
        assert g.representative == g.members[0]
        assert g.prefix_len == len(reqs[g.representative][1]) > 0
        for m in g.members.tolist():
            assert reqs[m][1] == reqs[g.representative][1], "members truly share the prefix"
            gid[m] = g.group
    assert plan.prefix_group.tolist() == [gid.get(rep[i], -1) for i in range(n)]
    G = len(groups)
    # batches
    budget, packed = cfg["token_budget"], cfg["mode"] == "packed"
    shared_batch_of = {}
    prev = None
    for b in plan.batches:
        R = len(b.rows)
        assert 1 <= R <= cfg["max_rows"]
        if b.prefix_group >= 0:
            assert cfg["share_prefix"]
            pre = reqs[groups[b.prefix_group][0]][1]
            assert b.prefix_len == len(pre)
            for r in b.rows.tolist():
                assert reqs[r][1] == pre
                shared_batch_of[r] = b.prefix_group
            expected = [len(reqs[r][2]) for r in b.rows.tolist()]
        else:
            assert b.prefix_len == 0
            expected = [len(reqs[r][1]) + len(reqs[r][2]) for r in b.rows.tolist()]
        assert b.lengths.tolist() == expected
        assert b.max_len == max(expected)
        assert b.tokens == b.prefix_len + (sum(expected) if packed else R * b.max_len)
        if b.oversized:
            assert R == 1 and b.tokens > budget
        else:
            assert b.tokens <= budget, "budget holds"
        if packed:
            assert b.cu_seqlens.dtype == np.int32
            assert b.cu_seqlens.tolist() == [0, *np.cumsum(expected).tolist()]
        else:
            assert b.cu_seqlens is None
        pool = b.prefix_group if b.prefix_group >= 0 else G
        if cfg["order"] == "length":
            assert expected == sorted(expected, reverse=True), "longest first within a batch"
            if prev is not None:  # batches ordered by pool, then longest first
                assert (prev[0], -prev[1]) <= (pool, -b.max_len)
        # next-fit never splits needlessly: the next row would not have fit the previous batch
        if prev is not None and prev[0] == pool and not prev[2] and not b.oversized:
            p_lens, P = prev[4], b.prefix_len
            grown = p_lens + [expected[0]]
            cost = P + (sum(grown) if packed else len(grown) * max(grown))
            assert len(grown) > cfg["max_rows"] or cost > budget
        prev = (pool, b.max_len, b.oversized, b.rows.tolist(), expected)
    if cfg["order"] == "arrival":  # rows keep input order within each pool
        pools = defaultdict(list)
        for b in plan.batches:
            pools[b.prefix_group].extend(b.rows.tolist())
        assert all(r == sorted(r) for r in pools.values())
    if cfg["share_prefix"]:
        assert shared_batch_of == {r: gid[r] for r in reps if r in gid}, "groups batched with their prefix"
    # fan-out and accounting
    row_scores = plan.rows * 7 + 1  # (R,) a score that identifies the row's request
    assert plan.scatter(row_scores).tolist() == [7 * r + 1 for r in rep]
    real = sum(b.prefix_len + int(b.lengths.sum()) for b in plan.batches)
    assert plan.real_tokens == real and plan.budget_tokens == sum(b.tokens for b in plan.batches)
    if packed:
        assert plan.padding_waste == 0.0


@st.composite
def request_lists(draw):
    """Requests drawn from small pools of sequences: duplicates and shared prefixes are common."""
    seq = st.lists(st.integers(0, 3), max_size=9)
    prefixes = draw(st.lists(seq, min_size=1, max_size=4))
    suffixes = draw(st.lists(seq, min_size=1, max_size=5))
    reqs = []
    for _ in range(draw(st.integers(0, 30))):
        h, p, s = draw(st.integers(0, 2)), draw(st.sampled_from(prefixes)), draw(st.sampled_from(suffixes))
        if not p and not s:
            s = [draw(st.integers(0, 3))]
        reqs.append((h, p, s))
    return reqs


configs = st.fixed_dictionaries(
    {
        "token_budget": st.integers(1, 40),
        "max_rows": st.integers(1, 6),
        "mode": st.sampled_from(MODES),
        "share_prefix": st.booleans(),
        "order": st.sampled_from(("length", "length", "arrival")),
    }
)


def random_requests(rng, n, vocab=5, max_prefix=6, max_suffix=8, n_prefixes=4, n_heads=3, dup_frac=0.2):
    prefixes = [rng.integers(0, vocab, rng.integers(0, max_prefix + 1)).tolist() for _ in range(n_prefixes)]
    reqs = []
    for _ in range(n):
        if reqs and rng.random() < dup_frac:
            reqs.append(reqs[rng.integers(0, len(reqs))])
            continue
        p = prefixes[rng.integers(0, n_prefixes)]
        s = rng.integers(0, vocab, rng.integers(0 if p else 1, max_suffix + 1)).tolist()
        reqs.append((int(rng.integers(0, n_heads)), p, s))
    return reqs


# ------------------------------------------------------------------------------------------------
# property tests


@_SETTINGS
@given(reqs=request_lists(), cfg=configs)
def test_cpp_equals_python_and_properties(reqs, cfg):
    plan = plan_both(reqs, cfg["token_budget"], cfg["max_rows"], cfg["mode"], cfg["share_prefix"], order=cfg["order"])
    check_plan(plan, reqs, cfg)


@_SETTINGS
@given(data=st.data(), cfg=configs)
def test_plan_arrays_cpp_equals_python(data, cfg):
    n = data.draw(st.integers(0, 40))
    col = lambda lo, hi: np.array(data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=np.int64)  # noqa: E731
    head, pl, sl = col(0, 3), col(0, 12), col(0, 12)
    sl[(pl + sl) == 0] = 1
    ph, sh = col(0, 3).astype(np.uint64), col(0, 3).astype(np.uint64)
    cpp, py = both(cfg["token_budget"], cfg["max_rows"], cfg["mode"], cfg["share_prefix"], order=cfg["order"])
    for hashes in ((), (ph,), (ph, sh)):
        assert_same(cpp.plan_arrays(head, pl, sl, *hashes), py.plan_arrays(head, pl, sl, *hashes))


@pytest.mark.parametrize("mask", [0, 1, 0xF])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_hash_collisions_never_merge_different_requests(seed, mask, share_prefix):
    """With most hash bits dropped, almost every pair collides: contents must still decide."""
    rng = np.random.default_rng(seed)
    reqs = random_requests(rng, 150, vocab=3, max_prefix=4, max_suffix=4)
    cpp, py = both(25, 4, "padded", share_prefix)
    cpp._hash_mask = mask
    a = cpp.plan(reqs)
    assert_same(a, py.plan(reqs))
    assert_same(a, cpp.plan_flat(*flat(reqs)))
    check_plan(a, reqs, dict(token_budget=25, max_rows=4, mode="padded", share_prefix=share_prefix, order="length"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("share_prefix", [False, True])
def test_medium_random_plan(seed, mode, share_prefix):
    rng = np.random.default_rng(seed)
    reqs = random_requests(rng, 1003, vocab=50, max_prefix=40, max_suffix=120, n_prefixes=9, n_heads=5)
    cfg = dict(
        token_budget=int(rng.integers(150, 700)),
        max_rows=int(rng.integers(3, 17)),
        mode=mode,
        share_prefix=share_prefix,
        order="length",
    )
    plan = plan_both(reqs, cfg["token_budget"], cfg["max_rows"], mode, share_prefix)
    check_plan(plan, reqs, cfg)


def test_plan_arrays_with_hash_tokens_matches_token_plan(seed):
    """The columnar form with hash_tokens() hashes plans exactly like the token form."""
    rng = np.random.default_rng(seed)
    reqs = random_requests(rng, 301, vocab=7, max_prefix=10, max_suffix=20, n_prefixes=5)
    head = np.array([r[0] for r in reqs])
    pl = np.array([len(r[1]) for r in reqs])
    sl = np.array([len(r[2]) for r in reqs])
    ph, sh = hash_tokens([r[1] for r in reqs]), hash_tokens([r[2] for r in reqs])
    for mode in MODES:
        for share in (False, True):
            s = Scheduler(64, 5, mode, share)
            assert_same(s.plan_arrays(head, pl, sl, ph, sh), s.plan(reqs))
            # int64 hashes are taken bit for bit
            assert_same(s.plan_arrays(head, pl, sl, ph.view(np.int64), sh.view(np.int64)), s.plan(reqs))


def test_plan_arrays_without_hashes(seed):
    rng = np.random.default_rng(seed)
    n = 517
    head, pl, sl = rng.integers(0, 4, n), rng.integers(0, 30, n), rng.integers(1, 60, n)
    cpp, py = both(300, 8)
    plan = cpp.plan_arrays(head, pl, sl)
    assert_same(plan, py.plan_arrays(head, pl, sl))
    np.testing.assert_array_equal(plan.dedup, np.arange(n))  # no hashes: no dedup
    assert len(plan.prefix_groups) == 0 and (plan.prefix_group == -1).all()
    assert np.array_equal(np.sort(plan.rows), np.arange(n))
    # prefix hashes only: groups, but still no dedup
    ph = rng.integers(0, 3, n).astype(np.uint64)
    plan = cpp.plan_arrays(head, pl, sl, ph)
    assert_same(plan, py.plan_arrays(head, pl, sl, ph))
    np.testing.assert_array_equal(plan.dedup, np.arange(n))
    assert len(plan.prefix_groups) > 0


@pytest.mark.parametrize("mode", MODES)
def test_huge_lengths_take_the_comparison_sort(seed, mode):
    """Lengths far above the request count use std::stable_sort in C++ instead of counting sort."""
    rng = np.random.default_rng(seed)
    n = 37
    head, pl = rng.integers(0, 3, n), rng.integers(0, 200_000, n)
    sl = rng.integers(1, 300_000, n)
    sl[::5] = sl[0]  # equal lengths: ties must keep index order
    pl[::5] = pl[0]
    cpp, py = both(1_500_000, 6, mode)
    plan = cpp.plan_arrays(head, pl, sl)
    assert_same(plan, py.plan_arrays(head, pl, sl))
    assert any(b.oversized for b in plan.batches) or plan.batch_tokens.max() <= 1_500_000


def test_hash_tokens_matches_python_twin(seed):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 2**40, rng.integers(0, 50)).tolist() for _ in range(41)] + [[], [0], [2**63 - 1]]
    h = hash_tokens(seqs)
    assert h.dtype == np.uint64 and h.shape == (len(seqs),)
    assert h.tolist() == [hash_seq(s) for s in seqs]
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    off = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    np.testing.assert_array_equal(hash_token_arrays(flat, off), h)
    assert len(set(h.tolist())) == len({tuple(s) for s in seqs}), "distinct sequences, distinct hashes"


# ------------------------------------------------------------------------------------------------
# inputs, edge cases, determinism


def _as_form(seq, form, rng):
    """One token sequence in one of the input forms plan() accepts."""
    if form == 0:
        return list(seq)
    if form == 1:
        return tuple(seq)
    if form == 2:  # every numpy integer dtype
        return np.asarray(
            seq,
            dtype=(np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)[
                rng.integers(0, 8)
            ],
        )
    if form == 3:  # strided view
        return np.repeat(np.asarray(seq, dtype=np.int64), 2)[::2]
    if form == 4:  # non-native byte order
        return np.asarray(seq, dtype=">i4")
    return [np.int64(t) for t in seq]  # numpy scalars: the Python checker's path


@_SETTINGS
@given(reqs=request_lists(), cfg=configs, data=st.data())
def test_every_request_form_plans_like_the_reference(reqs, cfg, data):
    """Requests whose sequences come in mixed forms, with prefix objects shared between requests (the
    C++ ingest hashes a shared object once) or equal but distinct: the C++ plan equals the reference's."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    shared: dict = {}
    mixed = []
    for h, p, s_ in reqs:
        if rng.random() < 0.5:  # reuse one object for equal prefixes
            pre = shared.setdefault(tuple(p), _as_form(p, int(rng.integers(0, 6)), rng))
        else:
            pre = _as_form(p, int(rng.integers(0, 6)), rng)
        mixed.append((np.int64(h) if rng.random() < 0.2 else h, pre, _as_form(s_, int(rng.integers(0, 6)), rng)))
    cpp, py = both(cfg["token_budget"], cfg["max_rows"], cfg["mode"], cfg["share_prefix"], order=cfg["order"])
    ref = py.plan(reqs)
    assert_same(cpp.plan(mixed), ref)
    assert_same(py.plan(mixed), ref)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("gap", [0, 3])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_plan_flat_matches_plan(seed, dtype, gap, share_prefix):
    """plan_flat on int32/int64 buffers (with unused tokens around them) == plan on the same requests."""
    rng = np.random.default_rng(seed)
    reqs = random_requests(rng, 777, vocab=30, max_prefix=20, max_suffix=40, n_prefixes=7, n_heads=4)
    for mode in MODES:
        cpp, py = both(int(rng.integers(60, 300)), int(rng.integers(2, 12)), mode, share_prefix)
        f = flat(reqs, dtype, gap)
        a = cpp.plan_flat(*f)
        assert_same(a, cpp.plan(reqs))
        assert_same(a, py.plan_flat(*f))
        cfg = dict(
            token_budget=cpp.config.token_budget,
            max_rows=cpp.config.max_rows,
            mode=mode,
            share_prefix=share_prefix,
            order="length",
        )
        check_plan(a, reqs, cfg)
    # array-likes and any integer offsets dtype are accepted
    head, pt, po, st_, so = flat(reqs[:20], dtype)
    assert_same(
        Scheduler(100, 4).plan_flat(head.tolist(), pt, po.astype(np.int32), st_.tolist(), so),
        Scheduler(100, 4).plan(reqs[:20]),
    )


def test_large_token_ids_on_every_path(seed):
    """Ids past one CPython digit (2**30), past int32 (lists then take the int64 path) and up to 2**63 - 1."""
    rng = np.random.default_rng(seed)
    big = [2**30 + 1, 2**31 - 1, 2**31, 2**40 + 7, 2**63 - 1]
    pool = [[int(x) for x in rng.choice(big + [0, 5], int(rng.integers(1, 6)))] for _ in range(6)]
    reqs = [(int(rng.integers(0, 2)), pool[int(rng.integers(0, 6))], pool[int(rng.integers(0, 6))]) for _ in range(120)]
    forms = [(h, tuple(p), np.asarray(s_, dtype=np.uint64)) for h, p, s_ in reqs]
    cpp, py = both(40, 4, "packed", True)
    ref = py.plan(reqs)
    for r in (reqs, forms):
        assert_same(cpp.plan(r), ref)
    assert_same(cpp.plan_flat(*flat(reqs, np.int64)), ref)
    check_plan(ref, reqs, dict(token_budget=40, max_rows=4, mode="packed", share_prefix=True, order="length"))


def test_shared_prefix_objects_plan_like_copies(seed):
    """One prefix object for many requests (hashed once) plans exactly like equal copies."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 1000, int(rng.integers(1, 50))) for _ in range(13)]
    reqs = [
        (int(rng.integers(0, 3)), prompts[int(rng.integers(0, 13))], rng.integers(0, 1000, int(rng.integers(1, 30))))
        for _ in range(2000)
    ]
    copies = [(h, p.copy(), s_.astype(np.int32)) for h, p, s_ in reqs]
    s = Scheduler(512, 16, "packed", True)
    assert_same(s.plan(reqs), s.plan(copies))
    assert_same(s.plan(reqs), Scheduler(512, 16, "packed", True, backend="python").plan(reqs))


def test_token_input_forms_agree(seed):
    import torch

    rng = np.random.default_rng(seed)
    reqs = random_requests(rng, 60, vocab=9)
    s = Scheduler(40, 3)
    base = s.plan(reqs)
    dtypes = (np.int32, np.int64, np.uint16, np.uint64)
    as_arrays = [
        (np.int64(h), np.asarray(p, dtype=dtypes[i % 4]), np.asarray(s_, dtype=dtypes[(i + 1) % 4]))
        for i, (h, p, s_) in enumerate(reqs)
    ]
    assert_same(s.plan(as_arrays), base)
    assert_same(s.plan([(h, tuple(p), torch.tensor(s_, dtype=torch.int64)) for h, p, s_ in reqs]), base)
    assert_same(s.plan(iter(reqs)), base)  # any iterable
    assert_same(s.plan(reqs), base)  # deterministic


@pytest.mark.parametrize("backend", ["cpp", "python"])
@pytest.mark.parametrize("mode", MODES)
def test_empty_plan(backend, mode):
    s = Scheduler(100, 4, mode, True, backend=backend)
    empty_flat = (
        np.zeros(0, np.int64),
        np.zeros(0, np.int32),
        np.zeros(1, np.int64),
        np.zeros(0, np.int32),
        np.zeros(1, np.int64),
    )
    for plan in (
        s.plan([]),
        s.plan(()),
        s.plan_arrays([], [], []),
        s.plan_flat(*empty_flat),
        s.plan_flat([], [], [0], [], [0]),
    ):
        assert plan.n_requests == 0 and len(plan) == 0 and plan.batches == [] and plan.prefix_groups == []
        assert plan.dedup.shape == (0,) and plan.dedup.dtype == np.int64
        assert plan.scatter(np.zeros(0)).shape == (0,)
        assert plan.padding_waste == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_oversized_requests_get_their_own_flagged_batch(mode):
    reqs = [(0, [1] * 3, [2] * 4), (1, [5] * 20, [6] * 30), (0, [], [7] * 2), (2, [5] * 20, [6] * 30)]
    plan = plan_both(reqs, 10, 8, mode)
    over = [b for b in plan.batches if b.oversized]
    assert [b.rows.tolist() for b in over] == [[1], [3]]
    assert all(b.tokens == 50 and b.max_len == 50 for b in over)
    normal = [b for b in plan.batches if not b.oversized]
    assert sorted(r for b in normal for r in b.rows.tolist()) == [0, 2]
    # a lone huge request
    plan = plan_both([(0, [], list(range(1000)))], 1, 1, mode)
    assert len(plan) == 1 and plan.batches[0].oversized and plan.batches[0].tokens == 1000


def test_shared_prefix_longer_than_budget():
    reqs = [(h, [9] * 30, [h + 1] * (h + 1)) for h in range(4)]
    cfg = dict(token_budget=20, max_rows=4, mode="padded", share_prefix=True, order="length")
    plan = plan_both(reqs, 20, 4, "padded", True)
    check_plan(plan, reqs, cfg)
    assert len(plan) == 4 and all(b.oversized and b.prefix_group == 0 and b.prefix_len == 30 for b in plan.batches)


def test_shared_prefix_counts_once_and_suffixes_only():
    reqs = [(0, [1, 2, 3, 4], [5]), (1, [1, 2, 3, 4], [6, 7]), (2, [1, 2, 3, 4], []), (0, [8], [9, 9, 9])]
    plan = plan_both(reqs, 10, 8, "padded", True)
    shared = [b for b in plan.batches if b.prefix_group >= 0]
    assert len(shared) == 1
    b = shared[0]
    assert b.rows.tolist() == [1, 0, 2] and b.lengths.tolist() == [2, 1, 0]  # an empty suffix is a row
    assert b.prefix_len == 4 and b.tokens == 4 + 3 * 2
    plan = plan_both(reqs, 10, 8, "packed", True)
    b = next(b for b in plan.batches if b.prefix_group >= 0)
    assert b.tokens == 4 + 3 and b.cu_seqlens.tolist() == [0, 2, 3, 3]


def test_dedup_needs_head_prefix_and_suffix_equal():
    reqs = [(0, [1, 2], [3]), (0, [1], [2, 3]), (1, [1, 2], [3]), (0, [1, 2], [3]), (0, [1, 2], [3, 0])]
    plan = plan_both(reqs, 100, 8)
    assert plan.dedup.tolist() == [0, 1, 2, 0, 4]
    assert [g.members.tolist() for g in plan.prefix_groups] == [[0, 2, 4]]  # dup 3 is not a member
    assert plan.prefix_group.tolist() == [0, -1, 0, 0, 0]


def test_sorting_cuts_padding_vs_arrival_order(seed):
    rng = np.random.default_rng(seed)
    n = 4000
    lens = np.maximum(1, np.rint(np.exp(rng.normal(np.log(300), 0.6, n)))).astype(np.int64)
    head = rng.integers(0, 8, n)
    zeros = np.zeros(n, dtype=np.int64)
    by_len = Scheduler(16384, 64).plan_arrays(head, zeros, lens)
    arrival = Scheduler(16384, 64, order="arrival").plan_arrays(head, zeros, lens)
    assert by_len.padding_waste < 0.05 < 0.4 < arrival.padding_waste
    assert len(by_len) < len(arrival)


def test_plan_views_match_columns(seed):
    rng = np.random.default_rng(seed)
    reqs = random_requests(rng, 200, vocab=4, max_prefix=5, max_suffix=9)
    plan = Scheduler(30, 5, "packed", True).plan(reqs)
    assert len(plan) == len(plan.batches) == len(list(plan))
    assert np.array_equal(np.concatenate([b.rows for b in plan.batches]), plan.rows)
    assert sum(len(g.members) for g in plan.prefix_groups) == len(plan.group_members)
    assert "Plan(requests=200" in repr(plan)
    import torch

    scores = torch.arange(len(plan.rows), dtype=torch.float32)  # (R,)
    out = plan.scatter(scores)
    assert isinstance(out, torch.Tensor) and out.shape == (200,)
    assert torch.equal(out, torch.from_numpy(plan.request_row).float())


def test_planning_from_threads_is_consistent(seed):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    n = 50_000
    args = (
        rng.integers(0, 4, n),
        rng.integers(0, 100, n),
        rng.integers(1, 400, n),
        rng.integers(0, 50, n).astype(np.uint64),
        rng.integers(0, 5000, n).astype(np.uint64),
    )
    s = Scheduler(4096, 32, "packed", True)
    ref = s.plan_arrays(*args)
    with ThreadPoolExecutor(3) as ex:
        for plan in ex.map(lambda _: s.plan_arrays(*args), range(3)):
            assert_same(plan, ref)
    # the token forms too (their buffers are read in place while the GIL is released)
    reqs = random_requests(rng, 3000, vocab=20, max_prefix=30, max_suffix=60, n_prefixes=10)
    reqs = [(h, np.asarray(p, dtype=np.int64), np.asarray(s_, dtype=np.int32)) for h, p, s_ in reqs]
    f = flat(reqs)
    ref = s.plan(reqs)
    with ThreadPoolExecutor(3) as ex:
        for plan in ex.map(lambda k: s.plan(reqs) if k % 2 else s.plan_flat(*f), range(4)):
            assert_same(plan, ref)


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(token_budget=-1, max_rows=4), ValueError, "token_budget"),
        (dict(token_budget=0, max_rows=4), ValueError, "token_budget"),
        (dict(token_budget=2**31, max_rows=4), ValueError, "token_budget"),
        (dict(token_budget=10.0, max_rows=4), TypeError, "token_budget"),
        (dict(token_budget=True, max_rows=4), TypeError, "token_budget"),
        (dict(token_budget=10, max_rows=0), ValueError, "max_rows"),
        (dict(token_budget=10, max_rows=-3), ValueError, "max_rows"),
        (dict(token_budget=10, max_rows="4"), TypeError, "max_rows"),
        (dict(token_budget=10, max_rows=4, mode="ragged"), ValueError, "mode"),
        (dict(token_budget=10, max_rows=4, share_prefix="yes"), TypeError, "share_prefix"),
        (dict(token_budget=10, max_rows=4, order="random"), ValueError, "order"),
        (dict(token_budget=10, max_rows=4, backend="rust"), ValueError, "backend"),
    ],
)
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Scheduler(**kwargs)


@pytest.mark.parametrize(
    "reqs, exc, match",
    [
        ("abc", TypeError, "requests"),
        (5, TypeError, "requests"),
        ([(0, [1], [2]), 7], TypeError, r"requests\[1\]"),
        ([(0, [1])], ValueError, r"requests\[0\]: expected 3 items"),
        ([(-1, [1], [2])], ValueError, r"requests\[0\]: head_id"),
        ([(1.0, [1], [2])], TypeError, r"requests\[0\]: head_id"),
        ([(True, [1], [2])], TypeError, r"requests\[0\]: head_id"),
        ([(0, [1], [2]), (0, [1.5], [2])], TypeError, r"requests\[1\] prefix_ids: token ids must be integers"),
        ([(0, [1], ["a"])], TypeError, r"requests\[0\] suffix_ids"),
        ([(0, [1], [True])], TypeError, r"requests\[0\] suffix_ids"),
        ([(0, [1], np.ones(3))], TypeError, r"requests\[0\] suffix_ids"),
        ([(0, [[1, 2]], [3])], ValueError, r"requests\[0\] prefix_ids: expected a 1-D"),
        ([(0, 5, [3])], TypeError, r"requests\[0\] prefix_ids"),
        ([(0, "ab", [3])], TypeError, r"requests\[0\] prefix_ids"),
        ([(0, [1], [2]), (0, [1], [2, -3])], ValueError, r"requests\[1\] suffix_ids: token ids must be >= 0"),
        ([(0, [1], [2]), (0, [3], [2]), (0, [-4], [2])], ValueError, r"requests\[2\] prefix_ids"),
        ([(0, np.array([2**63], dtype=np.uint64), [2])], ValueError, r"requests\[0\] prefix_ids"),
        ([(0, [1], [2]), (0, [], [])], ValueError, "request 1 has no tokens"),
        ([(0, [1, -2, 1.5], [2])], TypeError, r"requests\[0\] prefix_ids: token ids must be integers"),
        ([(0, [1], [2**64])], TypeError, r"requests\[0\] suffix_ids: token ids must be integers"),
        ([(0, [1], [2**63])], ValueError, r"requests\[0\] suffix_ids: token ids above"),
        (
            [(0, [1], np.array([3, -1], dtype=np.int32))],
            ValueError,
            r"requests\[0\] suffix_ids: token ids must be >= 0",
        ),
        ([(0, [1], np.array([3, 0, -1, 5])[::2])], ValueError, r"requests\[0\] suffix_ids: token ids must be >= 0"),
        ([(0, [np.int64(-1)], [1])], ValueError, r"requests\[0\] prefix_ids: token ids must be >= 0"),
        ([(2**63, [1], [2])], ValueError, r"requests\[0\]: head_id must be at most"),
        ([(0, [1], [2]), (np.int64(-5), [1], [2])], ValueError, r"requests\[1\]: head_id must be >= 0"),
        ([[0, [1], [2]], [0, [1], [2], 3]], ValueError, r"requests\[1\]: expected 3 items"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_bad_requests(reqs, exc, match, backend):
    with pytest.raises(exc, match=match):
        Scheduler(10, 2, backend=backend).plan(reqs)


def _cols(n=4):
    return np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64), np.ones(n, dtype=np.int64)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((np.zeros(4), *_cols()[1:]), TypeError, "head_ids"),
        ((np.zeros((2, 2), dtype=np.int64), *_cols()[1:]), ValueError, "head_ids"),
        ((np.array([0, -1, 0, 0]), *_cols()[1:]), ValueError, "head_ids: must be >= 0, got -1 at request 1"),
        ((*_cols()[:1], np.ones(3, dtype=np.int64), _cols()[2]), ValueError, "prefix_lens: expected length 4"),
        ((*_cols()[:2], np.ones(4)), TypeError, "suffix_lens"),
        ((*_cols()[:2], np.array([1, 1, -2, 1])), ValueError, "suffix_lens: must be >= 0"),
        ((_cols()[0], np.zeros(4, np.int64), np.array([1, 0, 1, 1])), ValueError, "request 1 has no tokens"),
        ((*_cols(), np.zeros(4)), TypeError, "prefix_hashes"),
        ((*_cols(), np.zeros(3, np.uint64)), ValueError, "prefix_hashes"),
        ((*_cols(), None, np.zeros(4, np.uint64)), ValueError, "suffix_hashes: needs prefix_hashes"),
        ((*_cols(), np.zeros(4, np.uint64), np.zeros((4, 1), np.uint64)), ValueError, "suffix_hashes"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_bad_arrays(args, exc, match, backend):
    with pytest.raises(exc, match=match):
        Scheduler(10, 2, backend=backend).plan_arrays(*args)


def _flat4():
    """A valid flat form of 4 requests: head ids, then (tokens, offsets) per side."""
    return (
        np.zeros(4, np.int64),
        np.arange(6, dtype=np.int32),
        np.array([0, 1, 3, 3, 6]),
        np.arange(4, dtype=np.int32),
        np.array([0, 1, 2, 3, 4]),
    )


def _with(i, v):
    args = list(_flat4())
    args[i] = v
    return tuple(args)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (_with(0, np.zeros(4)), TypeError, "head_ids: expected integers"),
        (_with(0, np.zeros((2, 2), np.int64)), ValueError, "head_ids: expected a 1-D"),
        (_with(0, np.array([0, 0, -1, 0])), ValueError, "head_ids: must be >= 0, got -1 at request 2"),
        (_with(0, np.zeros(3, np.int64)), ValueError, r"prefix_offsets: expected shape \(4,\) \(one more than the 3"),
        (_with(1, np.arange(6, dtype=np.float32)), TypeError, "prefix_tokens: expected int32 or int64"),
        (_with(3, np.arange(4, dtype=np.uint16)), TypeError, "suffix_tokens: expected int32 or int64"),
        (_with(1, np.arange(6, dtype=np.int32).reshape(2, 3)), ValueError, "prefix_tokens: expected a 1-D"),
        (_with(2, np.array([0, 1, 3, 3])), ValueError, r"prefix_offsets: expected shape \(5,\)"),
        (_with(2, np.array([0.0, 1, 3, 3, 6])), TypeError, "prefix_offsets: expected integer offsets"),
        (_with(2, np.array([[0, 1, 3, 3, 6]])), ValueError, "prefix_offsets: expected shape"),
        (_with(2, np.array([0, 3, 1, 3, 6])), ValueError, "prefix_offsets: must not decrease, got 3 then 1 at index 2"),
        (_with(4, np.array([-1, 1, 2, 3, 4])), ValueError, "suffix_offsets: must be >= 0"),
        (
            _with(2, np.array([0, 1, 3, 3, 7])),
            ValueError,
            r"prefix_offsets: ends at 7, past the end of prefix_tokens \(6",
        ),
        (
            _with(3, np.array([0, 1, -2, 3], np.int32)),
            ValueError,
            r"suffix_tokens: token ids must be >= 0, got -2 at position 2 \(request 2\)",
        ),
        (_with(4, np.array([0, 1, 2, 2, 4])), ValueError, "request 2 has no tokens"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_bad_flat(args, exc, match, backend):
    with pytest.raises(exc, match=match):
        Scheduler(10, 2, backend=backend).plan_flat(*args)


def test_flat_ignores_tokens_outside_the_offsets():
    """Tokens before the first offset or after the last are not the requests': never read, never checked."""
    head, pt, po, st_, so = _flat4()
    pt2 = np.concatenate([[-7, -7], pt, [-7]]).astype(np.int32)
    assert_same(Scheduler(10, 2).plan_flat(head, pt2, po + 2, st_, so), Scheduler(10, 2).plan_flat(*_flat4()))


def test_request_list_changed_by_a_checker_callback():
    """An item whose __array__ clears the request list (the C++ ingest calls back into Python for such
    items): a clear error, never a read of freed objects."""

    class Clears:
        def __init__(self, reqs):
            self.reqs = reqs

        def __array__(self, dtype=None, copy=None):
            self.reqs.clear()
            return np.array([1, 2])

    reqs = [(0, [1], [2])]
    reqs += [(0, Clears(reqs), [3]), (1, [5], np.array([6, 7]))]
    with pytest.raises(ValueError, match="requests: changed while being read"):
        Scheduler(10, 2).plan(reqs)


def test_bad_scatter_and_hash_inputs():
    plan = Scheduler(10, 2).plan([(0, [1], [2]), (0, [1], [2]), (1, [], [3])])
    with pytest.raises(ValueError, match="row_scores: expected 2 rows"):
        plan.scatter(np.zeros(3))
    with pytest.raises(ValueError, match="offsets"):
        hash_token_arrays(np.arange(5), np.array([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="offsets"):
        hash_token_arrays(np.arange(5), np.array([0, 3]))
    with pytest.raises(TypeError, match="tokens"):
        hash_token_arrays(np.ones(5), np.array([0, 5]))
    with pytest.raises(TypeError, match=r"sequences\[1\]"):
        hash_tokens([[1], [0.5]])


def test_native_binding_rechecks_buffers():
    """The binding itself refuses inconsistent buffers (the Python layer never sends them)."""
    from optimas_fast._native import native

    C = native()
    h = np.zeros(2, np.int64)
    ln = np.ones(2, np.int64)
    tok = np.arange(2, dtype=np.int32)
    good_off = np.array([0, 1, 2], np.int64)
    kw = dict(token_budget=10, max_rows=2, packed=False, share_prefix=False, by_length=True)
    mask = dict(hash_mask=2**64 - 1)
    with pytest.raises(ValueError, match="prefix_offsets"):
        C.sched_plan_flat(h, tok, np.array([0, 1, 5], np.int64), tok, good_off, **kw, **mask)
    with pytest.raises(ValueError, match="suffix_offsets"):
        C.sched_plan_flat(h, tok, good_off, tok, np.array([0, 2, 1], np.int64), **kw, **mask)
    with pytest.raises(ValueError, match="prefix_offsets"):
        C.sched_plan_flat(h, tok, good_off[:2], tok, good_off, **kw, **mask)
    with pytest.raises(TypeError, match="prefix_tokens"):
        C.sched_plan_flat(h, tok.astype(np.float32), good_off, tok, good_off, **kw, **mask)
    with pytest.raises(ValueError, match="token_budget"):
        C.sched_plan(h, ln, ln, None, None, **{**kw, "token_budget": 0})
    with pytest.raises(TypeError, match="head_ids"):
        C.sched_plan(h.astype(np.int32), ln, ln, None, None, **kw)
    with pytest.raises(ValueError, match="prefix_lens"):
        C.sched_plan(h, ln[:1], ln, None, None, **kw)
    with pytest.raises(ValueError, match="requests: expected a list"):
        C.sched_plan_requests(iter([]), None, None, **kw, **mask)
