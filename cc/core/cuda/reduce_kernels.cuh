// Reductions: the two per-channel sums of the forward (moments) and backward (gradient
// sums) passes, written as per-block double partials.
// Part of the device sources (kernels.cu, compiled by NVRTC).
#pragma once

#include "core/cuda/common.cuh"

namespace tfbn {
namespace cuda {

// ---- reduction operators: two per-channel sums ----
// As the CPU kernels (cpu_reductions.inc): each element's terms are computed and summed in U
// over a fixed stretch of kFlush elements per accumulator, and each stretch is then added
// into double. The stretches are defined by the thread's element sequence, which depends
// on the shape only.

// Per-channel constants of an operator, in U.
template <typename U>
struct Center {
  U a, b;
};

// Moments: sums of d = x - shift and d^2, shift = U(first sample of the channel).
template <typename T_>
struct MomentsOp {
  using T = T_;
  using U = ParamT<T>;
  static constexpr int kInputs = 1;
  const T* a;  // x
  const T* b;  // unused
  int64_t inner;
  __device__ explicit MomentsOp(const ReduceArgs& r)
      : a(static_cast<const T*>(r.a)), b(nullptr), inner(r.inner) {}
  __device__ Center<U> CenterOf(int64_t c) const { return {Num<T>::ToU(a[c * inner]), U(0)}; }
  __device__ static void Add(T va, T, const Center<U>& k, U& s1, U& s2) {
    const U d = Num<T>::ToU(va) - k.a;
    s1 += d;
    s2 += d * d;
  }
};

// Gradient sums: sum(dy) and sum(dy * ((x - hi) - lo)).
template <typename T_>
struct GradSumsOp {
  using T = T_;
  using U = ParamT<T>;
  static constexpr int kInputs = 2;
  const T* a;  // dy
  const T* b;  // x
  const U* hi;
  const U* lo;  // nullable
  __device__ explicit GradSumsOp(const ReduceArgs& r)
      : a(static_cast<const T*>(r.a)),
        b(static_cast<const T*>(r.b)),
        hi(static_cast<const U*>(r.hi)),
        lo(static_cast<const U*>(r.lo)) {}
  __device__ Center<U> CenterOf(int64_t c) const { return {hi[c], lo ? lo[c] : U(0)}; }
  __device__ static void Add(T va, T vb, const Center<U>& k, U& s1, U& s2) {
    const U g = Num<T>::ToU(va);
    s1 += g;
    s2 += g * ((Num<T>::ToU(vb) - k.a) - k.b);
  }
};

// A third input that is absent (nullptr) reads as zeros.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> ZeroPack() {
  Pack<T, N> r;
#pragma unroll
  for (int l = 0; l < N; ++l) r.v[l] = Num<T>::FromU(0);
  return r;
}

// One element's terms: the operator's Add with its two or three inputs.
template <class Op, typename T, class K, typename U>
__device__ __forceinline__ void AddTerms(T va, T vb, T vc, const K& k, U& s1, U& s2) {
  if constexpr (Op::kInputs == 3)
    Op::Add(va, vb, vc, k, s1, s2);
  else
    Op::Add(va, Op::kInputs == 2 ? vb : va, k, s1, s2);
}

// Loads kVec channels c0.. of one row; past C (misaligned path only) gives zero.
template <typename T, bool kAligned>
__device__ __forceinline__ Pack<T, kVec<T>> LoadRowGroup(const T* p, int64_t offset, int64_t left) {
  constexpr int V = kVec<T>;
  if constexpr (kAligned) {
    return LoadPack<T, V>(p + offset);
  } else {
    Pack<T, V> r;
#pragma unroll
    for (int l = 0; l < V; ++l) r.v[l] = l < left ? p[offset + l] : Num<T>::FromU(0);
    return r;
  }
}

// Rows layout [rows, C]. Block (tile, b): channels of tile, rows [Split(b), Split(b+1)).
// Thread (tx, ty) owns kVec channels and rows r = begin + ty + k * TY, summed in that order
// (kFlush rows per stretch); the TY partial sums of a channel are merged by a fixed tree
// in shared memory. The double sums live in that shared memory from the start (each thread
// its own slots), which leaves the registers to loads in flight.
template <class Op, bool kAligned>
__global__ void __launch_bounds__(kThreads, kReduceMinBlocks)
    ReduceRowsKernel(ReduceArgs args, int64_t rows, int64_t C, int64_t tiles, int64_t nb,
                     double* partial) {
  const Op op(args);
  using T = typename Op::T;
  using U = typename Op::U;
  constexpr int V = kVec<T>, kU = kReduceUnroll<Op>;
  static_assert(kFlush % kU == 0, "a stretch is whole unrolled steps");
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t tile = blockIdx.x % tiles, b = blockIdx.x / tiles;
  const int64_t c0 = (tile * TX + tx) * V;
  const int64_t r_end = Split(b + 1, nb, rows);
  // Shared memory [2][V][TY][TX] (TX * TY <= kThreads, TY a power of two for the merge
  // tree: the launch plan gives TX * TY == kThreads): lane l's slot is
  // l * kThreads past the thread's first, a constant offset from one address (an address
  // per lane, live across the loop, cost 2 * V registers); conflict-free across tx.
  extern __shared__ double smem[];
  double* const sm1 = smem + ty * TX + tx;
  double* const sm2 = sm1 + V * kThreads;
#pragma unroll
  for (int l = 0; l < V; ++l) {
    sm1[l * kThreads] = 0.0;
    sm2[l * kThreads] = 0.0;
  }
  if (c0 < C) {
    using K = decltype(op.CenterOf(c0));
    K center[V];
#pragma unroll
    for (int l = 0; l < V; ++l) center[l] = c0 + l < C ? op.CenterOf(c0 + l) : K{};
    const int64_t left = C - c0;
    for (int64_t r = Split(b, nb, rows) + ty; r < r_end;) {
      U a1[V], a2[V];
#pragma unroll
      for (int l = 0; l < V; ++l) a1[l] = a2[l] = U(0);
      for (int k = 0; k < kFlush && r < r_end; k += kU) {
        Pack<T, V> va[kU], vb[kU], vc[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t ru = r + int64_t{u} * TY;
          if (ru < r_end) {
            va[u] = LoadRowGroup<T, kAligned>(op.a, ru * C + c0, left);
            if constexpr (Op::kInputs >= 2)
              vb[u] = LoadRowGroup<T, kAligned>(op.b, ru * C + c0, left);
            if constexpr (Op::kInputs == 3)
              vc[u] = op.c ? LoadRowGroup<T, kAligned>(op.c, ru * C + c0, left) : ZeroPack<T, V>();
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (r + int64_t{u} * TY < r_end) {
#pragma unroll
            for (int l = 0; l < V; ++l)
              AddTerms<Op>(va[u].v[l], Op::kInputs >= 2 ? vb[u].v[l] : va[u].v[l],
                           Op::kInputs == 3 ? vc[u].v[l] : va[u].v[l], center[l], a1[l], a2[l]);
          }
        r += int64_t{kU} * TY;
      }
      // volatile: with constant offsets the compiler would otherwise keep the 2 * V double
      // sums in registers across the loop (2 * V * 2 registers), and spill.
      volatile double* v1 = sm1;
      volatile double* v2 = sm2;
#pragma unroll
      for (int l = 0; l < V; ++l) {
        v1[l * kThreads] = v1[l * kThreads] + static_cast<double>(a1[l]);
        v2[l * kThreads] = v2[l * kThreads] + static_cast<double>(a2[l]);
      }
    }
  }
  for (int s = TY / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        sm1[l * kThreads] += sm1[l * kThreads + s * TX];
        sm2[l * kThreads] += sm2[l * kThreads + s * TX];
      }
    }
  }
  if (ty == 0) {
#pragma unroll
    for (int l = 0; l < V; ++l)
      if (c0 + l < C) {
        partial[2 * b * C + c0 + l] = sm1[l * kThreads];
        partial[(2 * b + 1) * C + c0 + l] = sm2[l * kThreads];
      }
  }
}

// Loads the kVec elements g*kVec.. of channel c's [outer, inner] sequence, starting at
// (o, i), as kVec / VL loads of VL elements (inner % VL == 0 and data aligned to VL
// elements, so no load crosses a plane). Elements past m give zero and are not summed
// (valid is a multiple of VL). VL changes only the loads, never the element order.
template <typename T, int VL>
__device__ __forceinline__ Pack<T, kVec<T>> LoadPlaneGroup(const T* p, int64_t o, int64_t i,
                                                           int64_t inner, int64_t plane_stride,
                                                           int valid) {
  constexpr int V = kVec<T>;
  if constexpr (VL == V) {
    return LoadPack<T, V>(p + o * plane_stride + i);
  } else {
    Pack<T, V> r;
#pragma unroll
    for (int s = 0; s < V / VL; ++s) {
      Pack<T, VL> piece;
      if (s * VL < valid) {
        piece = LoadPack<T, VL>(p + o * plane_stride + i);
      } else {
#pragma unroll
        for (int l = 0; l < VL; ++l) piece.v[l] = Num<T>::FromU(0);
      }
#pragma unroll
      for (int l = 0; l < VL; ++l) r.v[s * VL + l] = piece.v[l];
      i += VL;
      if (i == inner) {
        i = 0;
        ++o;
      }
    }
    return r;
  }
}

// Planes layout [outer, C, inner]. A block holds kThreads / kTPC channels, kTPC threads
// each (several channels per block when a channel has little data, so that a block's
// fixed costs are spread over enough loads). Block (channel group, b) sums groups
// [Split(b), Split(b+1)) of each of its channels (a group is kVec consecutive elements of
// the channel's outer*inner sequence); thread t of a channel takes groups
// begin + t + k * kTPC in that order, kFlush / kVec groups per stretch, and the channel's
// threads merge by a fixed shuffle tree, then their warps in order.
// VL: the load width (see LoadPlaneGroup); VL == kVec: a group is one vector load.
template <class Op, int VL, int kTPC>
__global__ void __launch_bounds__(kThreads, kReduceMinBlocks)
    ReducePlanesKernel(ReduceArgs args, int64_t outer, int64_t C, int64_t inner, int64_t nb,
                       double* partial) {
  const Op op(args);
  using T = typename Op::T;
  using U = typename Op::U;
  constexpr int V = kVec<T>;
  constexpr int kStretch = kFlush / V;  // groups per stretch
  // kUnroll, not kReduceUnroll: the larger unroll costs a resident block per SM (see
  // docs/tuning.md).
  constexpr int kU = kUnroll<Op>;
  constexpr int kPerBlock = kThreads / kTPC, kWarps = kTPC / 32;
  static_assert(kStretch % kU == 0, "a stretch is whole unrolled steps");
  static_assert(kTPC % 32 == 0 && kThreads % kTPC == 0, "a channel has whole warps");
  __shared__ double smem[2][kThreads / 32];
  const int64_t channel_blocks = (C + kPerBlock - 1) / kPerBlock;
  const int sub = threadIdx.x / kTPC, t = threadIdx.x % kTPC;
  const int64_t c = (blockIdx.x % channel_blocks) * kPerBlock + sub;
  const int64_t b = blockIdx.x / channel_blocks;
  const int64_t m = outer * inner;
  const int64_t groups = (m + V - 1) / V;
  const int64_t g_end = Split(b + 1, nb, groups);
  double s1 = 0.0, s2 = 0.0;
  int64_t g = Split(b, nb, groups) + t;
  if (c < C && g < g_end) {
    const auto center = op.CenterOf(c);
    const int64_t plane_stride = C * inner;
    const T* pa = op.a + c * inner;
    const T* pb = Op::kInputs >= 2 ? op.b + c * inner : pa;
    const T* pc = nullptr;
    if constexpr (Op::kInputs == 3) pc = op.c ? op.c + c * inner : nullptr;
    int64_t o = g * V / inner, i = g * V - o * inner;
    constexpr int64_t kStep = int64_t{kTPC} * V;
    const int64_t step_o = kStep / inner, step_i = kStep - step_o * inner;
    while (g < g_end) {
      U a1 = U(0), a2 = U(0);
      for (int k = 0; k < kStretch && g < g_end; k += kU) {
        Pack<T, V> va[kU], vb[kU], vc[kU];
        int valid[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t gu = g + int64_t{u} * kTPC;
          valid[u] = gu < g_end ? static_cast<int>(min(int64_t{V}, m - gu * V)) : 0;
          if (valid[u] > 0) {
            va[u] = LoadPlaneGroup<T, VL>(pa, o, i, inner, plane_stride, valid[u]);
            if constexpr (Op::kInputs >= 2)
              vb[u] = LoadPlaneGroup<T, VL>(pb, o, i, inner, plane_stride, valid[u]);
            if constexpr (Op::kInputs == 3)
              vc[u] = pc ? LoadPlaneGroup<T, VL>(pc, o, i, inner, plane_stride, valid[u])
                         : ZeroPack<T, V>();
          }
          i += step_i;
          o += step_o;
          if (i >= inner) {
            i -= inner;
            ++o;
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u)
#pragma unroll
          for (int l = 0; l < V; ++l)
            if (l < valid[u])
              AddTerms<Op>(va[u].v[l], Op::kInputs >= 2 ? vb[u].v[l] : va[u].v[l],
                           Op::kInputs == 3 ? vc[u].v[l] : va[u].v[l], center, a1, a2);
        g += int64_t{kU} * kTPC;
      }
      s1 += static_cast<double>(a1);
      s2 += static_cast<double>(a2);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s1 += __shfl_down_sync(0xffffffffu, s1, off);
    s2 += __shfl_down_sync(0xffffffffu, s2, off);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    smem[0][warp] = s1;
    smem[1][warp] = s2;
  }
  __syncthreads();
  if (t == 0 && c < C) {
    for (int w = 1; w < kWarps; ++w) {
      s1 += smem[0][warp + w];
      s2 += smem[1][warp + w];
    }
    partial[2 * b * C + c] = s1;
    partial[(2 * b + 1) * C + c] = s2;
  }
}

}  // namespace cuda
}  // namespace tfbn
