// CPU kernels (OpenMP + compiler vectorisation). See cpu_ops.h for the contracts.
#include "cpu_ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace optimas {
namespace {

// ---- element loads / stores: hidden states may be fp32, bf16 or fp16; math is fp32 ----
struct BF16 { uint16_t v; };
#if defined(__FLT16_MAX__)
using F16 = _Float16;  // GCC >= 12 / clang on x86-64: hardware (F16C) or compiler conversions
inline float half_to_float(F16 h) { return static_cast<float>(h); }
inline F16 float_to_half(float x) { return static_cast<F16>(x); }
#else
// Older compilers (e.g. GCC 11, Ubuntu 22.04) have no _Float16: convert by hand, round to nearest even.
struct F16 { uint16_t v; };
inline float half_to_float(F16 h) {
  uint32_t sign = (h.v & 0x8000u) << 16, exp = (h.v >> 10) & 0x1fu, man = h.v & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline F16 float_to_half(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint32_t sign = (u >> 16) & 0x8000u, ax = u & 0x7fffffffu;
  if (ax > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (ax < 0x38800000u) {  // subnormal or zero in half
    float f;
    std::memcpy(&f, &ax, 4);
    return {static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(f * 16777216.f)))};
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23);  // rebias, round to nearest even
  return {static_cast<uint16_t>(sign | (r >> 13))};
}
#endif

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const BF16* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i].v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float load(const F16* p, int64_t i) { return half_to_float(p[i]); }

inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(BF16* p, int64_t i, float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN (quiet)
    p[i].v = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  p[i].v = static_cast<uint16_t>(u >> 16);
}
inline void store(F16* p, int64_t i, float x) { p[i] = float_to_half(x); }

// Below this many multiply-adds a parallel region costs more than it saves (~5 us fork/join on
// this 2-core box vs ~0.3 ns per FMA).
constexpr int64_t kParallelWork = 1 << 15;

template <typename T>
inline float dot(const T* x, const float* w, int64_t H) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t h = 0; h < H; ++h) acc += load(x, h) * w[h];
  return acc;
}

// Stable pieces of the logistic loss, written so that a loop over rows vectorises: no branches and no libm
// calls (GCC does not vectorise std::exp / std::log1p without -ffast-math, and the scalar calls made
// bt_loss_rows ~7x slower than eager PyTorch at 1M rows on the 2-core EPYC). Both functions take the one
// argument they are used with here; accuracy ~1e-7 relative (tests compare with float64).

// exp(x) for x <= 0 (results below ~1e-38 flush to 0): x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
// for e^r (Cephes' expf coefficients), then 2^n through the exponent bits.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693145751953125f, x);  // ln2 split in two for an exact reduction
  r = std::fma(n, -1.428606765330187e-06f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// log1p(e) for e in [0, 1]: log(1 + e) = 2 atanh(z), z = e / (2 + e) in [0, 1/3] (no cancellation for tiny
// e), an odd series in z to z^15 (truncation < 5e-9).
inline float log1p_unit(float e) {
  float z = e / (2.0f + e);
  float z2 = z * z;
  float p = 1.0f / 15.0f;
  p = std::fma(p, z2, 1.0f / 13.0f);
  p = std::fma(p, z2, 1.0f / 11.0f);
  p = std::fma(p, z2, 1.0f / 9.0f);
  p = std::fma(p, z2, 1.0f / 7.0f);
  p = std::fma(p, z2, 1.0f / 5.0f);
  p = std::fma(p, z2, 1.0f / 3.0f);
  p = std::fma(p, z2, 1.0f);
  return 2.0f * z * p;
}

struct BTRow {
  float loss, gd, nls, s;
};
inline BTRow bt_row(float rc, float rr, float w, float mu, float center) {
  float d = rc - rr - mu;
  float s = rc + rr;
  float e = exp_nonpos(-std::fabs(d));            // exp(-|d|) in (0, 1]
  float nls = log1p_unit(e) - std::min(d, 0.f);   // -log sigmoid(d)
  float sig_neg = (d >= 0.f ? e : 1.f) / (1.f + e);  // sigmoid(-d), either sign without overflow
  if (d != d) nls = sig_neg = d;  // NaN inputs propagate (the clamps above would hide them)
  return {w * nls + center * s * s, -w * sig_neg, nls, s};
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(static_cast<float*>(nullptr)); break;
    case DType::BF16: f(static_cast<BF16*>(nullptr)); break;
    case DType::F16: f(static_cast<F16*>(nullptr)); break;
    default: throw std::invalid_argument("unsupported dtype code");
  }
}

}  // namespace

int max_threads() { return omp_get_max_threads(); }

namespace {
// Rows [i0, i1) with every output present and the optional inputs fixed at compile time: a plain simd loop
// with unconditional loads and stores. Measured (2-core EPYC, 4096 rows, one thread): 1.3 ns a row, against
// 7.3 with `w ? w[i] : 1` / `if (loss)` inside the loop and 13 as an `omp parallel for simd` loop (GCC then
// vectorises the outlined loop poorly); so the parallel split is by hand, around this function.
template <bool HasW, bool HasMu>
__attribute__((noinline)) void bt_rows_span(int64_t i0, int64_t i1, const float* __restrict rc,
                                            const float* __restrict rr, const float* __restrict w,
                                            const float* __restrict mu, float center, float* __restrict loss,
                                            float* __restrict gd, float* __restrict nls) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    BTRow r = bt_row(rc[i], rr[i], HasW ? w[i] : 1.f, HasMu ? mu[i] : 0.f, center);
    loss[i] = r.loss;
    gd[i] = r.gd;
    nls[i] = r.nls;
  }
}

template <bool HasW, bool HasMu>
void bt_rows(int64_t B, const float* rc, const float* rr, const float* w, const float* mu, float center,
             float* loss, float* gd, float* nls) {
  if (B <= kParallelWork) {
    bt_rows_span<HasW, HasMu>(0, B, rc, rr, w, mu, center, loss, gd, nls);
    return;
  }
#pragma omp parallel
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads(), chunk = (B + nt - 1) / nt;
    const int64_t a = std::min(B, t * chunk), b = std::min(B, a + chunk);
    bt_rows_span<HasW, HasMu>(a, b, rc, rr, w, mu, center, loss, gd, nls);
  }
}
}  // namespace

void bt_loss_rows(int64_t B, const float* rc, const float* rr, const float* w, const float* mu,
                  float center, float* loss, float* gd, float* nls) {
  if (loss && gd && nls) {  // the ops' path: every output wanted
    if (w && mu) return bt_rows<true, true>(B, rc, rr, w, mu, center, loss, gd, nls);
    if (w) return bt_rows<true, false>(B, rc, rr, w, mu, center, loss, gd, nls);
    if (mu) return bt_rows<false, true>(B, rc, rr, w, mu, center, loss, gd, nls);
    return bt_rows<false, false>(B, rc, rr, w, mu, center, loss, gd, nls);
  }
#pragma omp parallel for schedule(static) if (B > kParallelWork)
  for (int64_t i = 0; i < B; ++i) {
    BTRow r = bt_row(rc[i], rr[i], w ? w[i] : 1.f, mu ? mu[i] : 0.f, center);
    if (loss) loss[i] = r.loss;
    if (gd) gd[i] = r.gd;
    if (nls) nls[i] = r.nls;
  }
}

void multihead_score_fwd(DType dt, int64_t N, int64_t H, int64_t C, const void* hidden,
                         const int64_t* ids, const float* W, const float* b, float* out) {
  (void)C;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // Locals, not the lambda's by-reference captures: a store to out[n] could otherwise alias them and
    // force reloads in the hot loop.
    const T* __restrict x = static_cast<const T*>(hidden);
    const int64_t* __restrict id = ids;
    const float* __restrict w = W;
    const float* __restrict bias = b;
    float* __restrict o = out;
    const int64_t rows = N, hs = H;
#pragma omp parallel for schedule(static) if (rows * hs > kParallelWork)
    for (int64_t n = 0; n < rows; ++n) {
      const int64_t c = id[n];
      o[n] = dot(x + n * hs, w + c * hs, hs) + bias[c];
    }
  });
}

void multihead_score_bwd(DType dt, int64_t N, int64_t H, int64_t C, const void* hidden,
                         const int64_t* ids, const float* W, const float* g, void* dhidden, float* dW,
                         float* db) {
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = static_cast<const T*>(hidden);
    T* dx = static_cast<T*>(dhidden);
    if (dW) std::fill(dW, dW + C * H, 0.f);
    // Each thread owns a slice [h0, h1) of the hidden axis for all rows: dW needs no atomics and no
    // per-thread copies, and the summation order is fixed (deterministic for any thread count).
#pragma omp parallel if (N * H > kParallelWork)
    {
      int nt = omp_get_num_threads(), t = omp_get_thread_num();
      int64_t chunk = ((H + nt - 1) / nt + 15) / 16 * 16;  // 64-byte aligned slices of fp32
      int64_t h0 = std::min<int64_t>(H, t * chunk), h1 = std::min<int64_t>(H, h0 + chunk);
      for (int64_t n = 0; n < N; ++n) {
        int64_t c = ids[n];
        float gn = g[n];
        const float* wr = W + c * H;
        if (dx) {
          T* dxr = dx + n * H;
#pragma omp simd
          for (int64_t h = h0; h < h1; ++h) store(dxr, h, gn * wr[h]);
        }
        if (dW) {
          const T* xr = x + n * H;
          float* dwr = dW + c * H;
#pragma omp simd
          for (int64_t h = h0; h < h1; ++h) dwr[h] += gn * load(xr, h);
        }
      }
    }
    if (db) {
      std::fill(db, db + C, 0.f);
      for (int64_t n = 0; n < N; ++n) db[ids[n]] += g[n];
    }
  });
}

void fused_head_bt(DType dt, int64_t B, int64_t H, int64_t C, const void* hc, const void* hr,
                   const int64_t* ids, const float* W, const float* b, const float* w, const float* mu,
                   float center, float scale, float* loss_rows, float* gd_rows, float* nls_rows,
                   void* dhc, void* dhr, float* dW, float* db) {
  const bool grad = dhc != nullptr;
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xc = static_cast<const T*>(hc);
    const T* xr = static_cast<const T*>(hr);
    T* dxc = static_cast<T*>(dhc);
    T* dxr = static_cast<T*>(dhr);
    const bool par = B * H > kParallelWork;
    const int nt = par ? omp_get_max_threads() : 1;
    // Per-thread dW/db partials: rows are split across threads, and each row's contribution is added
    // while its hidden states are still in L1 (one pass over hc/hr instead of two). nt * C * H floats
    // (2 * 16 * 1024 * 4 B = 128 KiB at the benchmark size).
    std::vector<float> part_w(grad ? static_cast<size_t>(nt) * C * H : 0, 0.f);
    std::vector<float> part_b(grad ? static_cast<size_t>(nt) * C : 0, 0.f);
#pragma omp parallel num_threads(nt) if (par)
    {
      const int t = omp_get_thread_num();
      float* pw = grad ? part_w.data() + static_cast<size_t>(t) * C * H : nullptr;
      float* pb = grad ? part_b.data() + static_cast<size_t>(t) * C : nullptr;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B; ++i) {
        const int64_t c = ids[i];
        const float* wc = W + c * H;
        const T* a = xc + i * H;
        const T* r = xr + i * H;
        float rc = dot(a, wc, H) + b[c];
        float rr = dot(r, wc, H) + b[c];
        BTRow row = bt_row(rc, rr, w ? w[i] : 1.f, mu ? mu[i] : 0.f, center);
        loss_rows[i] = row.loss;
        if (gd_rows) gd_rows[i] = row.gd;
        if (nls_rows) nls_rows[i] = row.nls;
        if (!grad) continue;
        const float two_cs = 2.f * center * row.s;
        const float ga = scale * (row.gd + two_cs);   // dL/drc
        const float gb = scale * (-row.gd + two_cs);  // dL/drr
        T* da = dxc + i * H;
        T* dr = dxr + i * H;
        float* pwc = pw + c * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) {
          const float wv = wc[h];
          store(da, h, ga * wv);
          store(dr, h, gb * wv);
          pwc[h] += ga * load(a, h) + gb * load(r, h);
        }
        pb[c] += ga + gb;
      }
    }
    if (!grad) return;
    // Reduce the partials in thread order (fixed order: deterministic for a given thread count).
    const int64_t CH = C * H;
#pragma omp parallel for schedule(static) if (CH * nt > kParallelWork)
    for (int64_t k = 0; k < CH; ++k) {
      float s = 0.f;
      for (int t = 0; t < nt; ++t) s += part_w[static_cast<size_t>(t) * CH + k];
      dW[k] = s;
    }
    for (int64_t c = 0; c < C; ++c) {
      float s = 0.f;
      for (int t = 0; t < nt; ++t) s += part_b[static_cast<size_t>(t) * C + c];
      db[c] = s;
    }
  });
}

void last_token_fwd(int64_t B, int64_t T, int64_t H, int64_t elem, const void* hidden,
                    const int64_t* pos, void* out) {
  const char* src = static_cast<const char*>(hidden);
  char* dst = static_cast<char*>(out);
  const size_t row = static_cast<size_t>(H * elem);
#pragma omp parallel for schedule(static) if (B * H > kParallelWork)
  for (int64_t i = 0; i < B; ++i) std::memcpy(dst + i * row, src + (i * T + pos[i]) * row, row);
}

void last_token_bwd(int64_t B, int64_t T, int64_t H, int64_t elem, const void* grad_out,
                    const int64_t* pos, void* grad_hidden) {
  const char* src = static_cast<const char*>(grad_out);
  char* dst = static_cast<char*>(grad_hidden);
  const size_t row = static_cast<size_t>(H * elem);
#pragma omp parallel for schedule(static) if (B * H > kParallelWork)
  for (int64_t i = 0; i < B; ++i) std::memcpy(dst + (i * T + pos[i]) * row, src + i * row, row);
}

}  // namespace optimas
