// CPU kernels of the split op family (split_ops.cc): the bodies of split_op.h with the
// core's CPU entry points on TensorFlow's intra-op thread pool.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <vector>

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/cpu_parallel.h"
#include "tf/op_kernel_base.h"
#include "tf/split_op.h"

namespace tfbn {
namespace {

using tensorflow::OpKernelContext;

struct CpuSplitLauncher {
  // Host memory: the weights are checked before any work starts.
  static constexpr bool kWeightsOnHost = true;
  // ApplyStatistics reads each element of x before it writes that element of y.
  static constexpr bool kApplyYMayTakeX = true;

  template <typename T>
  static absl::Status Stats(OpKernelContext* ctx, const Layout& layout, const T* x,
                            const float* weights, double* partial) {
    if (weights)
      WeightedPartialMoments<T>(layout, x, weights, partial, IntraOpParallelFor(ctx));
    else
      PartialMoments<T>(layout, x, partial, IntraOpParallelFor(ctx));
    return absl::OkStatus();
  }

  template <typename U>
  static absl::Status Merge(OpKernelContext*, int64_t parts, int64_t C, const double* partials,
                            U* mean, U* variance, U* mean_lo, double* count) {
    std::vector<double> merged(static_cast<size_t>(kPartialRows * C));
    MergeMoments(parts, C, partials, merged.data());
    FinalizeMoments<U>(C, merged.data(), mean, mean_lo, variance);
    std::copy(merged.begin(), merged.begin() + C, count);
    return absl::OkStatus();
  }

  template <typename T, typename U>
  static absl::Status Apply(OpKernelContext* ctx, const Layout& layout, const ApplyData<T, U>& d,
                            float epsilon) {
    ApplyStatistics<T, U>(layout, d.x, d.scale, d.offset, d.mean, d.mean_lo, d.variance, epsilon,
                          d.y, IntraOpParallelFor(ctx));
    return absl::OkStatus();
  }

  template <typename T, typename U>
  static absl::Status GradSums(OpKernelContext* ctx, const Layout& layout, const T* dy, const T* x,
                               const U* mean, const U* mean_lo, double* sums) {
    const int64_t C = layout.channels;
    std::vector<U> lo(static_cast<size_t>(C), U(0));  // the CPU GradSums takes no nullptr
    if (mean_lo) std::copy(mean_lo, mean_lo + C, lo.begin());
    tfbn::GradSums<T, U>(layout, dy, x, mean, lo.data(), sums, sums + C, IntraOpParallelFor(ctx));
    return absl::OkStatus();
  }

  template <typename T, typename U>
  static absl::Status GradApply(OpKernelContext* ctx, const Layout& layout,
                                const GradApplyData<T, U>& d, float epsilon) {
    // The weighted and the plain kernel take the same arguments, weights aside.
    auto run = [&](auto kernel, auto... weights_arg) {
      kernel(layout, d.dy, d.x, d.scale, d.mean, d.mean_lo, d.variance, d.local_sums, d.global_sums,
             d.global_rows, d.count, weights_arg..., epsilon, d.dx, d.dscale, d.doffset,
             IntraOpParallelFor(ctx));
    };
    if (d.weights)
      run(WeightedApplyGradWithSums<T, U>, d.weights);
    else
      run(ApplyGradWithSums<T, U>);
    return absl::OkStatus();
  }
};

TFBN_REGISTER_SPLIT_OPS(DEVICE_CPU, CpuSplitLauncher)

}  // namespace
}  // namespace tfbn
