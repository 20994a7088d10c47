// Argument checks shared by every binding: each one throws a Python ValueError/TypeError with a
// message that names the argument, before any memory is touched.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

namespace optimas {
namespace py = pybind11;

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}
// For literals: no std::string is built unless the check fails (checks run once per row in loops).
inline void check(bool ok, const char* msg) {
  if (!ok) throw py::value_error(msg);
}

// A C-contiguous array of exactly dtype T with `ndim` dimensions (no silent casts: the Python layer
// decides dtypes, so a mismatch here is a bug in the caller and must be loud).
template <typename T>
inline py::buffer_info require(const py::array& a, const char* name, int ndim) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>())) {
    std::ostringstream s;
    s << name << ": expected dtype " << py::str(py::dtype::of<T>()).cast<std::string>() << ", got "
      << py::str(a.dtype()).cast<std::string>();
    throw py::type_error(s.str());
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
  if (a.ndim() != ndim) {
    std::ostringstream s;
    s << name << ": expected " << ndim << " dimensions, got " << a.ndim();
    throw py::value_error(s.str());
  }
  return a.request();
}

}  // namespace optimas
