// The fused epilogue's CUDA launchers (batch_norm_cuda.h): y = act(BN(x) + residual) and
// its gradient, with the kernels of cuda/epilogue_kernels.cuh and the generic reduction,
// finalize and apply kernels.
//
// Forward: moments (the plain op's), a finalize that rounds the variance to U where there
// is an activation (as the CPU epilogue), and a generic apply pass with the residual as
// its second input. Backward: a small pass writes hi, lo, a, b (z needs them per element),
// the sums of dz and dz * xc recompute z from x and the residual, the plain finalize turns
// them into ga, gb, gc, and the last pass recomputes dz once more and writes dx and
// dresidual: no full-size temporary, and dz never passes through T on its way to dx.
#include <algorithm>
#include <climits>
#include <string>

#include "core/activation.h"
#include "core/batch_norm_cuda.h"
#include "core/cuda/kernel_names.h"
#include "core/cuda/launch_plans.h"

namespace tfbn {
namespace cuda {
namespace {

constexpr int kForwardCoefRows = 4;   // hi, lo, a, b
constexpr int kBackwardCoefRows = 7;  // hi, lo, ga, gb, gc, a, b
constexpr unsigned kPrepareThreads = 256;

std::string U(DType dtype) { return dtype == DType::kDouble ? "double" : "float"; }
std::string Act(int act) { return std::to_string(act); }

std::string ForwardFinalizeName(DType dtype) {
  return Instance("tfbn::cuda::EpilogueForwardFinalizeKernel", {DeviceTypeName(dtype)});
}
std::string BackwardFinalizeName(DType dtype) {
  return Instance("tfbn::cuda::BackwardFinalizeKernel", {U(dtype)});
}
std::string PrepareName(DType dtype) {
  return Instance("tfbn::cuda::EpiloguePrepareKernel", {U(dtype)});
}
std::string ForwardApplyOp(DType dtype, int act, bool residual) {
  return Instance("tfbn::cuda::EpilogueForwardApply",
                  {DeviceTypeName(dtype), Act(act), residual ? "true" : "false"});
}
std::string GradSumsOp(DType dtype, int act) {
  return Instance("tfbn::cuda::EpilogueGradSumsOp", {DeviceTypeName(dtype), Act(act)});
}
std::string GradRowsName(DType dtype, int act) {
  return Instance("tfbn::cuda::EpilogueGradRowsKernel", {DeviceTypeName(dtype), Act(act)});
}
std::string GradFlatName(DType dtype, int act, int v) {
  return Instance("tfbn::cuda::EpilogueGradFlatKernel",
                  {DeviceTypeName(dtype), Act(act), std::to_string(v)});
}

// The last backward pass, planned as LaunchApply plans the generic one (two inputs' worth
// of loads in flight; a group that would span two planes falls back to single elements).
Result LaunchGradApply(DType dtype, int act, const void* dy, const void* x, const void* res,
                       const void* coef, bool full, void* dx, void* dres, const Layout& layout,
                       Stream stream) {
  const int V = VecOf(dtype);
  if (layout.size() == 0) return kSuccess;
  const bool ptrs = Aligned16(dy) && Aligned16(x) && Aligned16(dx) && Aligned16(res) &&
                    Aligned16(dres);  // nullptr counts as aligned
  if (layout.inner == 1 && layout.channels % V == 0 && ptrs) {
    const std::string name = GradRowsName(dtype, act);
    const int64_t groups = layout.channels / V;
    const int tx = Pow2AtLeast(groups, 32), ty = kThreads / tx;
    const int64_t tiles = CeilDiv(groups, tx);
    const int64_t resident = ResidentBlocks(name, kThreads, stream);
    const int64_t row_blocks =
        std::min(GridOf(CeilDiv(layout.outer, int64_t{ty} * UnrollFor(2)),
                        resident > 0 ? std::max<int64_t>(1, resident / tiles) : 0),
                 kMaxGridY);
    return Launch(name, {static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks), 1},
                  {static_cast<unsigned>(tx), static_cast<unsigned>(ty), 1}, 0, stream, dy, x, res,
                  coef, full, dx, dres, layout.outer, layout.channels);
  }
  const int v = layout.inner > 1 && layout.inner % V == 0 && ptrs ? V : 1;
  const std::string name = GradFlatName(dtype, act, v);
  const int64_t groups = CeilDiv(layout.size(), v);
  const int64_t needed = CeilDiv(groups, int64_t{kThreads} * UnrollFor(2));
  const int64_t blocks = std::min<int64_t>(
      ElementBytes(dtype) == 2 ? GridOf(needed, ResidentBlocks(name, kThreads, stream)) : needed,
      int64_t{1} << 20);
  const int64_t step = blocks * kThreads * v;
  const int64_t step_i = step % layout.inner;
  const int64_t step_c = (step / layout.inner) % layout.channels;
  return Launch(name, {static_cast<unsigned>(blocks), 1, 1}, {kThreads, 1, 1}, 0, stream, dy, x,
                res, coef, full, dx, dres, layout.size(), layout.channels, layout.inner, step_i,
                step_c);
}

}  // namespace

// The plain forward's: the same reduction and the same four coefficient rows.
size_t ForwardEpilogueWorkspaceBytes(DType dtype, const Layout& layout, bool training) {
  return ForwardWorkspaceBytes(dtype, layout, training);
}

size_t BackwardEpilogueWorkspaceBytes(DType dtype, const Layout& layout) {
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
  return MakeWorkspacePlan(layout, plan, ParamBytes(dtype), kBackwardCoefRows).total();
}

Result BatchNormForwardEpilogue(DType dtype, const Layout& layout, const void* x, const void* scale,
                                const void* offset, const void* mean, const void* variance,
                                const void* residual, const ForwardArgs& args, void* y,
                                void* batch_mean, void* batch_variance, void* mean_lo,
                                void* workspace, size_t workspace_bytes, Stream stream) {
  const int64_t C = layout.channels;
  if (C == 0) return kSuccess;
  const int act = static_cast<int>(args.activation);
  if (act < 0 || act >= kNumActivations) return kInvalidValue;
  // Nothing to add or activate: the plain op's kernels, the same math (so the epilogue's
  // apply kernels for that case are not built).
  if (args.activation == Activation::kIdentity && residual == nullptr)
    return BatchNormForward(dtype, layout, x, scale, offset, mean, variance, args, y, batch_mean,
                            batch_variance, mean_lo, workspace, workspace_bytes, stream);
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
  const bool variance_as_u = args.activation != Activation::kIdentity;
  TFBN_LAUNCH(Launch(ForwardFinalizeName(dtype), FinalizeGrid(C), FinalizeBlock(C), 0, stream, x,
                     layout.inner, C, plan.nb, layout.per_channel(), partial, scale, offset, mean,
                     variance, args.epsilon, training, variance_as_u, batch_mean, batch_variance,
                     mean_lo, coef));
  const bool has_res = residual != nullptr;
  return LaunchApply(ForwardApplyOp(dtype, act, has_res), has_res ? 2 : 1, dtype, x, residual, coef,
                     y, layout, stream);
}

Result BatchNormBackwardEpilogue(DType dtype, const Layout& layout, const void* dy, const void* x,
                                 const void* scale, const void* offset, const void* residual,
                                 const void* mean, const void* mean_lo, const void* variance,
                                 const void* d_batch_mean, const void* d_batch_variance,
                                 const ForwardArgs& args, void* dx, void* dresidual, void* dscale,
                                 void* doffset, void* workspace, size_t workspace_bytes,
                                 Stream stream) {
  const int64_t C = layout.channels;
  if (C == 0) return kSuccess;
  const int act = static_cast<int>(args.activation);
  if (act < 0 || act >= kNumActivations) return kInvalidValue;
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, ParamBytes(dtype), kBackwardCoefRows);
  if (workspace_bytes < w.total() || !GridFits(layout, plan)) return kInvalidValue;
  double* partial = static_cast<double*>(workspace);
  void* coef = static_cast<char*>(workspace) + w.partial_bytes;
  TFBN_LAUNCH(Launch(PrepareName(dtype), {static_cast<unsigned>(CeilDiv(C, kPrepareThreads)), 1, 1},
                     {kPrepareThreads, 1, 1}, 0, stream, C, scale, offset, mean, mean_lo, variance,
                     args.epsilon, coef));
  if (plan.nb > 0) {
    const int width = LoadWidth(dtype, plan.rows ? C : layout.inner, {dy, x, residual});
    ReduceArgs reduce{dy, x, nullptr, nullptr, layout.inner};
    reduce.c = residual;
    reduce.coef = coef;
    reduce.channels = C;
    TFBN_LAUNCH(
        LaunchReduce(GradSumsOp(dtype, act), dtype, reduce, layout, plan, width, partial, stream));
  }
  const bool training = args.training;
  TFBN_LAUNCH(Launch(BackwardFinalizeName(dtype), FinalizeGrid(C), FinalizeBlock(C), 0, stream, C,
                     plan.nb, layout.per_channel(), partial, scale, mean, mean_lo, variance,
                     d_batch_mean, d_batch_variance, args.epsilon, training, dscale, doffset,
                     coef));
  return LaunchGradApply(dtype, act, dy, x, residual, coef, training, dx, dresidual, layout,
                         stream);
}

void ForEachEpilogueKernelName(const NameSink& sink) {
  for (DType t : kAllDTypes) {
    sink(ForwardFinalizeName(t));
    for (int act = 0; act < kNumActivations; ++act) {
      for (bool res : {false, true})
        if (act != 0 || res) ForEachApplyName(ForwardApplyOp(t, act, res), t, sink);
      ForEachReduceName(GradSumsOp(t, act), t, sink);
      sink(GradRowsName(t, act));
      sink(GradFlatName(t, act, VecOf(t)));
      sink(GradFlatName(t, act, 1));
    }
  }
  for (DType t : {DType::kFloat, DType::kDouble}) sink(PrepareName(t));
}

}  // namespace cuda
}  // namespace tfbn
