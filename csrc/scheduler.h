// Token-budget scheduler for reward-model scoring requests (Python face: optimas_fast/scheduler.py;
// the exact algorithm, step for step in plain Python, is optimas_fast/scheduler_reference.py).
//
// A request is (head id, prefix token ids, suffix token ids). The planner
//   1. de-duplicates identical requests (same head, prefix and suffix; the first one represents),
//   2. groups representatives that share a non-empty prefix (groups of >= 2 only),
//   3. packs representatives into batches under a token budget and a row cap, longest first.
// Token sequences are identified by a 64-bit content hash; on the token path every hash match is
// confirmed by comparing the tokens, so different requests are never merged.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace optimas {

// One side (the prefixes or the suffixes) of n requests, as a table of token sequences plus, for
// each request, the index of its sequence in the table. Sequences are views (int32 or int64 tokens
// that stay owned by the caller), held either as one flat buffer + offsets (sequence s is
// base[off[s]:off[s+1]], every sequence of one width: the flat form, nothing allocated per request)
// or as a list of views (the request-list form). There several requests may name one sequence (a
// prefix object passed many times), which lets the planner hash it once.
struct SeqTable {
  // flat buffer
  bool flat = false;
  const char* base = nullptr;
  const int64_t* off = nullptr;  // (S+1)
  int64_t nflat = 0;
  bool flat_wide = false;
  // list of views
  std::vector<const void*> ptrs;  // (S) first token of each sequence
  std::vector<int64_t> lens;      // (S) tokens in each sequence
  std::vector<uint8_t> wides;     // (S) 1: int64 tokens, 0: int32 tokens
  std::vector<int64_t> of;        // (n) sequence of each request; empty means request i -> sequence i

  int64_t seq(int64_t i) const { return of.empty() ? i : of[i]; }
  int64_t size() const { return flat ? nflat : static_cast<int64_t>(lens.size()); }
  const void* ptr(int64_t s) const { return flat ? base + off[s] * (flat_wide ? 8 : 4) : ptrs[s]; }
  int64_t len(int64_t s) const { return flat ? off[s + 1] - off[s] : lens[s]; }
  bool wide(int64_t s) const { return flat ? flat_wide : wides[s] != 0; }
  void add(const void* p, int64_t n, bool is_wide) {
    ptrs.push_back(p);
    lens.push_back(n);
    wides.push_back(is_wide ? 1 : 0);
  }
};

// What the planner reads. Lengths are always given; token contents (two tables) or caller-made
// hashes may be absent. All pointers stay owned by the caller.
struct PlanInput {
  int64_t n = 0;
  const int64_t* head = nullptr;    // (n)
  const int64_t* plen = nullptr;    // (n) prefix lengths
  const int64_t* slen = nullptr;    // (n) suffix lengths
  const SeqTable* pseq = nullptr;   // prefix contents, or null (no contents)
  const SeqTable* sseq = nullptr;   // suffix contents (given together with pseq)
  const uint64_t* phash = nullptr;  // (n) caller prefix hashes (used when pseq is null), or null
  const uint64_t* shash = nullptr;  // (n) caller suffix hashes, or null
  uint64_t hash_mask = ~0ull;       // tests only: drop hash bits to force collisions
};

struct PlanConfig {
  int64_t token_budget = 0;  // max budget-counted tokens per batch (see scheduler.py)
  int64_t max_rows = 0;      // max rows per batch
  bool packed = false;       // false: rows x max_len counts; true: sum of lengths counts
  bool share_prefix = false; // batch members of one prefix group together, prefix counted once
  bool by_length = true;     // false: arrival order (the baseline the benchmark compares against)
};

// Columnar result; the names match the keys of the dict handed to Python.
struct PlanOutput {
  std::vector<int64_t> dedup;               // (n) representative of each request
  std::vector<int64_t> prefix_group;        // (n) group id or -1
  std::vector<int64_t> group_offsets;       // (G+1)
  std::vector<int64_t> group_members;       // (M) representatives, ascending within a group
  std::vector<int64_t> group_prefix_len;    // (G)
  std::vector<int64_t> batch_offsets;       // (B+1) into rows
  std::vector<int64_t> rows;                // (R) representative indices
  std::vector<int64_t> row_lengths;         // (R) tokens each row brings to its batch
  std::vector<int64_t> batch_max_len;       // (B)
  std::vector<int64_t> batch_prefix_group;  // (B) -1 or the shared group
  std::vector<int64_t> batch_prefix_len;    // (B)
  std::vector<int64_t> batch_tokens;        // (B) budget-counted size
  std::vector<uint8_t> batch_oversized;     // (B)
};

// 64-bit content hash of a token sequence, defined on the token values (int32 and int64 buffers
// holding the same ids hash alike); scheduler.hash_tokens exposes it.
uint64_t hash_token_seq(const int64_t* t, int64_t n);
uint64_t hash_token_seq(const int32_t* t, int64_t n);

// Pure C++, no Python calls: safe to run without the GIL.
PlanOutput plan(const PlanInput& in, const PlanConfig& cfg);

// Adds the scheduler's functions to the extension module (called from bindings.cpp).
void bind_scheduler(pybind11::module_& m);
}  // namespace optimas
