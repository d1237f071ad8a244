// GPU kernels of TfbnBatchNorm and TfbnBatchNormGrad: the bodies of batch_norm_op.h (the
// CPU kernels' checks and outputs) with the core's CUDA launchers on the op's stream.
//
// Host code only (g++ with GOOGLE_CUDA / EIGEN_USE_GPU against the CUDA headers shipped in
// the TensorFlow wheel); the kernels live in core/batch_norm_cuda.cu. Every CUDA runtime
// call goes through the core library, which carries its own static runtime, so nothing
// here binds to TensorFlow's runtime stubs. All tensors, per-channel ones included, stay
// in device memory and nothing waits for the device.
#if !GOOGLE_CUDA
#error "batch_norm_kernels_gpu.cc is built only with GOOGLE_CUDA=1"
#endif

#ifndef EIGEN_USE_GPU
#define EIGEN_USE_GPU
#endif

#include "core/batch_norm_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/batch_norm_op.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tfbn {
namespace {

template <typename T>
constexpr cuda::DType kDType = cuda::DType::kFloat;
template <>
constexpr cuda::DType kDType<Eigen::half> = cuda::DType::kHalf;
template <>
constexpr cuda::DType kDType<Eigen::bfloat16> = cuda::DType::kBFloat16;
template <>
constexpr cuda::DType kDType<double> = cuda::DType::kDouble;

// The CUDA stream TensorFlow runs this op on (its compute stream for the device).
cuda::Stream OpStream(tensorflow::OpKernelContext* ctx) {
  return static_cast<cuda::Stream>(ctx->eigen_device<Eigen::GpuDevice>().stream());
}

absl::Status AllocateWorkspace(tensorflow::OpKernelContext* ctx, size_t bytes,
                               tensorflow::Tensor* workspace) {
  const tensorflow::TensorShape shape({static_cast<int64_t>(bytes)});
  return ctx->allocate_temp(tensorflow::DT_INT8, shape, workspace);
}

absl::Status LaunchStatus(cuda::Result error, const char* what) {
  if (error == cuda::kSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("tfbn: ", what, " failed to launch on the GPU: ", cuda::ErrorString(error),
                   " (driver ", cuda::DriverVersion(), ")"));
}

// Registered for ops without an epilogue only (below); this says so should that change.
absl::Status CheckNoEpilogue(const ForwardArgs& args, bool has_residual) {
  if (args.activation == Activation::kIdentity && !has_residual) return absl::OkStatus();
  return absl::UnimplementedError(
      "tfbn: the GPU kernels have no epilogue (activation, residual) yet");
}

struct GpuLauncher {
  // dx takes over dy's buffer only: whether the CUDA passes also allow x's is for the
  // CUDA kernels to promise first.
  static constexpr bool kDxMayTakeX = false;

  template <typename T, typename U>
  static absl::Status Forward(tensorflow::OpKernelContext* ctx, const Layout& layout,
                              const ForwardData<T, U>& d, const ForwardArgs& args) {
    TF_RETURN_IF_ERROR(CheckNoEpilogue(args, d.residual != nullptr));
    const size_t bytes = cuda::ForwardWorkspaceBytes(kDType<T>, layout, args.training);
    tensorflow::Tensor workspace;
    TF_RETURN_IF_ERROR(AllocateWorkspace(ctx, bytes, &workspace));
    return LaunchStatus(
        cuda::BatchNormForward(kDType<T>, layout, d.x, d.scale, d.offset, d.mean, d.variance, args,
                               d.y, d.batch_mean, d.batch_variance, d.mean_lo,
                               workspace.flat<int8_t>().data(), bytes, OpStream(ctx)),
        "TfbnBatchNorm");
  }

  template <typename T, typename U>
  static absl::Status Backward(tensorflow::OpKernelContext* ctx, const Layout& layout,
                               const BackwardData<T, U>& d, const ForwardArgs& args) {
    TF_RETURN_IF_ERROR(CheckNoEpilogue(args, d.residual != nullptr));
    const size_t bytes = cuda::BackwardWorkspaceBytes(kDType<T>, layout);
    tensorflow::Tensor workspace;
    TF_RETURN_IF_ERROR(AllocateWorkspace(ctx, bytes, &workspace));
    return LaunchStatus(cuda::BatchNormBackward(
                            kDType<T>, layout, d.dy, d.x, d.scale, d.mean, d.mean_lo, d.variance,
                            d.d_batch_mean, d.d_batch_variance, args, d.dx, d.dscale, d.doffset,
                            workspace.flat<int8_t>().data(), bytes, OpStream(ctx)),
                        "TfbnBatchNormGrad");
  }
};

template <typename T, typename U>
using GpuForward = BatchNormOp<GpuLauncher, T, U>;
template <typename T, typename U>
using GpuGrad = BatchNormGradOp<GpuLauncher, T, U>;

// The epilogue (activation, residual) has CPU kernels only so far: these kernels take the
// plain op alone, so TensorFlow places an op with an epilogue on the CPU.
const char* const kNoActivation = ActivationName(Activation::kIdentity);
#define TFBN_REGISTER_GPU(OP, T, U, KERNEL)                                \
  REGISTER_KERNEL_BUILDER(Name(OP)                                         \
                              .Device(tensorflow::DEVICE_GPU)              \
                              .TypeConstraint<T>("T")                      \
                              .TypeConstraint<U>("U")                      \
                              .AttrConstraint("activation", kNoActivation) \
                              .AttrConstraint("has_residual", false),      \
                          KERNEL<T, U>);
#define TFBN_REGISTER_PAIR(T, U)                       \
  TFBN_REGISTER_GPU("TfbnBatchNorm", T, U, GpuForward) \
  TFBN_REGISTER_GPU("TfbnBatchNormGrad", T, U, GpuGrad)

TFBN_REGISTER_PAIR(Eigen::half, float)
TFBN_REGISTER_PAIR(tensorflow::bfloat16, float)
TFBN_REGISTER_PAIR(float, float)
TFBN_REGISTER_PAIR(double, double)
#undef TFBN_REGISTER_PAIR
#undef TFBN_REGISTER_GPU

}  // namespace
}  // namespace tfbn
