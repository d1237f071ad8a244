// CUDA entry points of tfbn._core (cuda_bindings.cc), added to the module by one call.
#pragma once

#include <pybind11/pybind11.h>

namespace tfbn {

// Defines cuda_built = True, cuda_available(), the cuda_* kernels on device tensors.
void RegisterCudaBindings(pybind11::module_& m);

}  // namespace tfbn
