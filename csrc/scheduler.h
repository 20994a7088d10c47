// Token-budget scheduler for reward-model scoring requests (see optimas_fast/scheduler.py).
#pragma once
#include <pybind11/pybind11.h>

namespace optimas {
// Adds the scheduler's classes/functions to the extension module.
void bind_scheduler(pybind11::module_& m);
}  // namespace optimas
