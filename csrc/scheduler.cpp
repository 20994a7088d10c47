// Token-budget planner (see scheduler.h for the contract, optimas_fast/scheduler_reference.py for the
// exact algorithm, which the pure-Python twin there implements line for line).
#include "scheduler.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <cstring>
#include <memory>
#include <string>

#include "checks.h"

namespace optimas {
namespace py = pybind11;

namespace {

// Keys ahead that a hash-table probe is prefetched (enough to cover a DRAM miss at a few ns/key).
constexpr int64_t kPrefetch = 16;
constexpr uint64_t kK0 = 0x243F6A8885A308D3ull, kK1 = 0x9E3779B97F4A7C15ull, kK2 = 0x87C37B91114253D5ull,
                   kK3 = 0x4CF5AD432745937Full;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// MurmurHash3's finaliser: every input bit reaches every output bit.
inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

inline uint64_t lane(uint64_t h, uint64_t t) { return rotl(h ^ (t * kK2), 31) * kK3; }

// Four independent lanes (token k feeds lane k % 4): one lane is a chain of two dependent multiplies
// per token (1.3 ns/token measured on this EPYC), four lanes overlap them (~0.45 ns/token).
template <typename T>
uint64_t hash_seq(const T* t, int64_t n) {
  const uint64_t seed = kK0 ^ (static_cast<uint64_t>(n) * kK1);
  uint64_t a = seed, b = seed + kK1, c = seed + 2 * kK1, d = seed + 3 * kK1;
  auto v = [t](int64_t k) { return static_cast<uint64_t>(static_cast<int64_t>(t[k])); };
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    a = lane(a, v(k));
    b = lane(b, v(k + 1));
    c = lane(c, v(k + 2));
    d = lane(d, v(k + 3));
  }
  if (k < n) a = lane(a, v(k));
  if (k + 1 < n) b = lane(b, v(k + 1));
  if (k + 2 < n) c = lane(c, v(k + 2));
  return fmix64(a ^ rotl(b, 16) ^ rotl(c, 32) ^ rotl(d, 48));
}

// Open-addressing table of request indices (linear probing, power-of-two size, load <= 1/2). Each
// 8-byte slot keeps 32 bits of the key hash next to the index, so most probes settle without
// touching the requests; `eq(j)` confirms every tag match. Insertion happens in index order, so the
// entry found for a key is always its first occurrence, whatever the table layout: the result is
// order-determined. (Indices fit 32 bits: the bindings cap n below 2**31.)
class FirstSeen {
 public:
  explicit FirstSeen(int64_t n) {
    size_t cap = 16;
    while (cap < static_cast<size_t>(2 * n)) cap <<= 1;
    slots_.assign(cap, Slot{0, -1});
    mask_ = cap - 1;
  }
  // Pulls a key's first slot into cache ahead of use: probes are random reads, and issuing them a
  // few keys early overlaps the cache misses (dedup of 1M requests: ~70 ms -> ~25 ms).
  void clear() { std::fill(slots_.begin(), slots_.end(), Slot{0, -1}); }
  void prefetch(uint64_t h) const { __builtin_prefetch(&slots_[h & mask_]); }
  template <typename Eq>
  int64_t find_or_insert(uint64_t h, int64_t i, Eq&& eq) {
    const uint32_t tag = static_cast<uint32_t>(h >> 32);
    for (size_t p = h & mask_;; p = (p + 1) & mask_) {
      Slot& s = slots_[p];
      if (s.idx < 0) {
        s = Slot{tag, static_cast<int32_t>(i)};
        return i;
      }
      if (s.tag == tag && eq(s.idx)) return s.idx;
    }
  }

 private:
  struct Slot {
    uint32_t tag;
    int32_t idx;
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

template <typename A, typename B>
inline bool equal_values(const A* a, const B* b, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (static_cast<int64_t>(a[k]) != static_cast<int64_t>(b[k])) return false;
  return true;
}

// Token-by-token equality of sequences a and b of one table (int32 and int64 views may be mixed).
bool same_seq(const SeqTable& t, int64_t a, int64_t b) {
  const int64_t n = t.len(a);
  if (n != t.len(b)) return false;
  const void *pa = t.ptr(a), *pb = t.ptr(b);
  const bool wa = t.wide(a), wb = t.wide(b);
  if (pa == pb && wa == wb) return true;
  switch (wa * 2 + wb) {
    case 0: return std::memcmp(pa, pb, n * sizeof(int32_t)) == 0;
    case 3: return std::memcmp(pa, pb, n * sizeof(int64_t)) == 0;
    case 1: return equal_values(static_cast<const int32_t*>(pa), static_cast<const int64_t*>(pb), n);
    default: return equal_values(static_cast<const int64_t*>(pa), static_cast<const int32_t*>(pb), n);
  }
}

inline uint64_t seq_hash(const SeqTable& t, int64_t s) {
  return t.wide(s) ? hash_seq(static_cast<const int64_t*>(t.ptr(s)), t.len(s))
                   : hash_seq(static_cast<const int32_t*>(t.ptr(s)), t.len(s));
}

// A cheap look at a sequence (length, first, middle and last token) to find an earlier equal one.
inline uint64_t fingerprint(const SeqTable& t, int64_t s) {
  const int64_t n = t.len(s);
  if (n == 0) return 0;
  const void* p = t.ptr(s);
  const bool w = t.wide(s);
  auto v = [&](int64_t k) {
    return w ? static_cast<uint64_t>(static_cast<const int64_t*>(p)[k])
             : static_cast<uint64_t>(static_cast<const int32_t*>(p)[k]);
  };
  return fmix64(static_cast<uint64_t>(n) * kK1 ^ v(0) ^ rotl(v(n / 2), 21) ^ rotl(v(n - 1), 42));
}

// Content hash (masked: tests force collisions) and a canonical id of every sequence of a table: equal
// canonical ids mean equal tokens. Flat buffers repeat each prefix once per request; a direct-mapped
// cache of recent sequences, keyed by the fingerprint and confirmed with memcmp, finds the copy seen
// before, so each distinct prefix is hashed about once (memcmp runs ~10x faster than the hash).
void hash_table(const SeqTable& t, uint64_t mask, std::vector<uint64_t>& h, std::vector<int64_t>& canon) {
  const int64_t S = t.size();
  h.resize(S);
  canon.resize(S);
  constexpr int kBits = 14;  // 16k slots x 16 bytes: stays in L2 next to the tokens being hashed
  struct Slot {
    uint64_t fp;  // the full fingerprint: most different sequences in one slot differ here, no memcmp
    int64_t seq;
  };
  std::vector<Slot> cache(size_t(1) << kBits, Slot{0, -1});
  for (int64_t s = 0; s < S; ++s) {
    const uint64_t fp = fingerprint(t, s);
    Slot& slot = cache[fp >> (64 - kBits)];
    if (slot.seq >= 0 && slot.fp == fp && same_seq(t, slot.seq, s)) {
      h[s] = h[slot.seq];
      canon[s] = canon[slot.seq];
      continue;
    }
    h[s] = seq_hash(t, s) & mask;
    canon[s] = s;
    slot = Slot{fp, s};
  }
}

// A representative to place: its request index, the tokens it brings and its pool. Kept together
// so that the greedy pass reads sorted rows sequentially instead of chasing indices.
struct Unit {
  int64_t idx, len, pool;
};

// Stable counting sort of `units` by an integer key in [0, kmax] (O(n + kmax)).
template <typename Key>
void counting_sort(std::vector<Unit>& units, int64_t kmax, Key&& key) {
  std::vector<int64_t> start(kmax + 2, 0);
  for (const Unit& u : units) ++start[key(u) + 1];
  for (int64_t k = 1; k <= kmax + 1; ++k) start[k] += start[k - 1];
  std::vector<Unit> out(units.size());
  for (const Unit& u : units) out[start[key(u)]++] = u;
  units.swap(out);
}

// Stable order by length, longest first (ties keep index order). Counting sort when the length range
// is small (token lengths nearly always are), a comparison sort otherwise.
void sort_longest_first(std::vector<Unit>& units) {
  if (units.size() < 2) return;
  int64_t kmax = 0;
  for (const Unit& u : units) kmax = std::max(kmax, u.len);
  if (kmax > 4 * static_cast<int64_t>(units.size()) + 65536) {
    std::stable_sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.len > b.len; });
    return;
  }
  counting_sort(units, kmax, [kmax](const Unit& u) { return kmax - u.len; });
}

}  // namespace

uint64_t hash_token_seq(const int64_t* t, int64_t n) { return hash_seq(t, n); }
uint64_t hash_token_seq(const int32_t* t, int64_t n) { return hash_seq(t, n); }

PlanOutput plan(const PlanInput& in, const PlanConfig& cfg) {
  const int64_t n = in.n;
  const bool tokens = in.pseq != nullptr;  // token path: contents confirm every hash match
  const bool dedup_on = tokens || (in.phash != nullptr && in.shash != nullptr);
  const bool group_on = tokens || in.phash != nullptr;
  PlanOutput out;

  // ---- 1. content hashes (tests mask token hashes to force collisions; caller hashes are the
  //         identity of a sequence, nothing confirms them, so they are never masked) ----
  std::vector<uint64_t> ph(group_on ? n : 0), sh(dedup_on ? n : 0);
  std::vector<int64_t> pc(tokens ? n : 0), sc(tokens ? n : 0);  // canonical sequence ids (token path)
  if (tokens) {
    // Per request: its sequence's hash and canonical id (the table's own arrays when request i is
    // sequence i, as in the flat form: no copy, less fresh memory to fault in).
    auto per_request = [n](const SeqTable& t, uint64_t mask, std::vector<uint64_t>& hr, std::vector<int64_t>& cr) {
      std::vector<uint64_t> h;
      std::vector<int64_t> canon;
      hash_table(t, mask, h, canon);
      if (t.of.empty()) {
        hr.swap(h);
        cr.swap(canon);
        return;
      }
      for (int64_t i = 0; i < n; ++i) {
        hr[i] = h[t.of[i]];
        cr[i] = canon[t.of[i]];
      }
    };
    per_request(*in.pseq, in.hash_mask, ph, pc);
    per_request(*in.sseq, in.hash_mask, sh, sc);
  } else {
    for (int64_t i = 0; i < n && group_on; ++i) ph[i] = in.phash[i];
    for (int64_t i = 0; i < n && dedup_on; ++i) sh[i] = in.shash[i];
  }
  auto same_prefix = [&](int64_t i, int64_t j) {
    return pc[i] == pc[j] || same_seq(*in.pseq, in.pseq->seq(i), in.pseq->seq(j));
  };
  auto same_suffix = [&](int64_t i, int64_t j) {
    return sc[i] == sc[j] || same_seq(*in.sseq, in.sseq->seq(i), in.sseq->seq(j));
  };

  // ---- 2. de-duplication: the first identical request represents ----
  out.dedup.resize(n);
  std::vector<uint64_t> key(dedup_on || group_on ? n : 0);  // probe keys, reused by steps 2 and 3
  FirstSeen seen(dedup_on || group_on ? n : 0);
  if (dedup_on) {
    for (int64_t i = 0; i < n; ++i)
      key[i] = fmix64(ph[i] ^ rotl(sh[i], 21) ^ (static_cast<uint64_t>(in.head[i]) * kK1) ^
                      rotl(static_cast<uint64_t>(in.plen[i]) * 0xC2B2AE3D27D4EB4Full, 43) ^
                      static_cast<uint64_t>(in.slen[i]));
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetch < n) seen.prefetch(key[i + kPrefetch]);
      out.dedup[i] = seen.find_or_insert(key[i], i, [&](int64_t j) {
        if (in.head[j] != in.head[i] || in.plen[j] != in.plen[i] || in.slen[j] != in.slen[i] || ph[j] != ph[i] ||
            sh[j] != sh[i])
          return false;
        return !tokens || (same_prefix(i, j) && same_suffix(i, j));
      });
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out.dedup[i] = i;
  }

  // ---- 3. prefix groups: representatives with one non-empty prefix, groups of >= 2 only ----
  std::vector<int64_t> first(n, -1), count(n, 0);  // first rep with the same prefix; members per first
  if (group_on) {
    for (int64_t i = 0; i < n; ++i) key[i] = fmix64(ph[i] ^ (static_cast<uint64_t>(in.plen[i]) * kK1));
    if (dedup_on) seen.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetch < n) seen.prefetch(key[i + kPrefetch]);
      if (out.dedup[i] != i || in.plen[i] == 0) continue;
      first[i] = seen.find_or_insert(key[i], i, [&](int64_t j) {
        return in.plen[j] == in.plen[i] && ph[j] == ph[i] && (!tokens || same_prefix(i, j));
      });
      ++count[first[i]];
    }
  }
  std::vector<int64_t> gid(n, -1);  // group id, kept at each group's first member
  int64_t G = 0;
  for (int64_t i = 0; i < n; ++i)
    if (first[i] == i && count[i] >= 2) gid[i] = G++;
  out.prefix_group.resize(n);
  out.group_offsets.assign(G + 1, 0);
  out.group_prefix_len.resize(G);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = out.dedup[i];
    const int64_t g = first[r] >= 0 ? gid[first[r]] : -1;
    out.prefix_group[i] = g;
    if (g >= 0 && r == i) ++out.group_offsets[g + 1];
    if (g >= 0 && first[r] == i) out.group_prefix_len[g] = in.plen[i];
  }
  for (int64_t g = 0; g < G; ++g) out.group_offsets[g + 1] += out.group_offsets[g];
  out.group_members.resize(out.group_offsets[G]);
  {
    std::vector<int64_t> fill(out.group_offsets.begin(), out.group_offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i)
      if (out.dedup[i] == i && out.prefix_group[i] >= 0) out.group_members[fill[out.prefix_group[i]]++] = i;
  }

  // ---- 4. order: pools (shared groups by id, then everything else), longest row first ----
  // A row brings its whole sequence, or only its suffix when it sits in a shared-prefix batch.
  const bool share = cfg.share_prefix && G > 0;
  std::vector<Unit> units;
  units.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (out.dedup[i] != i) continue;
    const int64_t g = out.prefix_group[i];
    const bool shared = share && g >= 0;
    units.push_back(Unit{i, shared ? in.slen[i] : in.plen[i] + in.slen[i], share ? (shared ? g : G) : 0});
  }
  if (cfg.by_length) sort_longest_first(units);
  if (share) counting_sort(units, G, [](const Unit& u) { return u.pool; });

  // ---- 5. greedy next-fit under the budget and the row cap ----
  const int64_t B = cfg.token_budget;
  out.rows.reserve(units.size());
  out.row_lengths.reserve(units.size());
  out.batch_offsets.push_back(0);
  int64_t cur_rows = 0, cur_max = 0, cur_sum = 0, cur_pool = -1;
  auto emit = [&](int64_t group, int64_t P, int64_t maxlen, int64_t tok, bool over) {
    out.batch_offsets.push_back(static_cast<int64_t>(out.rows.size()));
    out.batch_max_len.push_back(maxlen);
    out.batch_prefix_group.push_back(group);
    out.batch_prefix_len.push_back(P);
    out.batch_tokens.push_back(tok);
    out.batch_oversized.push_back(over ? 1 : 0);
  };
  auto pool_group = [&](int64_t p) { return (share && p < G) ? p : int64_t(-1); };
  auto pool_prefix = [&](int64_t p) { return (share && p < G) ? out.group_prefix_len[p] : int64_t(0); };
  auto flush = [&]() {
    if (cur_rows == 0) return;
    const int64_t P = pool_prefix(cur_pool);
    emit(pool_group(cur_pool), P, cur_max, cfg.packed ? P + cur_sum : P + cur_rows * cur_max, false);
    cur_rows = cur_max = cur_sum = 0;
  };
  for (const Unit& u : units) {
    if (u.pool != cur_pool) {
      flush();
      cur_pool = u.pool;
    }
    const int64_t L = u.len, P = pool_prefix(u.pool);
    if (P + L > B) {  // cannot fit even alone: its own batch, flagged
      flush();
      out.rows.push_back(u.idx);
      out.row_lengths.push_back(L);
      emit(pool_group(u.pool), P, L, P + L, true);
      continue;
    }
    const int64_t new_max = std::max(cur_max, L), new_sum = cur_sum + L;
    const int64_t cost = cfg.packed ? P + new_sum : P + (cur_rows + 1) * new_max;
    if (cur_rows > 0 && (cur_rows + 1 > cfg.max_rows || cost > B)) flush();
    out.rows.push_back(u.idx);
    out.row_lengths.push_back(L);
    ++cur_rows;
    cur_max = std::max(cur_max, L);
    cur_sum += L;
  }
  flush();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Bindings. The Python layer (optimas_fast/scheduler.py) validates the columnar arguments with
// messages for users and here we re-check only what would read outside a buffer; the request-list
// ingest below validates each request itself (it is the only pass over them), with the messages of
// the Python reference (scheduler_reference.flatten_requests), calling back into Python only for
// unusual inputs.

namespace {

constexpr int64_t kMaxRequests = (int64_t(1) << 31) - 2;  // FirstSeen keeps 32-bit indices
constexpr int64_t kInt32Max = INT32_MAX;                  // cu_seqlens are int32

// Hands a vector to numpy without copying: the array owns it through a capsule.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_it(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(owned->size()), owned->data(), free_it);
}

py::dict to_dict(PlanOutput&& out) {
  py::dict d;
  d["dedup"] = to_numpy(std::move(out.dedup));
  d["prefix_group"] = to_numpy(std::move(out.prefix_group));
  d["group_offsets"] = to_numpy(std::move(out.group_offsets));
  d["group_members"] = to_numpy(std::move(out.group_members));
  d["group_prefix_len"] = to_numpy(std::move(out.group_prefix_len));
  d["batch_offsets"] = to_numpy(std::move(out.batch_offsets));
  d["rows"] = to_numpy(std::move(out.rows));
  d["row_lengths"] = to_numpy(std::move(out.row_lengths));
  d["batch_max_len"] = to_numpy(std::move(out.batch_max_len));
  d["batch_prefix_group"] = to_numpy(std::move(out.batch_prefix_group));
  d["batch_prefix_len"] = to_numpy(std::move(out.batch_prefix_len));
  d["batch_tokens"] = to_numpy(std::move(out.batch_tokens));
  d["batch_oversized"] = to_numpy(std::move(out.batch_oversized)).attr("astype")("bool");
  return d;
}

PlanOutput run_plan(const PlanInput& in, int64_t token_budget, int64_t max_rows, bool packed, bool share_prefix,
                    bool by_length) {
  PlanConfig cfg{token_budget, max_rows, packed, share_prefix, by_length};
  py::gil_scoped_release nogil;  // pure C++ from here: other Python threads keep running
  return plan(in, cfg);
}

void check_config(int64_t token_budget, int64_t max_rows) {
  check(token_budget >= 1, "token_budget must be >= 1");
  check(max_rows >= 1, "max_rows must be >= 1");
}

const int64_t* vec_ptr(const py::array& a, const char* name, int64_t n) {
  auto info = require<int64_t>(a, name, 1);
  check(info.shape[0] == n, std::string(name) + ": expected length " + std::to_string(n) + ", got " +
                                std::to_string(info.shape[0]));
  return static_cast<const int64_t*>(info.ptr);
}

// ---- the columnar form: lengths + optional caller hashes ----
py::dict plan_arrays_py(const py::array& head_ids, const py::array& prefix_lens, const py::array& suffix_lens,
                        const py::object& prefix_hashes, const py::object& suffix_hashes, int64_t token_budget,
                        int64_t max_rows, bool packed, bool share_prefix, bool by_length) {
  check_config(token_budget, max_rows);
  PlanInput in;
  auto hi = require<int64_t>(head_ids, "head_ids", 1);
  in.n = hi.shape[0];
  check(in.n <= kMaxRequests, "head_ids: at most 2**31 - 2 requests per plan");
  in.head = static_cast<const int64_t*>(hi.ptr);
  in.plen = vec_ptr(prefix_lens, "prefix_lens", in.n);
  in.slen = vec_ptr(suffix_lens, "suffix_lens", in.n);
  for (int64_t i = 0; i < in.n; ++i) check(in.plen[i] >= 0 && in.slen[i] >= 0, "lengths must be >= 0");
  check(suffix_hashes.is_none() || !prefix_hashes.is_none(), "suffix_hashes needs prefix_hashes");
  auto hash_ptr = [&](const py::object& o, const char* name) -> const uint64_t* {
    if (o.is_none()) return nullptr;
    auto info = require<uint64_t>(o.cast<py::array>(), name, 1);
    check(info.shape[0] == in.n, std::string(name) + ": expected length " + std::to_string(in.n));
    return static_cast<const uint64_t*>(info.ptr);
  };
  in.phash = hash_ptr(prefix_hashes, "prefix_hashes");
  in.shash = hash_ptr(suffix_hashes, "suffix_hashes");
  return to_dict(run_plan(in, token_budget, max_rows, packed, share_prefix, by_length));
}

// ---- the flat form: int32/int64 tokens + int64 offsets (n+1) per side ----
// Offsets must not decrease and must stay inside the buffer; request i's tokens are
// tokens[offsets[i]:offsets[i+1]]. Fills `table` with one view per request and `lens`.
void flat_table(const py::array& tok, const py::array& off, int64_t n, const std::string& name, SeqTable& table,
                std::vector<int64_t>& lens) {
  const bool wide = py::isinstance<py::array_t<int64_t>>(tok) && tok.dtype().is(py::dtype::of<int64_t>());
  auto ti = wide ? require<int64_t>(tok, (name + "_tokens").c_str(), 1)
                 : require<int32_t>(tok, (name + "_tokens (int32 or int64)").c_str(), 1);
  const int64_t T = ti.shape[0];
  const int64_t* o = vec_ptr(off, (name + "_offsets").c_str(), n + 1);
  check(o[0] >= 0 && o[n] <= T, name + "_offsets: must stay within the " + std::to_string(T) + " tokens");
  table.flat = true;
  table.base = static_cast<const char*>(ti.ptr);
  table.off = o;
  table.nflat = n;
  table.flat_wide = wide;
  lens.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = o[i + 1] - o[i];
    if (l < 0) check(false, name + "_offsets: must not decrease");  // message built only on failure
    lens[i] = l;
  }
}

py::dict plan_flat_py(const py::array& head_ids, const py::array& prefix_tokens, const py::array& prefix_offsets,
                      const py::array& suffix_tokens, const py::array& suffix_offsets, int64_t token_budget,
                      int64_t max_rows, bool packed, bool share_prefix, bool by_length, uint64_t hash_mask) {
  check_config(token_budget, max_rows);
  auto hi = require<int64_t>(head_ids, "head_ids", 1);
  const int64_t n = hi.shape[0];
  check(n <= kMaxRequests, "head_ids: at most 2**31 - 2 requests per plan");
  SeqTable pre, suf;
  std::vector<int64_t> plen, slen;
  flat_table(prefix_tokens, prefix_offsets, n, "prefix", pre, plen);
  flat_table(suffix_tokens, suffix_offsets, n, "suffix", suf, slen);
  PlanInput in;
  in.n = n;
  in.head = static_cast<const int64_t*>(hi.ptr);
  in.plen = plen.data();
  in.slen = slen.data();
  in.pseq = &pre;
  in.sseq = &suf;
  in.hash_mask = hash_mask;
  return to_dict(run_plan(in, token_budget, max_rows, packed, share_prefix, by_length));
}

// ---- the request-list form: [(head_id, prefix_ids, suffix_ids), ...] read in one pass ----
std::string type_name(PyObject* o) {
  return py::str(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(o))).attr("__name__")).cast<std::string>();
}

// Element size of a numpy integer type number (kind 'i'/'u'), or 0 for anything else.
int int_elsize(int type_num) {
  switch (type_num) {
    case 1: case 2: return 1;                       // byte, ubyte
    case 3: case 4: return 2;                       // short, ushort
    case 5: case 6: return 4;                       // int, uint
    case 7: case 8: return sizeof(long);            // long, ulong
    case 9: case 10: return 8;                      // longlong, ulonglong
    default: return 0;
  }
}

// Token storage in fixed chunks: pointers stay valid as it grows.
template <typename T>
class Arena {
 public:
  T* alloc(int64_t n) {
    if (n > left_) {
      const int64_t cap = std::max<int64_t>(n, int64_t(1) << 20);
      chunks_.emplace_back(new T[cap]);
      free_ = chunks_.back().get();
      left_ = cap;
    }
    T* p = free_;
    free_ += n;
    left_ -= n;
    return p;
  }
  void release(int64_t n) {  // gives back the last alloc(n)
    free_ -= n;
    left_ += n;
  }

 private:
  std::vector<std::unique_ptr<T[]>> chunks_;
  T* free_ = nullptr;
  int64_t left_ = 0;
};

// Reads each request's head id and both token sequences with no Python call in the common cases
// (exact ints; lists/tuples of exact ints; native-order 1-D integer numpy arrays). Numpy int32/int64
// arrays with unit stride are kept as views (no copy); everything else is converted into an arena
// of int64 tokens. A prefix object passed for many requests (the usual case: one tokenised prompt,
// many candidates) is recognised by identity and becomes one sequence of the table, hashed once.
// Anything unusual (numpy scalars, torch tensors, bad values) goes through the Python reference's
// checkers, so errors read exactly as in the reference.
class RequestIngest {
 public:
  RequestIngest(py::handle as_tokens, py::handle head_id) : as_tokens_(as_tokens), head_id_(head_id) {}

  SeqTable pre, suf;
  std::vector<int64_t> head, plen, slen;

  void run(py::handle requests) {
    PyObject* rs = requests.ptr();
    check(PyList_Check(rs) || PyTuple_Check(rs), "requests: expected a list or tuple");
    const int64_t n = PySequence_Fast_GET_SIZE(rs);
    check(n <= kMaxRequests, "requests: at most 2**31 - 2 requests per plan");
    head.resize(n);
    plen.resize(n);
    slen.resize(n);
    pre.of.resize(n);
    suf.of.resize(n);
    // The Python checkers called back for unusual items run arbitrary code: hold our own references to
    // what we read, and re-read the list (it could even change size) instead of keeping its item array.
    for (int64_t i = 0; i < n; ++i) {
      check(PySequence_Fast_GET_SIZE(rs) == n, "requests: changed while being read");
      const py::object req = py::reinterpret_borrow<py::object>(PySequence_Fast_ITEMS(rs)[i]);
      PyObject* r = req.ptr();
      if (!PyTuple_Check(r) && !PyList_Check(r))
        throw py::type_error("requests[" + std::to_string(i) +
                             "]: expected a (head_id, prefix_ids, suffix_ids) tuple, got " + type_name(r));
      if (PySequence_Fast_GET_SIZE(r) != 3)
        throw py::value_error("requests[" + std::to_string(i) +
                              "]: expected 3 items (head_id, prefix_ids, suffix_ids), got " +
                              std::to_string(PySequence_Fast_GET_SIZE(r)));
      PyObject** f = PySequence_Fast_ITEMS(r);
      const py::object h = py::reinterpret_borrow<py::object>(f[0]), pr = py::reinterpret_borrow<py::object>(f[1]),
                       su = py::reinterpret_borrow<py::object>(f[2]);
      head[i] = head_of(h.ptr(), i);
      const int64_t p = pre.of[i] = seq_of(pr, pre, pcache_, i, "prefix_ids");
      const int64_t s = suf.of[i] = seq_of(su, suf, scache_, i, "suffix_ids");
      plen[i] = pre.len(p);
      slen[i] = suf.len(s);
      const int64_t total = plen[i] + slen[i];
      if (total < 1 || total > kInt32Max)
        throw py::value_error("requests: request " + std::to_string(i) +
                              (total < 1 ? " has no tokens (prefix and suffix both empty)"
                                         : " has more than 2**31 - 1 tokens"));
    }
  }

 private:
  // Direct-mapped cache: object address -> sequence index (a miss only costs a new table entry).
  // A slot holds a reference to its object, so that no other object can reuse the address while the
  // slot names it.
  struct PtrCache {
    static constexpr int kBits = 12;
    struct Slot {
      py::object obj;
      int64_t seq = -1;
    };
    std::vector<Slot> slots = std::vector<Slot>(1 << kBits);
    Slot& at(PyObject* o) { return slots[(reinterpret_cast<uintptr_t>(o) >> 4) * kK1 >> (64 - kBits)]; }
  };

  int64_t head_of(PyObject* h, int64_t i) {
    if (PyLong_CheckExact(h)) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(h, &overflow);
      if (!overflow && v >= 0) return v;
    }
    return head_id_(py::handle(h), i).cast<int64_t>();  // validates (raises) or converts, e.g. numpy ints
  }

  int64_t seq_of(const py::object& obj, SeqTable& t, PtrCache& cache, int64_t i, const char* side) {
    PyObject* o = obj.ptr();
    if (auto& slot = cache.at(o); slot.obj.ptr() == o) return slot.seq;
    const int64_t s = t.size();
    if (!(PyList_Check(o) || PyTuple_Check(o)) || !from_list(o, t, i, side)) {
      if (py::isinstance<py::array>(o) && is_plain_int_array(o)) {
        from_array(o, t, i, side);
      } else {
        py::object a = as_tokens_(py::handle(o), name(i, side));  // raises the reference's error, or converts
        keep_.append(a);
        from_array(a.ptr(), t, i, side);
      }
    }
    auto& slot = cache.at(o);
    slot.obj = obj;
    slot.seq = s;
    return s;
  }

  static std::string name(int64_t i, const char* side) { return "requests[" + std::to_string(i) + "] " + side; }
  [[noreturn]] static void negative(int64_t i, const char* side) {
    throw py::value_error(name(i, side) + ": token ids must be >= 0");
  }

  // Lists/tuples of exact Python ints; false (nothing added) when an item needs the Python checker.
  // Lists/tuples of exact Python ints, stored as int32 (half the memory to fault in and hash; ids
  // above 2**31 - 1 redo the list as int64); false (nothing added) when an item needs the checker.
  bool from_list(PyObject* o, SeqTable& t, int64_t i, const char* side) {
    const int64_t n = PySequence_Fast_GET_SIZE(o);
    PyObject** items = PySequence_Fast_ITEMS(o);
    int32_t* d32 = a32_.alloc(n);
    const int r = fill_list(items, n, d32, i, side);
    if (r == 0) {
      t.add(d32, n, false);
      return true;
    }
    a32_.release(n);
    if (r == 1) return false;
    int64_t* d64 = a64_.alloc(n);
    if (fill_list(items, n, d64, i, side) != 0) {
      a64_.release(n);
      return false;
    }
    t.add(d64, n, true);
    return true;
  }

  // 0: filled; 1: an item is not an exact int of int64 range (the checker decides); 2: too big for T.
  template <typename T>
  static int fill_list(PyObject** items, int64_t n, T* dst, int64_t i, const char* side) {
    bool neg = false;  // raised after the loop: a later non-int item makes it the checker's TypeError
    for (int64_t k = 0; k < n; ++k) {
      PyObject* x = items[k];
      if (!PyLong_CheckExact(x)) return 1;
      int64_t v;
      if (!small_int(x, &v)) {
        int overflow = 0;
        v = PyLong_AsLongLongAndOverflow(x, &overflow);
        if (overflow) return 1;
        if (v > std::numeric_limits<T>::max()) return 2;
      }
      neg |= v < 0;
      dst[k] = static_cast<T>(v);
    }
    if (neg) negative(i, side);
    return 0;
  }

  // Reads an exact int of one internal digit (|v| < 2**30: every token id in practice) straight from
  // the object instead of calling PyLong_AsLongLongAndOverflow. With the int32 arena, lists of ints
  // went from 13.0 to 8.2 ns per token here (2 cores at load 11; mostly the cost of touching the objects).
  static bool small_int(PyObject* x, int64_t* v) {
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact(reinterpret_cast<PyLongObject*>(x))) return false;
    *v = PyUnstable_Long_CompactValue(reinterpret_cast<PyLongObject*>(x));
    return true;
#else
    const Py_ssize_t size = Py_SIZE(x);
    if (size < -1 || size > 1) return false;
    *v = size * static_cast<int64_t>(reinterpret_cast<PyLongObject*>(x)->ob_digit[0]);
    return true;
#endif
  }

  static bool is_plain_int_array(PyObject* o) {
    const auto* a = py::detail::array_proxy(o);
    const auto* d = py::detail::array_descriptor_proxy(a->descr);
    return a->nd == 1 && (d->kind == 'i' || d->kind == 'u') && d->byteorder != '>' && int_elsize(d->type_num) > 0;
  }

  // A validated 1-D integer array (native byte order): a view when int32/int64 with unit stride,
  // else a converted copy. Negative ids and uint64 ids above 2**63 - 1 are refused.
  void from_array(PyObject* o, SeqTable& t, int64_t i, const char* side) {
    py::object own;
    if (!is_plain_int_array(o)) {  // e.g. a big-endian array from the checker: make it native int64
      own = py::reinterpret_borrow<py::object>(o).attr("astype")("int64");
      keep_.append(own);
      o = own.ptr();
    }
    const auto* a = py::detail::array_proxy(o);
    const auto* d = py::detail::array_descriptor_proxy(a->descr);
    const int64_t n = a->dimensions[0], stride = a->strides[0];
    const int es = int_elsize(d->type_num);
    const char* p = a->data;
    if (d->kind == 'i' && (es == 8 || es == 4) && (stride == es || n <= 1)) {
      if (es == 8 ? any_negative(reinterpret_cast<const int64_t*>(p), n)
                  : any_negative(reinterpret_cast<const int32_t*>(p), n))
        negative(i, side);
      // A reference of our own: planning runs without the GIL, and another thread could drop the
      // caller's last one meanwhile (e.g. by clearing the request list).
      views_.push_back(py::reinterpret_borrow<py::object>(o));
      t.add(p, n, es == 8);
      return;
    }
    int64_t* dst = a64_.alloc(n);
    for (int64_t k = 0; k < n; ++k, p += stride) {
      int64_t v;
      if (d->kind == 'i') {
        v = es == 1 ? *reinterpret_cast<const int8_t*>(p) : es == 2 ? *reinterpret_cast<const int16_t*>(p)
          : es == 4 ? *reinterpret_cast<const int32_t*>(p) : *reinterpret_cast<const int64_t*>(p);
        if (v < 0) negative(i, side);
      } else {
        const uint64_t u = es == 1   ? *reinterpret_cast<const uint8_t*>(p)
                           : es == 2 ? *reinterpret_cast<const uint16_t*>(p)
                           : es == 4 ? *reinterpret_cast<const uint32_t*>(p)
                                     : *reinterpret_cast<const uint64_t*>(p);
        if (u > static_cast<uint64_t>(INT64_MAX)) throw py::value_error(name(i, side) + ": token ids above 2**63 - 1");
        v = static_cast<int64_t>(u);
      }
      dst[k] = v;
    }
    t.add(dst, n, true);
  }

  template <typename T>
  static bool any_negative(const T* p, int64_t n) {
    T acc = 0;
    for (int64_t k = 0; k < n; ++k) acc |= p[k];  // branch-free: the sign bit survives the OR
    return acc < 0;
  }

  py::handle as_tokens_, head_id_;
  py::list keep_;  // arrays made by the Python checker, alive until planning ends
  std::vector<py::object> views_;  // arrays read in place, alive until planning ends
  PtrCache pcache_, scache_;
  Arena<int32_t> a32_;
  Arena<int64_t> a64_;
};

py::dict plan_requests_py(const py::object& requests, const py::object& as_tokens, const py::object& head_id,
                          int64_t token_budget, int64_t max_rows, bool packed, bool share_prefix, bool by_length,
                          uint64_t hash_mask) {
  check_config(token_budget, max_rows);
  RequestIngest ing(as_tokens, head_id);
  ing.run(requests);
  PlanInput in;
  in.n = static_cast<int64_t>(ing.head.size());
  in.head = ing.head.data();
  in.plen = ing.plen.data();
  in.slen = ing.slen.data();
  in.pseq = &ing.pre;
  in.sseq = &ing.suf;
  in.hash_mask = hash_mask;
  return to_dict(run_plan(in, token_budget, max_rows, packed, share_prefix, by_length));
}

py::array_t<uint64_t> hash_tokens_py(const py::array& tokens, const py::array& offsets) {
  SeqTable t;
  std::vector<int64_t> lens;
  auto oi = require<int64_t>(offsets, "offsets", 1);
  check(oi.shape[0] >= 1, "offsets: needs at least one entry");
  const int64_t n = oi.shape[0] - 1;
  flat_table(tokens, offsets, n, "sequences", t, lens);
  py::array_t<uint64_t> h(static_cast<py::ssize_t>(n));
  uint64_t* hp = h.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < n; ++i) hp[i] = seq_hash(t, i);
  }
  return h;
}

}  // namespace

void bind_scheduler(py::module_& m) {
  m.def("sched_plan", &plan_arrays_py, py::arg("head_ids"), py::arg("prefix_lens"), py::arg("suffix_lens"),
        py::arg("prefix_hashes"), py::arg("suffix_hashes"), py::arg("token_budget"), py::arg("max_rows"),
        py::arg("packed"), py::arg("share_prefix"), py::arg("by_length"),
        "Plans batches from lengths (+ optional caller hashes); returns the plan's columns as a dict of arrays");
  m.def("sched_plan_flat", &plan_flat_py, py::arg("head_ids"), py::arg("prefix_tokens"), py::arg("prefix_offsets"),
        py::arg("suffix_tokens"), py::arg("suffix_offsets"), py::arg("token_budget"), py::arg("max_rows"),
        py::arg("packed"), py::arg("share_prefix"), py::arg("by_length"), py::arg("hash_mask"),
        "Plans batches from flat int32/int64 token buffers + int64 offsets (n+1) per side");
  m.def("sched_plan_requests", &plan_requests_py, py::arg("requests"), py::arg("as_tokens"), py::arg("head_id"),
        py::arg("token_budget"), py::arg("max_rows"), py::arg("packed"), py::arg("share_prefix"),
        py::arg("by_length"), py::arg("hash_mask"),
        "Plans batches from a list of (head_id, prefix_ids, suffix_ids); as_tokens/head_id: the Python "
        "checkers called for unusual items");
  m.def("sched_hash_tokens", &hash_tokens_py, py::arg("tokens"), py::arg("offsets"),
        "64-bit content hash of each token sequence tokens[offsets[i]:offsets[i+1]] (int32/int64) -> uint64 (n)");
}

}  // namespace optimas
