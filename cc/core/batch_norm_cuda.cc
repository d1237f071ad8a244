// The fused op's CUDA launchers (batch_norm_cuda.h): the reduction, finalize and apply
// kernels of cuda/kernels.cu, planned and launched from the host.
#include "core/batch_norm_cuda.h"

#include "core/cuda/kernel_names.h"
#include "core/cuda/launch_plans.h"

namespace tfbn {
namespace cuda {
namespace {

constexpr int kForwardCoefRows = 4;   // hi, lo, a, b
constexpr int kBackwardCoefRows = 5;  // hi, lo, ga, gb, gc

std::string ForwardFinalizeName(DType dtype) {
  return Instance("tfbn::cuda::ForwardFinalizeKernel", {DeviceTypeName(dtype)});
}
std::string BackwardFinalizeName(DType dtype) {
  return Instance("tfbn::cuda::BackwardFinalizeKernel",
                  {dtype == DType::kDouble ? "double" : "float"});
}

}  // namespace

size_t ForwardWorkspaceBytes(DType dtype, const Layout& layout, bool training) {
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), training);
  return MakeWorkspacePlan(layout, plan, ParamBytes(dtype), kForwardCoefRows).total();
}

size_t BackwardWorkspaceBytes(DType dtype, const Layout& layout) {
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
  return MakeWorkspacePlan(layout, plan, ParamBytes(dtype), kBackwardCoefRows).total();
}

Result BatchNormForward(DType dtype, const Layout& layout, const void* x, const void* scale,
                        const void* offset, const void* mean, const void* variance,
                        const ForwardArgs& args, void* y, void* batch_mean, void* batch_variance,
                        void* mean_lo, void* workspace, size_t workspace_bytes, Stream stream) {
  if (args.activation != Activation::kIdentity) return kNotSupported;
  const int64_t C = layout.channels;
  if (C == 0) return kSuccess;
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), args.training);
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, ParamBytes(dtype), kForwardCoefRows);
  if (workspace_bytes < w.total() || !GridFits(layout, plan)) return kInvalidValue;
  double* partial = static_cast<double*>(workspace);
  void* coef = static_cast<char*>(workspace) + w.partial_bytes;
  if (plan.nb > 0) {
    const int width = LoadWidth(dtype, plan.rows ? C : layout.inner, {x});
    const ReduceArgs reduce{x, nullptr, nullptr, nullptr, layout.inner};
    TFBN_LAUNCH(LaunchReduce(OpName("MomentsOp", dtype), dtype, reduce, layout, plan, width,
                             partial, stream));
  }
  const bool training = args.training;
  TFBN_LAUNCH(Launch(ForwardFinalizeName(dtype), FinalizeGrid(C), FinalizeBlock(C), 0, stream, x,
                     layout.inner, C, plan.nb, layout.per_channel(), partial, scale, offset, mean,
                     variance, args.epsilon, training, batch_mean, batch_variance, mean_lo, coef));
  return LaunchApply(OpName("ForwardApply", dtype), 1, dtype, x, nullptr, coef, y, layout, stream);
}

Result BatchNormBackward(DType dtype, const Layout& layout, const void* dy, const void* x,
                         const void* scale, const void* mean, const void* mean_lo,
                         const void* variance, const void* d_batch_mean,
                         const void* d_batch_variance, const ForwardArgs& args, void* dx,
                         void* dscale, void* doffset, void* workspace, size_t workspace_bytes,
                         Stream stream) {
  if (args.activation != Activation::kIdentity) return kNotSupported;
  const int64_t C = layout.channels;
  if (C == 0) return kSuccess;
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, ParamBytes(dtype), kBackwardCoefRows);
  if (workspace_bytes < w.total() || !GridFits(layout, plan)) return kInvalidValue;
  double* partial = static_cast<double*>(workspace);
  void* coef = static_cast<char*>(workspace) + w.partial_bytes;
  if (plan.nb > 0) {
    const int width = LoadWidth(dtype, plan.rows ? C : layout.inner, {dy, x});
    const ReduceArgs reduce{dy, x, mean, mean_lo, layout.inner};
    TFBN_LAUNCH(LaunchReduce(OpName("GradSumsOp", dtype), dtype, reduce, layout, plan, width,
                             partial, stream));
  }
  const bool training = args.training;
  TFBN_LAUNCH(Launch(BackwardFinalizeName(dtype), FinalizeGrid(C), FinalizeBlock(C), 0, stream, C,
                     plan.nb, layout.per_channel(), partial, scale, mean, mean_lo, variance,
                     d_batch_mean, d_batch_variance, args.epsilon, training, dscale, doffset,
                     coef));
  if (training)
    return LaunchApply(OpName("GradApply", dtype), 2, dtype, dy, x, coef, dx, layout, stream);
  return LaunchApply(OpName("GradApplyDyOnly", dtype), 1, dtype, dy, nullptr, coef, dx, layout,
                     stream);
}

void ForEachFusedKernelName(const NameSink& sink) {
  for (DType t : kAllDTypes) {
    ForEachReduceName(OpName("MomentsOp", t), t, sink);
    ForEachReduceName(OpName("GradSumsOp", t), t, sink);
    sink(ForwardFinalizeName(t));
    for (const char* op : {"ForwardApply", "GradApply", "GradApplyDyOnly"})
      ForEachApplyName(OpName(op, t), t, sink);
  }
  sink(BackwardFinalizeName(DType::kFloat));
  sink(BackwardFinalizeName(DType::kDouble));
}

}  // namespace cuda
}  // namespace tfbn
