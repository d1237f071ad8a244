// The split op family's CUDA entry points of tfbn._core (cuda_split_bindings.cc).
#pragma once

#include <pybind11/pybind11.h>

namespace tfbn {

// Defines cuda_partial_moments, cuda_merge_moments, cuda_apply_statistics, cuda_grad_sums
// and cuda_apply_grad_with_sums on device tensors.
void RegisterCudaSplitBindings(pybind11::module_& m);

}  // namespace tfbn
