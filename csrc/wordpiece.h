// WordPiece tokenizer binding (csrc/wordpiece.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace optimas {
void bind_wordpiece(pybind11::module_& m);
}
