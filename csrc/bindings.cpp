// The one binding file of optimas_fast._C. Ops take data pointers (Python ints from
// tensor.data_ptr()) and sizes: the checked Python wrappers in optimas_fast/ops/_cpp.py validate
// every argument first; here we re-check only what would otherwise corrupt memory.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "checks.h"
#include "cpu_ops.h"
#include "scheduler.h"
#include "wordpiece.h"

namespace py = pybind11;
using optimas::DType;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

DType dtype_code(int code) {
  optimas::check(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
  return static_cast<DType>(code);
}

void check_sizes(int64_t a, const char* na, int64_t b = 1, const char* nb = "", int64_t c = 1,
                 const char* nc = "") {
  optimas::check(a >= 0, std::string(na) + " must be >= 0");
  optimas::check(b >= 1 || nb[0] == 0, std::string(nb) + " must be >= 1");
  optimas::check(c >= 1 || nc[0] == 0, std::string(nc) + " must be >= 1");
}

// Head ids index W's rows: an out-of-range id would read outside W, so check again here.
// The message is built only on failure: building it per row cost ~5 ms at N = 65536 (measured), a third
// of the whole multihead_score forward.
void check_ids(const int64_t* ids, int64_t n, int64_t C) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= C)
      throw py::value_error("head_ids: value " + std::to_string(ids[i]) + " at row " + std::to_string(i) +
                            " is outside [0, " + std::to_string(C) + ")");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "optimas-fast native code: CPU kernels, the batch scheduler and a WordPiece tokenizer";
  m.def("max_threads", &optimas::max_threads, "OpenMP threads the CPU kernels use");

  // ---- ops (CPU) ----
  m.def(
      "bt_loss_rows",
      [](int64_t B, uintptr_t rc, uintptr_t rr, uintptr_t w, uintptr_t mu, float center, uintptr_t loss,
         uintptr_t gd, uintptr_t nls) {
        check_sizes(B, "B");
        py::gil_scoped_release nogil;
        optimas::bt_loss_rows(B, ptr<const float>(rc), ptr<const float>(rr), ptr<const float>(w),
                              ptr<const float>(mu), center, ptr<float>(loss), ptr<float>(gd), ptr<float>(nls));
      },
      py::arg("B"), py::arg("rc"), py::arg("rr"), py::arg("w"), py::arg("mu"), py::arg("center"),
      py::arg("loss"), py::arg("gd"), py::arg("nls"));

  m.def(
      "multihead_score_fwd",
      [](int dt, int64_t N, int64_t H, int64_t C, uintptr_t hidden, uintptr_t ids, uintptr_t W, uintptr_t b,
         uintptr_t out) {
        check_sizes(N, "N", H, "H", C, "C");
        check_ids(ptr<const int64_t>(ids), N, C);
        py::gil_scoped_release nogil;
        optimas::multihead_score_fwd(dtype_code(dt), N, H, C, ptr<const void>(hidden), ptr<const int64_t>(ids),
                                     ptr<const float>(W), ptr<const float>(b), ptr<float>(out));
      },
      py::arg("dtype"), py::arg("N"), py::arg("H"), py::arg("C"), py::arg("hidden"), py::arg("ids"),
      py::arg("W"), py::arg("b"), py::arg("out"));

  m.def(
      "multihead_score_bwd",
      [](int dt, int64_t N, int64_t H, int64_t C, uintptr_t hidden, uintptr_t ids, uintptr_t W, uintptr_t g,
         uintptr_t dhidden, uintptr_t dW, uintptr_t db) {
        check_sizes(N, "N", H, "H", C, "C");
        check_ids(ptr<const int64_t>(ids), N, C);
        py::gil_scoped_release nogil;
        optimas::multihead_score_bwd(dtype_code(dt), N, H, C, ptr<const void>(hidden), ptr<const int64_t>(ids),
                                     ptr<const float>(W), ptr<const float>(g), ptr<void>(dhidden),
                                     ptr<float>(dW), ptr<float>(db));
      },
      py::arg("dtype"), py::arg("N"), py::arg("H"), py::arg("C"), py::arg("hidden"), py::arg("ids"),
      py::arg("W"), py::arg("g"), py::arg("dhidden"), py::arg("dW"), py::arg("db"));

  m.def(
      "fused_head_bt",
      [](int dt, int64_t B, int64_t H, int64_t C, uintptr_t hc, uintptr_t hr, uintptr_t ids, uintptr_t W,
         uintptr_t b, uintptr_t w, uintptr_t mu, float center, float scale, uintptr_t loss_rows,
         uintptr_t gd_rows, uintptr_t nls_rows, uintptr_t dhc, uintptr_t dhr, uintptr_t dW, uintptr_t db) {
        check_sizes(B, "B", H, "H", C, "C");
        check_ids(ptr<const int64_t>(ids), B, C);
        optimas::check((dhc == 0) == (dhr == 0) && (dhc == 0) == (dW == 0) && (dhc == 0) == (db == 0),
                       "fused_head_bt: gradient buffers must be all given or all null");
        py::gil_scoped_release nogil;
        optimas::fused_head_bt(dtype_code(dt), B, H, C, ptr<const void>(hc), ptr<const void>(hr),
                               ptr<const int64_t>(ids), ptr<const float>(W), ptr<const float>(b),
                               ptr<const float>(w), ptr<const float>(mu), center, scale, ptr<float>(loss_rows),
                               ptr<float>(gd_rows), ptr<float>(nls_rows), ptr<void>(dhc), ptr<void>(dhr),
                               ptr<float>(dW), ptr<float>(db));
      },
      py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("C"), py::arg("hc"), py::arg("hr"), py::arg("ids"),
      py::arg("W"), py::arg("b"), py::arg("w"), py::arg("mu"), py::arg("center"), py::arg("scale"),
      py::arg("loss_rows"), py::arg("gd_rows"), py::arg("nls_rows"), py::arg("dhc"), py::arg("dhr"),
      py::arg("dW"), py::arg("db"));

  m.def(
      "last_token_fwd",
      [](int64_t B, int64_t T, int64_t H, int64_t elem, uintptr_t hidden, uintptr_t pos, uintptr_t out) {
        check_sizes(B, "B", T, "T", H, "H");
        const int64_t* p = ptr<const int64_t>(pos);
        for (int64_t i = 0; i < B; ++i) optimas::check(p[i] >= 0 && p[i] < T, "last_token: position out of range");
        py::gil_scoped_release nogil;
        optimas::last_token_fwd(B, T, H, elem, ptr<const void>(hidden), p, ptr<void>(out));
      },
      py::arg("B"), py::arg("T"), py::arg("H"), py::arg("elem"), py::arg("hidden"), py::arg("pos"),
      py::arg("out"));
  m.def(
      "last_token_bwd",
      [](int64_t B, int64_t T, int64_t H, int64_t elem, uintptr_t grad_out, uintptr_t pos, uintptr_t grad_hidden) {
        check_sizes(B, "B", T, "T", H, "H");
        const int64_t* p = ptr<const int64_t>(pos);
        for (int64_t i = 0; i < B; ++i) optimas::check(p[i] >= 0 && p[i] < T, "last_token: position out of range");
        py::gil_scoped_release nogil;
        optimas::last_token_bwd(B, T, H, elem, ptr<const void>(grad_out), p, ptr<void>(grad_hidden));
      },
      py::arg("B"), py::arg("T"), py::arg("H"), py::arg("elem"), py::arg("grad_out"), py::arg("pos"),
      py::arg("grad_hidden"));

  // ---- scheduler (csrc/scheduler.cpp) ----
  optimas::bind_scheduler(m);

  // ---- WordPiece tokenizer for the reward engine's host path (csrc/wordpiece.cpp) ----
  optimas::bind_wordpiece(m);
}
