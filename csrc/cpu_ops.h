// CPU kernels for the reward-model ops. They work on raw pointers: the Python layer (optimas_fast.ops)
// checks shapes, dtypes, contiguity and index ranges before calling, and passes data_ptr()s.
//
// Hidden-state buffers may be float32, bfloat16 or float16 (see DType); heads, biases, weights,
// margins and every reduction are float32, accumulated in float32.
#pragma once
#include <cstdint>

namespace optimas {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Per-row Bradley–Terry terms, d = rc - rr - mu, s = rc + rr:
//   loss[i] = -w_i * logsigmoid(d) + center * s^2
//   gd[i]   = d loss[i] / d d   = -w_i * sigmoid(-d)
//   nls[i]  = -logsigmoid(d)    (= d loss[i] / d w_i)
// w, mu may be null (w = 1, mu = 0). Every output pointer may be null.
void bt_loss_rows(int64_t B, const float* rc, const float* rr, const float* w, const float* mu,
                  float center, float* loss, float* gd, float* nls);

// out[n] = hidden[n, :] . W[ids[n], :] + b[ids[n]]    hidden: (N, H) of `dt`; W: (C, H); b: (C)
void multihead_score_fwd(DType dt, int64_t N, int64_t H, int64_t C, const void* hidden,
                         const int64_t* ids, const float* W, const float* b, float* out);

// g: (N) upstream gradient. dhidden (N, H) of `dt`, dW (C, H), db (C); any may be null (not needed).
// dW and db are overwritten (not accumulated into). Deterministic: threads split the H axis.
void multihead_score_bwd(DType dt, int64_t N, int64_t H, int64_t C, const void* hidden,
                         const int64_t* ids, const float* W, const float* g, void* dhidden, float* dW,
                         float* db);

// Fused per-component head + Bradley–Terry loss, forward and (optionally) backward in one pass over the
// hidden states. hc, hr: (B, H) of `dt`. Writes loss_rows/gd_rows/nls_rows (B) as bt_loss_rows does.
// When dhc != nullptr, also writes the gradients of  L = scale * sum_i loss[i]:
//   dhc, dhr: (B, H) of `dt`; dW: (C, H); db: (C)  (overwritten).
void fused_head_bt(DType dt, int64_t B, int64_t H, int64_t C, const void* hc, const void* hr,
                   const int64_t* ids, const float* W, const float* b, const float* w, const float* mu,
                   float center, float scale, float* loss_rows, float* gd_rows, float* nls_rows,
                   void* dhc, void* dhr, float* dW, float* db);

// out[b, :] = hidden[b, pos[b], :]   (row copy; dtype-agnostic, `elem` bytes per element)
void last_token_fwd(int64_t B, int64_t T, int64_t H, int64_t elem, const void* hidden,
                    const int64_t* pos, void* out);
// grad_hidden[b, pos[b], :] = grad_out[b, :]; grad_hidden must already be zero elsewhere.
void last_token_bwd(int64_t B, int64_t T, int64_t H, int64_t elem, const void* grad_out,
                    const int64_t* pos, void* grad_hidden);

int max_threads();

}  // namespace optimas
