// Device tensors of any framework as tfbn._core's CUDA entry points take them (the shared
// part of cuda_bindings.cc, cuda_split_bindings.cc and cuda_epilogue_bindings.cc).
//
// A device tensor is any of
//   - an object with __cuda_array_interface__ (CuPy, Numba, PyTorch except bfloat16,
//     whose typestr "<V2" is only "2 bytes"),
//   - an object with __dlpack__ (PyTorch, CuPy, JAX; the way in for bfloat16),
//   - a tuple (data_ptr: int, shape: tuple, dtype: str), for callers that want no
//     per-call protocol overhead (benchmarks).
// Tensors must be C-contiguous. Errors are std::invalid_argument (ValueError in Python)
// naming the argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/batch_norm.h"
#include "core/batch_norm_cuda.h"
#include "core/cuda/driver.h"

namespace tfbn {
namespace py_cuda {

namespace py = pybind11;

struct DeviceArray {
  void* data = nullptr;
  std::vector<int64_t> shape;
  std::string dtype;  // float16, bfloat16, float32, float64, or other
  int64_t itemsize = 0;
  py::object keep_alive;  // the DLPack capsule, owning the tensor until we are done
  int64_t size() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

[[noreturn]] void Fail(const std::string& what);
DeviceArray ToDeviceArray(const py::handle& obj, const char* name, int64_t stream);
// The tfbn dtype of a data tensor (float16, bfloat16, float32, float64).
cuda::DType DTypeOf(const DeviceArray& a, const char* name);
// The [outer, C, inner] view of a tensor of this shape with channels on `axis`.
Layout ViewAs(const std::vector<int64_t>& shape, int axis);
std::string ShapeString(const std::vector<int64_t>& shape);
// Data tensors (x, y, dy, dx, residual): the dtype and shape of x. Kept alive in *keep.
void* DataLike(const py::handle& obj, const char* name, const DeviceArray& x, int64_t stream,
               std::vector<DeviceArray>* keep);
// Per-channel tensors: vectors of length C of dtype U (float32; float64 for float64 x).
// None gives nullptr where allowed.
void* ChannelVector(const py::handle& obj, const char* name, cuda::DType dtype, int64_t C,
                    bool allow_none, int64_t stream, std::vector<DeviceArray>* keep);
// Any device tensor of this dtype ("float64", "float32") and shape; None gives nullptr where
// allowed.
void* TensorOf(const py::handle& obj, const char* name, const std::string& dtype,
               const std::vector<int64_t>& shape, bool allow_none, int64_t stream,
               std::vector<DeviceArray>* keep);
// Throws std::runtime_error with the driver's words for a failed launch.
void Check(cuda::Result result, const char* what);
// The context that owns the device memory at `data` (where a default-stream launch runs,
// and where the workspace is allocated).
void* ContextOf(const void* data, const char* name);
cuda::Stream AsStream(int64_t stream);
void CheckEpsilon(float epsilon);

// The caller's workspace, or one from the stream-ordered allocator freed after the launch.
class Workspace {
 public:
  Workspace(const py::handle& obj, size_t bytes, int64_t stream, cuda::Stream s, void* context)
      : stream_(s), context_(context), bytes_(bytes) {
    if (bytes == 0) return;
    if (!obj.is_none()) {
      const DeviceArray a = ToDeviceArray(obj, "workspace", stream);
      if (static_cast<size_t>(a.size() * a.itemsize) < bytes)
        Fail("workspace has " + std::to_string(a.size() * a.itemsize) + " bytes, needs " +
             std::to_string(bytes));
      ptr_ = a.data;
      return;
    }
    Check(cuda::AllocateAsync(context_, bytes, stream_, &ptr_, &synchronous_),
          "allocating the workspace");
    owned_ = true;
  }
  ~Workspace() {
    if (owned_) cuda::FreeAsync(context_, ptr_, stream_, synchronous_);
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  cuda::Stream stream_;
  void* context_;
  size_t bytes_;
  void* ptr_ = nullptr;
  bool owned_ = false, synchronous_ = false;
};

}  // namespace py_cuda
}  // namespace tfbn
