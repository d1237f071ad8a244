// Plans and the generic launchers (launch_plans.h). How the constants were chosen:
// docs/tuning.md.
#include "core/cuda/launch_plans.h"

#include <algorithm>
#include <climits>

namespace tfbn {
namespace cuda {
namespace {

std::string Bool(bool b) { return b ? "true" : "false"; }

std::string RowsReduceName(const std::string& op, bool aligned) {
  return Instance("tfbn::cuda::ReduceRowsKernel", {op, Bool(aligned)});
}
std::string PlanesReduceName(const std::string& op, int vl, int tpc) {
  return Instance("tfbn::cuda::ReducePlanesKernel", {op, std::to_string(vl), std::to_string(tpc)});
}
std::string ApplyRowsName(const std::string& op) {
  return Instance("tfbn::cuda::ApplyRowsKernel", {op});
}
std::string ApplyFlatName(const std::string& op, int v, bool mixed) {
  return Instance("tfbn::cuda::ApplyFlatKernel", {op, std::to_string(v), Bool(mixed)});
}

}  // namespace

int Pow2AtLeast(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t GridOf(int64_t needed, int64_t resident) {
  return std::max<int64_t>(1, resident > 0 ? std::min(needed, resident) : needed);
}

std::string OpName(const char* templ, DType dtype) {
  return Instance(std::string("tfbn::cuda::") + templ, {DeviceTypeName(dtype)});
}

ReducePlan MakeReducePlan(const Layout& layout, int vec, bool reduce) {
  ReducePlan p;
  const int64_t C = layout.channels, m = layout.per_channel();
  p.rows = layout.inner == 1;
  if (!reduce || m == 0 || C == 0) return p;
  if (p.rows) {
    const int64_t groups = CeilDiv(C, vec);
    p.tx = Pow2AtLeast(groups, 32);
    p.ty = kThreads / p.tx;
    p.tiles = CeilDiv(groups, p.tx);
    const int64_t tile_channels = std::min<int64_t>(C, int64_t{p.tx} * vec);
    const int64_t want = std::min(CeilDiv(kTargetRowsBlocks, p.tiles),
                                  CeilDiv(m * tile_channels, kMinBlockElements));
    p.nb = std::clamp<int64_t>(want, 1, std::min(m, kMaxBlocks));
  } else {
    const int64_t groups = CeilDiv(m, vec);
    const int64_t want = std::min(CeilDiv(kTargetPlanesBlocks, C), CeilDiv(m, kMinBlockElements));
    p.nb = std::clamp<int64_t>(want, 1, std::min(groups, kMaxBlocks));
    // Little data per channel: kThreads / kSmallTPC channels share a block.
    if (CeilDiv(groups, p.nb) < int64_t{kThreads} * kMinGroupsPerThread) p.tpc = kSmallTPC;
    p.tiles = CeilDiv(C, kThreads / p.tpc);
  }
  return p;
}

bool GridFits(const Layout& layout, const ReducePlan& plan) {
  return plan.grid() <= INT_MAX && layout.channels <= INT_MAX;
}

WorkspacePlan MakeWorkspacePlan(const Layout& layout, const ReducePlan& plan, size_t param_bytes,
                                int coef_rows) {
  WorkspacePlan w;
  const size_t C = static_cast<size_t>(layout.channels);
  w.partial_bytes = AlignUp(static_cast<size_t>(plan.nb) * 2 * C * sizeof(double));
  w.coef_bytes = AlignUp(static_cast<size_t>(coef_rows) * C * param_bytes);
  return w;
}

Dim3 FinalizeBlock(int64_t C) {
  const unsigned fx = C <= 256 ? 8 : C <= 512 ? 16 : 32;
  return {fx, kFinalizeThreads / fx, 1};
}

int LoadWidth(DType dtype, int64_t period, std::initializer_list<const void*> pointers) {
  const size_t bytes = ElementBytes(dtype);
  int w = VecOf(dtype);
  for (; w > 1; w /= 2) {
    bool ok = period % w == 0;
    for (const void* p : pointers) ok = ok && reinterpret_cast<uintptr_t>(p) % (w * bytes) == 0;
    if (ok) break;
  }
  return w;
}

Result LaunchReduce(const std::string& op, DType dtype, const ReduceArgs& args,
                    const Layout& layout, const ReducePlan& plan, int width, double* partial,
                    Stream stream) {
  const int vec = VecOf(dtype);
  const Dim3 grid{static_cast<unsigned>(plan.grid()), 1, 1};
  if (!plan.rows) {
    return Launch(PlanesReduceName(op, width, plan.tpc), grid, {kThreads, 1, 1}, 0, stream, args,
                  layout.outer, layout.channels, layout.inner, plan.nb, partial);
  }
  const size_t smem = 2 * size_t{kThreads} * vec * sizeof(double);
  return Launch(RowsReduceName(op, width == vec), grid,
                {static_cast<unsigned>(plan.tx), static_cast<unsigned>(plan.ty), 1}, smem, stream,
                args, layout.outer, layout.channels, plan.tiles, plan.nb, partial);
}

void ForEachReduceName(const std::string& op, DType dtype, const NameSink& sink) {
  for (bool aligned : {true, false}) sink(RowsReduceName(op, aligned));
  for (int vl = VecOf(dtype); vl >= 1; vl /= 2)
    for (int tpc : {kSmallTPC, kThreads}) sink(PlanesReduceName(op, vl, tpc));
}

// The flat elementwise kernel. The grid: resident blocks only (each thread loops, as for
// rows) for 16-bit types and for groups that span two planes, one pass of the loop per
// thread for the other cases (docs/tuning.md).
static Result LaunchApplyFlat(const std::string& op, int inputs, DType dtype, int v, bool mixed,
                              const void* a, const void* b, const void* coef, void* out,
                              const Layout& layout, Stream stream) {
  const std::string name = ApplyFlatName(op, v, mixed);
  const bool resident_grid = mixed || ElementBytes(dtype) == 2;
  const int64_t groups = CeilDiv(layout.size(), v);
  const int64_t needed = CeilDiv(groups, int64_t{kThreads} * UnrollFor(inputs));
  const int64_t blocks = std::min<int64_t>(
      resident_grid ? GridOf(needed, ResidentBlocks(name, kThreads, stream)) : needed,
      int64_t{1} << 20);
  const int64_t step = blocks * kThreads * v;
  const int64_t step_i = step % layout.inner;
  const int64_t step_c = (step / layout.inner) % layout.channels;
  return Launch(name, {static_cast<unsigned>(blocks), 1, 1}, {kThreads, 1, 1}, 0, stream, a, b,
                coef, out, layout.size(), layout.channels, layout.inner, step_i, step_c);
}

Result LaunchApply(const std::string& op, int inputs, DType dtype, const void* a, const void* b,
                   const void* coef, void* out, const Layout& layout, Stream stream) {
  const int V = VecOf(dtype);
  if (layout.size() == 0) return kSuccess;
  const bool ptrs = Aligned16(a) && Aligned16(out) && (inputs == 1 || Aligned16(b));
  if (layout.inner == 1 && layout.channels % V == 0 && ptrs) {
    const std::string name = ApplyRowsName(op);
    const int64_t groups = layout.channels / V;
    const int tx = Pow2AtLeast(groups, 32), ty = kThreads / tx;
    const int64_t tiles = CeilDiv(groups, tx);
    const int64_t resident = ResidentBlocks(name, kThreads, stream);
    const int64_t row_blocks =
        std::min(GridOf(CeilDiv(layout.outer, int64_t{ty} * UnrollFor(inputs)),
                        resident > 0 ? std::max<int64_t>(1, resident / tiles) : 0),
                 kMaxGridY);
    return Launch(name, {static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks), 1},
                  {static_cast<unsigned>(tx), static_cast<unsigned>(ty), 1}, 0, stream, a, b, coef,
                  out, layout.outer, layout.channels);
  }
  if (layout.inner > 1 && layout.inner % V == 0 && ptrs)
    return LaunchApplyFlat(op, inputs, dtype, V, false, a, b, coef, out, layout, stream);
  if (layout.inner >= V && ptrs)
    return LaunchApplyFlat(op, inputs, dtype, V, true, a, b, coef, out, layout, stream);
  return LaunchApplyFlat(op, inputs, dtype, 1, false, a, b, coef, out, layout, stream);
}

void ForEachApplyName(const std::string& op, DType dtype, const NameSink& sink) {
  const int V = VecOf(dtype);
  sink(ApplyRowsName(op));
  sink(ApplyFlatName(op, V, false));
  sink(ApplyFlatName(op, V, true));
  sink(ApplyFlatName(op, 1, false));
}

}  // namespace cuda
}  // namespace tfbn
