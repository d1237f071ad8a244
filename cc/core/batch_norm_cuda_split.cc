// The split op family's CUDA launchers (batch_norm_cuda.h): statistics | merge | apply and
// the gradient's sums | apply. The unweighted steps run the fused op's reductions and
// elementwise kernels with finalize and coefficient kernels of their own
// (cuda/split_kernels.cuh) that evaluate the fused finalize's formulas, so one part merged
// gives the fused op's statistics, and the apply steps its outputs, bit for bit. The
// weighted steps have kernels of their own on the same partition.
#include <algorithm>

#include "core/batch_norm_cuda.h"
#include "core/cuda/kernel_names.h"
#include "core/cuda/launch_plans.h"

namespace tfbn {
namespace cuda {
namespace {

constexpr int kApplyCoefRows = 4;     // hi, lo, a, b
constexpr int kGradApplyCoefRows = 5;  // hi, lo, ga, gb, gc
constexpr int kWeightedGridCap = 1 << 20;

const char* ParamName(DType dtype) { return dtype == DType::kDouble ? "double" : "float"; }

std::string Kernel(const char* name) { return std::string("tfbn::cuda::") + name; }
std::string Kernel(const char* name, std::initializer_list<std::string> args) {
  return Instance(Kernel(name), args);
}

std::string SplitMomentsFinalizeName(DType t) {
  return Kernel("SplitMomentsFinalizeKernel", {DeviceTypeName(t)});
}
std::string MergeMomentsName(DType param) {
  return Kernel("MergeMomentsKernel", {ParamName(param)});
}
std::string StatisticsCoefName(DType t) { return Kernel("StatisticsCoefKernel", {ParamName(t)}); }
std::string GradSumsFinalizeName() { return Kernel("GradSumsFinalizeKernel"); }
std::string SumsGradCoefName(DType t) { return Kernel("SumsGradCoefKernel", {ParamName(t)}); }
std::string WeightInfoName() { return Kernel("WeightInfoKernel"); }
std::string WeightedReduceRowsName(DType t) {
  return Kernel("WeightedReduceRowsKernel", {DeviceTypeName(t)});
}
std::string WeightedReducePlanesName(DType t, int tpc) {
  return Kernel("WeightedReducePlanesKernel", {DeviceTypeName(t), std::to_string(tpc)});
}
std::string WeightedMomentsFinalizeName(DType t) {
  return Kernel("WeightedMomentsFinalizeKernel", {DeviceTypeName(t)});
}
std::string WeightedGradApplyName(DType t) {
  return Kernel("WeightedGradApplyKernel", {DeviceTypeName(t)});
}

Dim3 ChannelGrid(int64_t C) { return {static_cast<unsigned>(CeilDiv(C, kThreads)), 1, 1}; }

// The weighted kernels load one element at a time: the generic partition for that width.
ReducePlan WeightedPlan(const Layout& layout) { return MakeReducePlan(layout, 1, true); }

}  // namespace

// Workspace: the partials [nb][2][C], then (weighted) the WeightInfo.
size_t StatsWorkspaceBytes(DType dtype, const Layout& layout, bool weighted) {
  if (!weighted)
    return MakeWorkspacePlan(layout, MakeReducePlan(layout, VecOf(dtype), true), 8, 0).total();
  return MakeWorkspacePlan(layout, WeightedPlan(layout), 8, 0).total() + AlignUp(kWeightInfoBytes);
}

Result PartialMoments(DType dtype, const Layout& layout, const void* x, const float* weights,
                      double* partial, void* workspace, size_t workspace_bytes, Stream stream) {
  const int64_t C = layout.channels, m = layout.per_channel();
  if (C == 0) return kSuccess;
  if (workspace_bytes < StatsWorkspaceBytes(dtype, layout, weights != nullptr))
    return kInvalidValue;
  double* parts = static_cast<double*>(workspace);
  if (weights == nullptr) {
    const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
    if (!GridFits(layout, plan)) return kInvalidValue;
    if (plan.nb > 0) {
      const int width = LoadWidth(dtype, plan.rows ? C : layout.inner, {x});
      const ReduceArgs reduce{x, nullptr, nullptr, nullptr, layout.inner};
      TFBN_LAUNCH(LaunchReduce(OpName("MomentsOp", dtype), dtype, reduce, layout, plan, width,
                               parts, stream));
    }
    return Launch(SplitMomentsFinalizeName(dtype), FinalizeGrid(C), FinalizeBlock(C), 0, stream, x,
                  layout.inner, C, plan.nb, m, static_cast<const double*>(parts), partial);
  }
  const ReducePlan plan = WeightedPlan(layout);
  if (!GridFits(layout, plan)) return kInvalidValue;
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, 8, 0);
  void* info = static_cast<char*>(workspace) + w.total();
  const void* wp = weights;
  TFBN_LAUNCH(
      Launch(WeightInfoName(), {1, 1, 1}, {kFinalizeThreads, 1, 1}, 0, stream, wp, m, info));
  const void* ci = info;
  if (plan.nb > 0) {
    const Dim3 grid{static_cast<unsigned>(plan.grid()), 1, 1};
    if (plan.rows) {
      TFBN_LAUNCH(Launch(WeightedReduceRowsName(dtype), grid,
                         {static_cast<unsigned>(plan.tx), static_cast<unsigned>(plan.ty), 1}, 0,
                         stream, x, wp, ci, layout.outer, C, plan.tiles, plan.nb, parts));
    } else {
      TFBN_LAUNCH(Launch(WeightedReducePlanesName(dtype, plan.tpc), grid, {kThreads, 1, 1}, 0,
                         stream, x, wp, ci, layout.outer, C, layout.inner, plan.nb, parts));
    }
  }
  return Launch(WeightedMomentsFinalizeName(dtype), FinalizeGrid(C), FinalizeBlock(C), 0, stream, x,
                layout.inner, C, plan.nb, m, ci, static_cast<const double*>(parts), partial);
}

Result MergeMoments(DType param_dtype, int64_t parts, int64_t channels, const double* partials,
                    void* mean, void* variance, void* mean_lo, double* count, Stream stream) {
  if (channels == 0) return kSuccess;
  if (parts < 0 || channels > INT32_MAX) return kInvalidValue;
  const DType p = param_dtype == DType::kDouble ? DType::kDouble : DType::kFloat;
  return Launch(MergeMomentsName(p), ChannelGrid(channels), {kThreads, 1, 1}, 0, stream, parts,
                channels, partials, mean, variance, mean_lo, count);
}

size_t ApplyWorkspaceBytes(DType dtype, const Layout& layout) {
  return MakeWorkspacePlan(layout, ReducePlan{}, ParamBytes(dtype), kApplyCoefRows).total();
}

Result ApplyStatistics(DType dtype, const Layout& layout, const void* x, const void* scale,
                       const void* offset, const void* mean, const void* mean_lo,
                       const void* variance, float epsilon, void* y, void* workspace,
                       size_t workspace_bytes, Stream stream) {
  const int64_t C = layout.channels;
  if (C == 0) return kSuccess;
  if (workspace_bytes < ApplyWorkspaceBytes(dtype, layout) || C > INT32_MAX) return kInvalidValue;
  void* coef = workspace;
  TFBN_LAUNCH(Launch(StatisticsCoefName(dtype), ChannelGrid(C), {kThreads, 1, 1}, 0, stream, C,
                     scale, offset, mean, mean_lo, variance, epsilon, coef));
  return LaunchApply(OpName("ForwardApply", dtype), 1, dtype, x, nullptr, coef, y, layout, stream);
}

size_t GradSumsWorkspaceBytes(DType dtype, const Layout& layout) {
  return MakeWorkspacePlan(layout, MakeReducePlan(layout, VecOf(dtype), true), 8, 0).total();
}

Result GradSums(DType dtype, const Layout& layout, const void* dy, const void* x, const void* mean,
                const void* mean_lo, double* sums, void* workspace, size_t workspace_bytes,
                Stream stream) {
  const int64_t C = layout.channels;
  if (C == 0) return kSuccess;
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
  if (workspace_bytes < GradSumsWorkspaceBytes(dtype, layout) || !GridFits(layout, plan))
    return kInvalidValue;
  double* parts = static_cast<double*>(workspace);
  if (plan.nb > 0) {
    const int width = LoadWidth(dtype, plan.rows ? C : layout.inner, {dy, x});
    const ReduceArgs reduce{dy, x, mean, mean_lo, layout.inner};
    TFBN_LAUNCH(LaunchReduce(OpName("GradSumsOp", dtype), dtype, reduce, layout, plan, width, parts,
                             stream));
  }
  return Launch(GradSumsFinalizeName(), FinalizeGrid(C), FinalizeBlock(C), 0, stream, C, plan.nb,
                static_cast<const double*>(parts), sums);
}

// Workspace: the coefficients, then the WeightInfo (used when weighted).
size_t GradApplyWorkspaceBytes(DType dtype, const Layout& layout) {
  return MakeWorkspacePlan(layout, ReducePlan{}, ParamBytes(dtype), kGradApplyCoefRows).total() +
         AlignUp(kWeightInfoBytes);
}

Result ApplyGradWithSums(DType dtype, const Layout& layout, const void* dy, const void* x,
                         const void* scale, const void* mean, const void* mean_lo,
                         const void* variance, const double* local_sums, const double* global_sums,
                         int64_t global_rows, const double* count, const float* weights,
                         float epsilon, void* dx, void* dscale, void* doffset, void* workspace,
                         size_t workspace_bytes, Stream stream) {
  const int64_t C = layout.channels, m = layout.per_channel();
  if (C == 0) return kSuccess;
  if (global_rows != 2 && global_rows != 4) return kInvalidValue;
  if (workspace_bytes < GradApplyWorkspaceBytes(dtype, layout) || C > INT32_MAX)
    return kInvalidValue;
  void* coef = workspace;
  const size_t coef_bytes =
      MakeWorkspacePlan(layout, ReducePlan{}, ParamBytes(dtype), kGradApplyCoefRows).total();
  void* info = weights ? static_cast<char*>(workspace) + coef_bytes : nullptr;
  const void* wp = weights;
  if (weights) {
    TFBN_LAUNCH(
        Launch(WeightInfoName(), {1, 1, 1}, {kFinalizeThreads, 1, 1}, 0, stream, wp, m, info));
  }
  const void* ci = info;
  const bool empty = m == 0;
  TFBN_LAUNCH(Launch(SumsGradCoefName(dtype), ChannelGrid(C), {kThreads, 1, 1}, 0, stream, C, empty,
                     scale, mean, mean_lo, variance, local_sums, global_sums, global_rows, count,
                     ci, epsilon, dscale, doffset, coef));
  if (!weights)
    return LaunchApply(OpName("GradApply", dtype), 2, dtype, dy, x, coef, dx, layout, stream);
  if (layout.size() == 0) return kSuccess;
  const int64_t blocks = std::min<int64_t>(CeilDiv(layout.size(), kThreads), kWeightedGridCap);
  const void* cc = coef;
  return Launch(WeightedGradApplyName(dtype), {static_cast<unsigned>(blocks), 1, 1},
                {kThreads, 1, 1}, 0, stream, dy, x, wp, ci, cc, dx, layout.size(), C, layout.inner);
}

void ForEachSplitKernelName(const NameSink& sink) {
  for (DType t : kAllDTypes) {
    // The reductions and elementwise operators are the fused op's (listed there too; the
    // build takes each name once).
    ForEachReduceName(OpName("MomentsOp", t), t, sink);
    ForEachReduceName(OpName("GradSumsOp", t), t, sink);
    ForEachApplyName(OpName("ForwardApply", t), t, sink);
    ForEachApplyName(OpName("GradApply", t), t, sink);
    sink(SplitMomentsFinalizeName(t));
    sink(WeightedReduceRowsName(t));
    for (int tpc : {kSmallTPC, kThreads}) sink(WeightedReducePlanesName(t, tpc));
    sink(WeightedMomentsFinalizeName(t));
    sink(WeightedGradApplyName(t));
  }
  for (DType p : {DType::kFloat, DType::kDouble}) {
    sink(MergeMomentsName(p));
    sink(StatisticsCoefName(p));
    sink(SumsGradCoefName(p));
  }
  sink(GradSumsFinalizeName());
  sink(WeightInfoName());
}

}  // namespace cuda
}  // namespace tfbn
