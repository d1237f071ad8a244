// Plans (host): the reduction partition, the workspace layout, load widths and grids, and
// the launch helpers that pick a kernel variant for them.
// Part of the CUDA kernels: batch_norm_cuda.cu includes it (one translation unit, so the
// kernels and their launchers share one anonymous namespace).
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <initializer_list>

#include "core/cuda/apply_kernels.cuh"
#include "core/cuda/common.cuh"
#include "core/cuda/reduce_kernels.cuh"

namespace tfbn {
namespace cuda {
namespace {

// ---- plans (host) ----

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int Pow2AtLeast(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

// The reduction partition: a function of (layout, vector width) only.
struct ReducePlan {
  bool rows = false;  // inner == 1
  int tx = 1, ty = 1;  // rows: threads over channel groups x rows
  int tpc = kThreads;  // planes: threads per channel
  int64_t tiles = 1;   // rows: channel tiles of tx * kVec channels; planes: channel blocks
  int64_t nb = 0;      // blocks per channel (0: nothing to reduce)
  int64_t grid() const { return nb * tiles; }
};

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

size_t AlignUp(size_t n) { return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

struct WorkspacePlan {
  size_t partial_bytes = 0;  // [nb][2][C] doubles
  size_t coef_bytes = 0;     // [rows][C] U
  size_t total() const { return partial_bytes + coef_bytes; }
};

WorkspacePlan MakeWorkspacePlan(const Layout& layout, const ReducePlan& plan, size_t param_bytes,
                                int coef_rows) {
  WorkspacePlan w;
  const size_t C = static_cast<size_t>(layout.channels);
  w.partial_bytes = AlignUp(static_cast<size_t>(plan.nb) * 2 * C * sizeof(double));
  w.coef_bytes = AlignUp(static_cast<size_t>(coef_rows) * C * param_bytes);
  return w;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Finalize kernels: FX channels x FY partial rows per block. Few channels get narrow
// blocks, so that more blocks (and rows of threads) share the merge of up to kMaxBlocks
// partial rows, which is a chain of dependent loads per thread.
dim3 FinalizeBlock(int64_t C) {
  const int fx = C <= 256 ? 8 : C <= 512 ? 16 : 32;
  return dim3(fx, kFinalizeThreads / fx);
}

// The widest load (elements: a power of two up to kVec) that keeps each load of a group
// inside one row (period C) or plane (period inner) and aligned for every pointer given.
template <typename T>
int LoadWidth(int64_t period, std::initializer_list<const void*> pointers) {
  int w = kVec<T>;
  for (; w > 1; w /= 2) {
    bool ok = period % w == 0;
    for (const void* p : pointers) ok = ok && reinterpret_cast<uintptr_t>(p) % (w * sizeof(T)) == 0;
    if (ok) break;
  }
  return w;
}

template <class Op, int VL = kVec<typename Op::T>>
void LaunchReducePlanes(const Op& op, const Layout& layout, const ReducePlan& plan, int width,
                        double* partial, cudaStream_t stream) {
  if constexpr (VL > 1) {
    if (width < VL) return LaunchReducePlanes<Op, VL / 2>(op, layout, plan, width, partial, stream);
  }
  const unsigned grid = static_cast<unsigned>(plan.grid());
  if (plan.tpc == kSmallTPC)
    ReducePlanesKernel<Op, VL, kSmallTPC><<<grid, kThreads, 0, stream>>>(
        op, layout.outer, layout.channels, layout.inner, plan.nb, partial);
  else
    ReducePlanesKernel<Op, VL, kThreads><<<grid, kThreads, 0, stream>>>(
        op, layout.outer, layout.channels, layout.inner, plan.nb, partial);
}

// width: LoadWidth of the inputs (rows: whole vectors or single elements).
template <class Op>
void LaunchReduce(const Op& op, const Layout& layout, const ReducePlan& plan, int width,
                  double* partial, cudaStream_t stream) {
  using T = typename Op::T;
  if (!plan.rows) return LaunchReducePlanes(op, layout, plan, width, partial, stream);
  const unsigned grid = static_cast<unsigned>(plan.grid());
  const dim3 block(plan.tx, plan.ty);
  const size_t smem = 2 * size_t{kThreads} * kVec<T> * sizeof(double);
  if (width == kVec<T>)
    ReduceRowsKernel<Op, true><<<grid, block, smem, stream>>>(op, layout.outer, layout.channels,
                                                              plan.tiles, plan.nb, partial);
  else
    ReduceRowsKernel<Op, false><<<grid, block, smem, stream>>>(op, layout.outer, layout.channels,
                                                               plan.tiles, plan.nb, partial);
}

// Blocks of Kernel (kThreads threads, no dynamic shared memory) that the current device
// holds at once: the grid of the grid-stride elementwise kernels, so that each thread loads
// its coefficients once and then streams. Cached per kernel and device; 0 when the runtime
// cannot say (the caller then launches one block per piece of work).
template <auto Kernel>
int64_t ResidentBlocks() {
  constexpr int kDevices = 64;
  static std::atomic<int64_t> cache[kDevices];  // zero-initialized: static storage
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) {
    cudaGetLastError();
    return 0;
  }
  int64_t n = cache[device].load(std::memory_order_relaxed);
  if (n > 0) return n;
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  n = int64_t{sms} * std::max(per_sm, 1);
  cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// At most `resident` blocks (when known), at least one.
int64_t GridOf(int64_t needed, int64_t resident) {
  return std::max<int64_t>(1, resident > 0 ? std::min(needed, resident) : needed);
}

template <class Op, int V, bool kMixed>
void LaunchApplyFlat(const typename Op::T* a, const typename Op::T* b, const typename Op::U* coef,
                     typename Op::T* out, const Layout& layout, cudaStream_t stream) {
  // The grid: resident blocks only (each thread loops, as for rows) for 16-bit types and
  // for groups that span two planes, one pass of the loop per thread for the other cases
  // (docs/tuning.md).
  constexpr auto kKernel = ApplyFlatKernel<Op, V, kMixed>;
  constexpr bool kResidentGrid = kMixed || sizeof(typename Op::T) == 2;
  const int64_t groups = CeilDiv(layout.size(), V);
  const int64_t needed = CeilDiv(groups, int64_t{kThreads} * kUnroll<Op>);
  const int64_t blocks = std::min<int64_t>(
      kResidentGrid ? GridOf(needed, ResidentBlocks<kKernel>()) : needed, int64_t{1} << 20);
  const int64_t step = blocks * kThreads * V;
  const int64_t step_i = step % layout.inner;
  const int64_t step_c = (step / layout.inner) % layout.channels;
  kKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      a, b, coef, out, layout.size(), layout.channels, layout.inner, step_i, step_c);
}

// Elementwise pass: vectorized rows or planes when the layout and pointers allow it,
// otherwise one element per thread step (same results, vectors only change the loads).
template <class Op>
void LaunchApply(const typename Op::T* a, const typename Op::T* b, const typename Op::U* coef,
                 typename Op::T* out, const Layout& layout, cudaStream_t stream) {
  using T = typename Op::T;
  constexpr int V = kVec<T>;
  if (layout.size() == 0) return;
  const bool ptrs = Aligned16(a) && Aligned16(out) && (Op::kInputs == 1 || Aligned16(b));
  if (layout.inner == 1 && layout.channels % V == 0 && ptrs) {
    const int64_t groups = layout.channels / V;
    const int tx = Pow2AtLeast(groups, 32), ty = kThreads / tx;
    const int64_t tiles = CeilDiv(groups, tx);
    const int64_t resident = ResidentBlocks<ApplyRowsKernel<Op>>();
    const int64_t row_blocks =
        std::min(GridOf(CeilDiv(layout.outer, int64_t{ty} * kUnroll<Op>),
                        resident > 0 ? std::max<int64_t>(1, resident / tiles) : 0),
                 kMaxGridY);
    ApplyRowsKernel<Op>
        <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks)), dim3(tx, ty), 0,
           stream>>>(a, b, coef, out, layout.outer, layout.channels);
  } else if (layout.inner > 1 && layout.inner % V == 0 && ptrs) {
    LaunchApplyFlat<Op, V, false>(a, b, coef, out, layout, stream);
  } else if (layout.inner >= V && ptrs) {
    LaunchApplyFlat<Op, V, true>(a, b, coef, out, layout, stream);
  } else {
    LaunchApplyFlat<Op, 1, false>(a, b, coef, out, layout, stream);
  }
}

// Grid x of the reduction and finalize kernels is at most INT_MAX blocks.
bool GridFits(const Layout& layout, const ReducePlan& plan) {
  return plan.grid() <= INT_MAX && layout.channels <= INT_MAX;
}

}  // namespace
}  // namespace cuda
}  // namespace tfbn
