// GPU OpKernels for TfbnBatchNorm and TfbnBatchNormGrad: the same checks as the CPU
// kernels (BatchNormOpBase), then the core CUDA launchers on the op's stream.
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
#include "tf/batch_norm_op_base.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tfbn {
namespace {

using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

template <typename T>
constexpr cuda::DType kDType = cuda::DType::kFloat;
template <>
constexpr cuda::DType kDType<Eigen::half> = cuda::DType::kHalf;
template <>
constexpr cuda::DType kDType<Eigen::bfloat16> = cuda::DType::kBFloat16;
template <>
constexpr cuda::DType kDType<double> = cuda::DType::kDouble;

// The CUDA stream TensorFlow runs this op on (its compute stream for the device).
cudaStream_t OpStream(OpKernelContext* ctx) {
  return ctx->eigen_device<Eigen::GpuDevice>().stream();
}

absl::Status AllocateWorkspace(OpKernelContext* ctx, size_t bytes, Tensor* workspace) {
  return ctx->allocate_temp(tensorflow::DT_INT8, TensorShape({static_cast<int64_t>(bytes)}),
                            workspace);
}

absl::Status LaunchStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("tfbn: ", what, " failed to launch on the GPU: ",
                                          cuda::ErrorString(error), " (CUDA runtime ",
                                          cuda::RuntimeVersion(), ", driver ",
                                          cuda::DriverVersion(), ")"));
}

template <typename T, typename U>
class BatchNormGpuOp : public BatchNormOpBase {
 public:
  using BatchNormOpBase::BatchNormOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Layout layout;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, &layout));
    ForwardOutputs out;
    OP_REQUIRES_OK(ctx, AllocateForward(ctx, layout, &out));
    const size_t bytes = cuda::ForwardWorkspaceBytes(kDType<T>, layout, args_.training);
    Tensor workspace;
    OP_REQUIRES_OK(ctx, AllocateWorkspace(ctx, bytes, &workspace));
    const cudaError_t error = cuda::BatchNormForward(
        kDType<T>, layout, x.flat<T>().data(), DataOrNull<U>(ctx->input(1)),
        DataOrNull<U>(ctx->input(2)), DataOrNull<U>(ctx->input(3)),
        DataOrNull<U>(ctx->input(4)), args_, out.y->flat<T>().data(),
        out.batch_mean->flat<U>().data(), out.batch_variance->flat<U>().data(),
        out.reserve->flat<U>().data(), workspace.flat<int8_t>().data(), bytes, OpStream(ctx));
    OP_REQUIRES_OK(ctx, LaunchStatus(error, "TfbnBatchNorm"));
  }
};

template <typename T, typename U>
class BatchNormGradGpuOp : public BatchNormOpBase {
 public:
  using BatchNormOpBase::BatchNormOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    Layout layout;
    OP_REQUIRES_OK(ctx, PrepareBackward(ctx, &layout));
    Tensor *dx, *dscale, *doffset, *dresidual;
    const TensorShape channels({layout.channels});
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, channels, &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, channels, &doffset));
    // Registered for has_residual = false only: dresidual is the empty placeholder.
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({0}), &dresidual));
    const size_t bytes = cuda::BackwardWorkspaceBytes(kDType<T>, layout);
    Tensor workspace;
    OP_REQUIRES_OK(ctx, AllocateWorkspace(ctx, bytes, &workspace));
    const cudaError_t error = cuda::BatchNormBackward(
        kDType<T>, layout, dy.flat<T>().data(), x.flat<T>().data(),
        DataOrNull<U>(ctx->input(2)), ctx->input(3).flat<U>().data(),
        DataOrNull<U>(ctx->input(5)), ctx->input(4).flat<U>().data(),
        DataOrNull<U>(ctx->input(6)), DataOrNull<U>(ctx->input(7)), args_,
        dx->flat<T>().data(), dscale->flat<U>().data(), doffset->flat<U>().data(),
        workspace.flat<int8_t>().data(), bytes, OpStream(ctx));
    OP_REQUIRES_OK(ctx, LaunchStatus(error, "TfbnBatchNormGrad"));
  }
};

// The epilogue (activation, residual) has CPU kernels only so far: these kernels take the
// plain op alone, so TensorFlow places an op with an epilogue on the CPU.
#define TFBN_REGISTER_GPU(T, U)                                                  \
  REGISTER_KERNEL_BUILDER(Name("TfbnBatchNorm")                                  \
                              .Device(tensorflow::DEVICE_GPU)                    \
                              .TypeConstraint<T>("T")                            \
                              .TypeConstraint<U>("U")                            \
                              .AttrConstraint("activation", "identity")          \
                              .AttrConstraint("has_residual", false),            \
                          BatchNormGpuOp<T, U>);                                 \
  REGISTER_KERNEL_BUILDER(Name("TfbnBatchNormGrad")                              \
                              .Device(tensorflow::DEVICE_GPU)                    \
                              .TypeConstraint<T>("T")                            \
                              .TypeConstraint<U>("U")                            \
                              .AttrConstraint("activation", "identity")          \
                              .AttrConstraint("has_residual", false),            \
                          BatchNormGradGpuOp<T, U>);

TFBN_REGISTER_GPU(Eigen::half, float)
TFBN_REGISTER_GPU(tensorflow::bfloat16, float)
TFBN_REGISTER_GPU(float, float)
TFBN_REGISTER_GPU(double, double)
#undef TFBN_REGISTER_GPU

}  // namespace
}  // namespace tfbn
