// GPU kernels of TfbnBatchNorm and TfbnBatchNormGrad: the bodies of batch_norm_op.h (the
// CPU kernels' checks and outputs) with the core's CUDA launchers on the op's stream.
//
// Host code only; the launchers (core/batch_norm_cuda.h) launch their kernels through the
// CUDA driver API, so nothing here binds to TensorFlow's CUDA runtime stubs. All tensors,
// per-channel ones included, stay in device memory and nothing waits for the device.
#include "core/batch_norm_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/batch_norm_op.h"
#include "tf/gpu_launch.h"

namespace tfbn {
namespace {

struct GpuLauncher {
  // dx takes over dy's buffer only: the launchers promise nothing for x's.
  static constexpr bool kDxMayTakeX = false;
  // The epilogue launchers promise no aliasing (dx and dresidual never alias dy, x or the
  // residual), so their outputs get buffers of their own.
  static constexpr bool kEpilogueOutputsMayTakeInputs = false;

  template <typename T, typename U>
  static absl::Status Forward(tensorflow::OpKernelContext* ctx, const Layout& layout,
                              const ForwardData<T, U>& d, const ForwardArgs& args) {
    constexpr cuda::DType t = kDType<T>;
    const bool epilogue = HasEpilogue(args, d.residual != nullptr);
    Workspace w;
    TF_RETURN_IF_ERROR(
        w.Allocate(ctx, epilogue ? cuda::ForwardEpilogueWorkspaceBytes(t, layout, args.training)
                                 : cuda::ForwardWorkspaceBytes(t, layout, args.training)));
    const cuda::Result result =
        epilogue
            ? cuda::BatchNormForwardEpilogue(t, layout, d.x, d.scale, d.offset, d.mean, d.variance,
                                             d.residual, args, d.y, d.batch_mean, d.batch_variance,
                                             d.mean_lo, w.data(), w.bytes(), OpStream(ctx))
            : cuda::BatchNormForward(t, layout, d.x, d.scale, d.offset, d.mean, d.variance, args,
                                     d.y, d.batch_mean, d.batch_variance, d.mean_lo, w.data(),
                                     w.bytes(), OpStream(ctx));
    return LaunchStatus(result, "TfbnBatchNorm");
  }

  template <typename T, typename U>
  static absl::Status Backward(tensorflow::OpKernelContext* ctx, const Layout& layout,
                               const BackwardData<T, U>& d, const ForwardArgs& args) {
    constexpr cuda::DType t = kDType<T>;
    const bool epilogue = HasEpilogue(args, d.residual != nullptr);
    Workspace w;
    TF_RETURN_IF_ERROR(w.Allocate(ctx, epilogue ? cuda::BackwardEpilogueWorkspaceBytes(t, layout)
                                                : cuda::BackwardWorkspaceBytes(t, layout)));
    const cuda::Result result =
        epilogue
            ? cuda::BatchNormBackwardEpilogue(t, layout, d.dy, d.x, d.scale, d.offset, d.residual,
                                              d.mean, d.mean_lo, d.variance, d.d_batch_mean,
                                              d.d_batch_variance, args, d.dx, d.dresidual, d.dscale,
                                              d.doffset, w.data(), w.bytes(), OpStream(ctx))
            : cuda::BatchNormBackward(t, layout, d.dy, d.x, d.scale, d.mean, d.mean_lo, d.variance,
                                      d.d_batch_mean, d.d_batch_variance, args, d.dx, d.dscale,
                                      d.doffset, w.data(), w.bytes(), OpStream(ctx));
    return LaunchStatus(result, "TfbnBatchNormGrad");
  }
};

template <typename T, typename U>
using GpuForward = BatchNormOp<GpuLauncher, T, U>;
template <typename T, typename U>
using GpuGrad = BatchNormGradOp<GpuLauncher, T, U>;

// Every activation, with or without a residual.
#define TFBN_REGISTER_PAIR(T, U)                                                \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNorm", DEVICE_GPU, T, U, GpuForward<T, U>); \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormGrad", DEVICE_GPU, T, U, GpuGrad<T, U>);

TFBN_REGISTER_PAIR(Eigen::half, float)
TFBN_REGISTER_PAIR(tensorflow::bfloat16, float)
TFBN_REGISTER_PAIR(float, float)
TFBN_REGISTER_PAIR(double, double)
TFBN_REGISTER_MISMATCHED_DTYPES(DEVICE_GPU)
#undef TFBN_REGISTER_PAIR

}  // namespace
}  // namespace tfbn
