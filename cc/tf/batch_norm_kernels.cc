// CPU kernels of TfbnBatchNorm and TfbnBatchNormGrad: the bodies of batch_norm_op.h with
// the core's CPU entry points on TensorFlow's intra-op thread pool.
#define EIGEN_USE_THREADS

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/batch_norm_op.h"
#include "tf/cpu_parallel.h"

namespace tfbn {
namespace {

struct CpuLauncher {
  // The CPU backward reads each element of x before it writes that element of dx.
  static constexpr bool kDxMayTakeX = true;
  // Its epilogue passes, too, read each element of x, dy and the residual before they write
  // that element of y, dx or dresidual.
  static constexpr bool kEpilogueOutputsMayTakeInputs = true;

  template <typename T, typename U>
  static absl::Status Forward(tensorflow::OpKernelContext* ctx, const Layout& layout,
                              const ForwardData<T, U>& d, const ForwardArgs& args) {
    BatchNormForwardEpilogue<T, U>(layout, d.x, d.scale, d.offset, d.mean, d.variance, d.residual,
                                   args, d.y, d.batch_mean, d.batch_variance, d.mean_lo,
                                   IntraOpParallelFor(ctx));
    return absl::OkStatus();
  }

  template <typename T, typename U>
  static absl::Status Backward(tensorflow::OpKernelContext* ctx, const Layout& layout,
                               const BackwardData<T, U>& d, const ForwardArgs& args) {
    BatchNormBackwardEpilogue<T, U>(layout, d.dy, d.x, d.scale, d.offset, d.residual, d.mean,
                                    d.mean_lo, d.variance, d.d_batch_mean, d.d_batch_variance, args,
                                    d.dx, d.dresidual, d.dscale, d.doffset,
                                    IntraOpParallelFor(ctx));
    return absl::OkStatus();
  }
};

template <typename T, typename U>
using CpuForward = BatchNormOp<CpuLauncher, T, U>;
template <typename T, typename U>
using CpuGrad = BatchNormGradOp<CpuLauncher, T, U>;
#define TFBN_REGISTER_PAIR(T, U)                                                \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNorm", DEVICE_CPU, T, U, CpuForward<T, U>); \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormGrad", DEVICE_CPU, T, U, CpuGrad<T, U>);

TFBN_REGISTER_PAIR(Eigen::half, float)
TFBN_REGISTER_PAIR(tensorflow::bfloat16, float)
TFBN_REGISTER_PAIR(float, float)
TFBN_REGISTER_PAIR(double, double)
TFBN_REGISTER_MISMATCHED_DTYPES(DEVICE_CPU)
#undef TFBN_REGISTER_PAIR

}  // namespace
}  // namespace tfbn
