// What every GPU kernel of tfbn needs to call a launcher of core/batch_norm_cuda.h: the
// dtype code of T, the op's stream, a device workspace, and a launch result as a Status.
// Host code only, in the GPU translation units (GOOGLE_CUDA=1, EIGEN_USE_GPU).
#pragma once

#if !GOOGLE_CUDA
#error "gpu_launch.h is for the GPU kernels, built only with GOOGLE_CUDA=1"
#endif

#ifndef EIGEN_USE_GPU  // must be set before the first Eigen header: on the command line
#error "gpu_launch.h is for the GPU kernels, built only with EIGEN_USE_GPU"
#endif

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/batch_norm_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tfbn {

// The launchers' dtype code of T; a T with no CUDA kernels has none and does not compile.
template <typename T>
struct CudaDType;
template <>
struct CudaDType<Eigen::half> : std::integral_constant<cuda::DType, cuda::DType::kHalf> {};
template <>
struct CudaDType<Eigen::bfloat16> : std::integral_constant<cuda::DType, cuda::DType::kBFloat16> {};
template <>
struct CudaDType<float> : std::integral_constant<cuda::DType, cuda::DType::kFloat> {};
template <>
struct CudaDType<double> : std::integral_constant<cuda::DType, cuda::DType::kDouble> {};
template <typename T>
constexpr cuda::DType kDType = CudaDType<T>::value;

// TensorFlow's compute stream for the op's device: the launchers enqueue there, so the
// work is ordered with the ops before and after it and nothing waits on the host.
inline cuda::Stream OpStream(tensorflow::OpKernelContext* ctx) {
  return static_cast<cuda::Stream>(ctx->eigen_device<Eigen::GpuDevice>().stream());
}

// A device workspace from TensorFlow's allocator. Released when the op returns, before the
// launch has run: safe as in TensorFlow's own kernels, since its GPU allocator hands the
// memory out again only to work enqueued later on the same stream.
class Workspace {
 public:
  absl::Status Allocate(tensorflow::OpKernelContext* ctx, size_t bytes) {
    bytes_ = bytes;
    const tensorflow::TensorShape shape({static_cast<int64_t>(bytes)});
    return ctx->allocate_temp(tensorflow::DT_INT8, shape, &tensor_);
  }
  void* data() { return bytes_ == 0 ? nullptr : tensor_.data(); }
  size_t bytes() const { return bytes_; }

 private:
  tensorflow::Tensor tensor_;
  size_t bytes_ = 0;
};

// A launcher's result as the op's Status; the driver version tells a user whether the
// driver is too old for the kernels (or missing).
inline absl::Status LaunchStatus(cuda::Result result, const char* op) {
  if (result == cuda::kSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("tfbn: ", op, " failed on the GPU: ", cuda::ErrorString(result), " (CUDA error ",
                   result, ", driver version ", cuda::DriverVersion(), ")"));
}

}  // namespace tfbn
