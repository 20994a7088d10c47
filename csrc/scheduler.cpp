// Placeholder: the planner lands with the scheduler work.
#include "scheduler.h"

namespace optimas {
void bind_scheduler(pybind11::module_& m) { (void)m; }
}  // namespace optimas
