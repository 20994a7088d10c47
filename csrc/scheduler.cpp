// Token-budget planner (see scheduler.h for the contract, optimas_fast/scheduler.py for the exact
// algorithm, which the pure-Python twin there implements line for line).
#include "scheduler.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <string>

#include "checks.h"

namespace optimas {
namespace py = pybind11;

namespace {

// Keys ahead that a hash-table probe is prefetched (enough to cover a DRAM miss at a few ns/key).
constexpr int64_t kPrefetch = 16;

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

// Open-addressing table of request indices (linear probing, power-of-two size, load <= 1/2). Each
// 8-byte slot keeps 32 bits of the key hash next to the index, so most probes settle without
// touching the requests; `eq(j)` confirms every tag match. Insertion happens in index order, so the
// entry found for a key is always its first occurrence, whatever the table layout: the result is
// order-determined. (Indices fit 32 bits: the binding caps n below 2**31.)
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

inline bool same_tokens(const int64_t* tok, const int64_t* off, int64_t a, int64_t b) {
  const int64_t la = off[a + 1] - off[a];
  if (la != off[b + 1] - off[b]) return false;
  return std::equal(tok + off[a], tok + off[a] + la, tok + off[b]);
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

uint64_t hash_token_seq(const int64_t* t, int64_t n) {
  uint64_t h = 0x243F6A8885A308D3ull ^ (static_cast<uint64_t>(n) * 0x9E3779B97F4A7C15ull);
  for (int64_t i = 0; i < n; ++i) {
    h ^= static_cast<uint64_t>(t[i]) * 0x87C37B91114253D5ull;
    h = rotl(h, 31) * 0x4CF5AD432745937Full;
  }
  return fmix64(h);
}

PlanOutput plan(const PlanInput& in, const PlanConfig& cfg) {
  const int64_t n = in.n;
  const bool tokens = in.ptok != nullptr;  // token path: contents confirm every hash match
  const bool dedup_on = tokens || (in.phash != nullptr && in.shash != nullptr);
  const bool group_on = tokens || in.phash != nullptr;
  PlanOutput out;

  // ---- 1. content hashes (tests mask token hashes to force collisions; caller hashes are the
  //         identity of a sequence, nothing confirms them, so they are never masked) ----
  std::vector<uint64_t> ph(group_on ? n : 0), sh(dedup_on ? n : 0);
  for (int64_t i = 0; i < n && group_on; ++i)
    ph[i] = tokens ? hash_token_seq(in.ptok + in.poff[i], in.plen[i]) & in.hash_mask : in.phash[i];
  for (int64_t i = 0; i < n && dedup_on; ++i)
    sh[i] = tokens ? hash_token_seq(in.stok + in.soff[i], in.slen[i]) & in.hash_mask : in.shash[i];

  // ---- 2. de-duplication: the first identical request represents ----
  out.dedup.resize(n);
  if (dedup_on) {
    std::vector<uint64_t> key(n);
    for (int64_t i = 0; i < n; ++i)
      key[i] = fmix64(ph[i] ^ rotl(sh[i], 21) ^ (static_cast<uint64_t>(in.head[i]) * 0x9E3779B97F4A7C15ull) ^
                      rotl(static_cast<uint64_t>(in.plen[i]) * 0xC2B2AE3D27D4EB4Full, 43) ^
                      static_cast<uint64_t>(in.slen[i]));
    FirstSeen seen(n);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetch < n) seen.prefetch(key[i + kPrefetch]);
      out.dedup[i] = seen.find_or_insert(key[i], i, [&](int64_t j) {
        if (in.head[j] != in.head[i] || in.plen[j] != in.plen[i] || in.slen[j] != in.slen[i] || ph[j] != ph[i] ||
            sh[j] != sh[i])
          return false;
        return !tokens || (same_tokens(in.ptok, in.poff, i, j) && same_tokens(in.stok, in.soff, i, j));
      });
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out.dedup[i] = i;
  }

  // ---- 3. prefix groups: representatives with one non-empty prefix, groups of >= 2 only ----
  std::vector<int64_t> first(n, -1), count(n, 0);  // first rep with the same prefix; members per first
  if (group_on) {
    std::vector<uint64_t> key(n);
    for (int64_t i = 0; i < n; ++i) key[i] = fmix64(ph[i] ^ (static_cast<uint64_t>(in.plen[i]) * 0x9E3779B97F4A7C15ull));
    FirstSeen seen(n);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetch < n) seen.prefetch(key[i + kPrefetch]);
      if (out.dedup[i] != i || in.plen[i] == 0) continue;
      first[i] = seen.find_or_insert(key[i], i, [&](int64_t j) {
        return in.plen[j] == in.plen[i] && ph[j] == ph[i] && (!tokens || same_tokens(in.ptok, in.poff, i, j));
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
// Bindings. The Python layer (optimas_fast/scheduler.py) validates every argument with messages
// for users; here we re-check only what would read outside a buffer.

namespace {

// Hands a vector to numpy without copying: the array owns it through a capsule.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_it(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(owned->size()), owned->data(), free_it);
}

const int64_t* vec_ptr(const py::array& a, const char* name, int64_t n) {
  auto info = require<int64_t>(a, name, 1);
  check(info.shape[0] == n, std::string(name) + ": expected length " + std::to_string(n) + ", got " +
                                std::to_string(info.shape[0]));
  return static_cast<const int64_t*>(info.ptr);
}

// tokens (T) + offsets (n+1): offsets start at 0, never decrease, end at T, and match `lens`.
void check_flat(const py::array& tok, const py::array& off, const int64_t* lens, int64_t n, const char* name,
                const int64_t** tok_out, const int64_t** off_out) {
  auto ti = require<int64_t>(tok, name, 1);
  const int64_t* o = vec_ptr(off, (std::string(name) + "_offsets").c_str(), n + 1);
  check(o[0] == 0 && o[n] == ti.shape[0], std::string(name) + ": offsets must run from 0 to the token count");
  for (int64_t i = 0; i < n; ++i)
    if (!(o[i + 1] - o[i] == lens[i] && lens[i] >= 0))  // message built only on failure (per-row loop)
      check(false, std::string(name) + ": offsets disagree with the lengths");
  *tok_out = static_cast<const int64_t*>(ti.ptr);
  *off_out = o;
}

py::dict plan_py(const py::array& head_ids, const py::array& prefix_lens, const py::array& suffix_lens,
                 const py::object& prefix_tokens, const py::object& prefix_offsets, const py::object& suffix_tokens,
                 const py::object& suffix_offsets, const py::object& prefix_hashes, const py::object& suffix_hashes,
                 int64_t token_budget, int64_t max_rows, bool packed, bool share_prefix, bool by_length,
                 uint64_t hash_mask) {
  check(token_budget >= 1, "token_budget must be >= 1");
  check(max_rows >= 1, "max_rows must be >= 1");
  PlanInput in;
  auto hi = require<int64_t>(head_ids, "head_ids", 1);
  in.n = hi.shape[0];
  check(in.n < (int64_t(1) << 31) - 1, "head_ids: at most 2**31 - 2 requests per plan");
  in.head = static_cast<const int64_t*>(hi.ptr);
  in.plen = vec_ptr(prefix_lens, "prefix_lens", in.n);
  in.slen = vec_ptr(suffix_lens, "suffix_lens", in.n);
  for (int64_t i = 0; i < in.n; ++i) check(in.plen[i] >= 0 && in.slen[i] >= 0, "lengths must be >= 0");
  in.hash_mask = hash_mask;
  const bool has_tokens = !prefix_tokens.is_none();
  check(has_tokens == !suffix_tokens.is_none() && has_tokens == !prefix_offsets.is_none() &&
            has_tokens == !suffix_offsets.is_none(),
        "prefix/suffix tokens and offsets must be given together");
  if (has_tokens) {
    check(prefix_hashes.is_none() && suffix_hashes.is_none(), "give token contents or hashes, not both");
    check_flat(prefix_tokens.cast<py::array>(), prefix_offsets.cast<py::array>(), in.plen, in.n, "prefix", &in.ptok,
               &in.poff);
    check_flat(suffix_tokens.cast<py::array>(), suffix_offsets.cast<py::array>(), in.slen, in.n, "suffix", &in.stok,
               &in.soff);
  } else {
    check(suffix_hashes.is_none() || !prefix_hashes.is_none(), "suffix_hashes needs prefix_hashes");
    auto hash_ptr = [&](const py::object& o, const char* name) -> const uint64_t* {
      if (o.is_none()) return nullptr;
      auto info = require<uint64_t>(o.cast<py::array>(), name, 1);
      check(info.shape[0] == in.n, std::string(name) + ": expected length " + std::to_string(in.n));
      return static_cast<const uint64_t*>(info.ptr);
    };
    in.phash = hash_ptr(prefix_hashes, "prefix_hashes");
    in.shash = hash_ptr(suffix_hashes, "suffix_hashes");
  }
  PlanConfig cfg{token_budget, max_rows, packed, share_prefix, by_length};
  PlanOutput out;
  {
    py::gil_scoped_release nogil;  // pure C++ from here: other Python threads keep running
    out = plan(in, cfg);
  }
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

py::array_t<uint64_t> hash_tokens_py(const py::array& tokens, const py::array& offsets) {
  auto ti = require<int64_t>(tokens, "tokens", 1);
  auto oi = require<int64_t>(offsets, "offsets", 1);
  check(oi.shape[0] >= 1, "offsets: needs at least one entry");
  const int64_t n = oi.shape[0] - 1;
  const int64_t* o = static_cast<const int64_t*>(oi.ptr);
  const int64_t* t = static_cast<const int64_t*>(ti.ptr);
  check(o[0] == 0 && o[n] == ti.shape[0], "offsets: must run from 0 to len(tokens)");
  for (int64_t i = 0; i < n; ++i) check(o[i + 1] >= o[i], "offsets: must not decrease");
  py::array_t<uint64_t> h(static_cast<py::ssize_t>(n));
  uint64_t* hp = h.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < n; ++i) hp[i] = hash_token_seq(t + o[i], o[i + 1] - o[i]);
  }
  return h;
}

}  // namespace

void bind_scheduler(py::module_& m) {
  m.def("sched_plan", &plan_py, py::arg("head_ids"), py::arg("prefix_lens"), py::arg("suffix_lens"),
        py::arg("prefix_tokens"), py::arg("prefix_offsets"), py::arg("suffix_tokens"), py::arg("suffix_offsets"),
        py::arg("prefix_hashes"), py::arg("suffix_hashes"), py::arg("token_budget"), py::arg("max_rows"),
        py::arg("packed"), py::arg("share_prefix"), py::arg("by_length"), py::arg("hash_mask"),
        "Plans batches (see optimas_fast.scheduler); returns the plan's columns as a dict of arrays");
  m.def("sched_hash_tokens", &hash_tokens_py, py::arg("tokens"), py::arg("offsets"),
        "64-bit content hash of each token sequence tokens[offsets[i]:offsets[i+1]] -> uint64 (n)");
}

}  // namespace optimas
