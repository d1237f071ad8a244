// GPU kernels of the split op family (split_ops.cc): the bodies of split_op.h with the
// core's CUDA launchers on the op's stream. Every input and output, per-channel ones and
// the weights included, stays in device memory: the host reads shapes only and nothing
// waits for the device.
#include "core/batch_norm_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/gpu_launch.h"
#include "tf/split_op.h"

namespace tfbn {
namespace {

using tensorflow::OpKernelContext;

struct GpuSplitLauncher {
  // The weights are in device memory, so they pass unchecked: reading them here would
  // wait for the device. A negative or non-finite weight makes the kernels give NaN
  // statistics (and so NaN outputs and gradients) instead of an error.
  static constexpr bool kWeightsOnHost = false;
  // cuda::ApplyStatistics promises nothing about y aliasing x.
  static constexpr bool kApplyYMayTakeX = false;

  template <typename T>
  static absl::Status Stats(OpKernelContext* ctx, const Layout& layout, const T* x,
                            const float* weights, double* partial) {
    Workspace w;
    TF_RETURN_IF_ERROR(
        w.Allocate(ctx, cuda::StatsWorkspaceBytes(kDType<T>, layout, weights != nullptr)));
    return LaunchStatus(cuda::PartialMoments(kDType<T>, layout, x, weights, partial, w.data(),
                                             w.bytes(), OpStream(ctx)),
                        "TfbnBatchNormStats");
  }

  template <typename U>
  static absl::Status Merge(OpKernelContext* ctx, int64_t parts, int64_t C, const double* partials,
                            U* mean, U* variance, U* mean_lo, double* count) {
    return LaunchStatus(cuda::MergeMoments(kDType<U>, parts, C, partials, mean, variance, mean_lo,
                                           count, OpStream(ctx)),
                        "TfbnBatchNormMergeStats");
  }

  template <typename T, typename U>
  static absl::Status Apply(OpKernelContext* ctx, const Layout& layout, const ApplyData<T, U>& d,
                            float epsilon) {
    Workspace w;
    TF_RETURN_IF_ERROR(w.Allocate(ctx, cuda::ApplyWorkspaceBytes(kDType<T>, layout)));
    return LaunchStatus(
        cuda::ApplyStatistics(kDType<T>, layout, d.x, d.scale, d.offset, d.mean, d.mean_lo,
                              d.variance, epsilon, d.y, w.data(), w.bytes(), OpStream(ctx)),
        "TfbnBatchNormApply");
  }

  template <typename T, typename U>
  static absl::Status GradSums(OpKernelContext* ctx, const Layout& layout, const T* dy, const T* x,
                               const U* mean, const U* mean_lo, double* sums) {
    Workspace w;
    TF_RETURN_IF_ERROR(w.Allocate(ctx, cuda::GradSumsWorkspaceBytes(kDType<T>, layout)));
    return LaunchStatus(cuda::GradSums(kDType<T>, layout, dy, x, mean, mean_lo, sums, w.data(),
                                       w.bytes(), OpStream(ctx)),
                        "TfbnBatchNormGradSums");
  }

  template <typename T, typename U>
  static absl::Status GradApply(OpKernelContext* ctx, const Layout& layout,
                                const GradApplyData<T, U>& d, float epsilon) {
    Workspace w;
    TF_RETURN_IF_ERROR(w.Allocate(ctx, cuda::GradApplyWorkspaceBytes(kDType<T>, layout)));
    return LaunchStatus(cuda::ApplyGradWithSums(
                            kDType<T>, layout, d.dy, d.x, d.scale, d.mean, d.mean_lo, d.variance,
                            d.local_sums, d.global_sums, d.global_rows, d.count, d.weights, epsilon,
                            d.dx, d.dscale, d.doffset, w.data(), w.bytes(), OpStream(ctx)),
                        "TfbnBatchNormGradApply");
  }
};

// No input is HostMemory: the host needs shapes only.
TFBN_REGISTER_SPLIT_OPS(DEVICE_GPU, GpuSplitLauncher)

}  // namespace
}  // namespace tfbn
