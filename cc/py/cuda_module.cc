// tfbn._core without TensorFlow (CMake -DTFBN_TF_OPS=OFF): only the CUDA entry points, for
// GPU machines that have no TensorFlow. With TensorFlow, module.cc defines _core instead.
#include <pybind11/pybind11.h>

#include "py/cuda_bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "tfbn core kernels on CUDA device tensors (built without TensorFlow).";
  m.attr("cpu_built") = false;
  tfbn::RegisterCudaBindings(m);
}
