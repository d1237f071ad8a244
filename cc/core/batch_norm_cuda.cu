// CUDA kernels and launchers for the core Batch Normalization math (see batch_norm_cuda.h
// for the contract and batch_norm_cpu.cc for the reference these kernels follow).
//
// Structure, per direction: a reduction kernel writes per-block double partials into the
// workspace (terms computed in U and summed in U over short stretches that are flushed
// into double, as the CPU kernels do); a small finalize kernel merges the partials in a
// fixed order and turns them into per-channel coefficients (the CPU code's formulas,
// evaluated in double); an elementwise kernel applies the coefficients, visiting the data
// last-first so that the part the reduction read last is still in L2. Two layouts of the
// [outer, C, inner] view:
//   rows   (inner == 1, channels last): a thread owns kVec adjacent channels and walks rows;
//   planes (inner > 1): a channel gets a block, or 64 threads of one when it has little
//          data, for a range of its outer*inner elements.
//
// Determinism: what each thread sums, in which order, and how blocks and threads are merged
// depends on the shape and dtype only. Vector loads are an implementation detail of the
// same element order (narrower or scalar loads for misaligned data, or planes that are not
// a multiple of the vector, visit the same elements in the same order), so alignment does
// not change the bits either. The file is compiled with --fmad=false: no multiply-add
// contraction, so the arithmetic is the CPU code's. Tuning constants below were chosen by
// timing on an H200 (benchmarks/gpu).
#include "core/batch_norm_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <initializer_list>

#ifndef __CUDACC__
#error "batch_norm_cuda.cu must be compiled by nvcc"
#endif

namespace tfbn {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per block of the reduction and apply kernels
// Loads in flight per thread and input: fewer for two inputs, to keep registers (and so
// resident warps) in check; the bytes in flight per thread stay the same.
template <class Op>
constexpr int kUnroll = Op::kInputs == 2 ? 2 : 4;
// The rows reduction keeps more loads in flight (its blocks are latency-bound otherwise).
// The unroll only groups loads: the order in which elements are summed does not depend on it.
template <class Op>
constexpr int kReduceUnroll = 2 * kUnroll<Op>;
constexpr int kReduceMinBlocks = 2;  // per SM: caps registers at 128
constexpr int kApplyMinBlocks = 3;   // per SM: caps registers at 80
constexpr int kApplyRowsMinBlocks = 2;  // keeps 4 x kVec coefficients per thread in registers
constexpr int kApplyMixedMinBlocks = 2;  // two channels' coefficients per group
// Reduction partition: about kTarget*Blocks blocks over the whole tensor, none smaller than
// kMinBlockElements, at most kMaxBlocks partials per channel. Shape-only constants.
// Rows: fewer partial rows for the finalize to merge; planes: on an H200, 512 made the
// planar cases slower.
constexpr int64_t kTargetRowsBlocks = 512;
constexpr int64_t kTargetPlanesBlocks = 1024;
constexpr int64_t kMinBlockElements = 16384;
constexpr int64_t kMaxBlocks = 1024;
// Planes: a channel gets kSmallTPC threads instead of a whole block when a block's share
// of it would give its threads fewer than kMinGroupsPerThread vector groups each.
constexpr int kSmallTPC = 64;
constexpr int64_t kMinGroupsPerThread = 32;
constexpr int kFinalizeThreads = 1024;
constexpr int64_t kMaxGridY = 65535;
constexpr size_t kWorkspaceAlign = 256;

// ---- element types ----

template <typename T>
struct Num;
template <>
struct Num<__half> {
  using U = float;
  static __device__ __forceinline__ float ToU(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half FromU(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using U = float;
  static __device__ __forceinline__ float ToU(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 FromU(float v) {
    return __float2bfloat16_rn(v);
  }
};
template <>
struct Num<float> {
  using U = float;
  static __device__ __forceinline__ float ToU(float v) { return v; }
  static __device__ __forceinline__ float FromU(float v) { return v; }
};
template <>
struct Num<double> {
  using U = double;
  static __device__ __forceinline__ double ToU(double v) { return v; }
  static __device__ __forceinline__ double FromU(double v) { return v; }
};

template <typename T>
using ParamT = typename Num<T>::U;

// Elements per 16-byte vector: the group size of both layouts.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> LoadPack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void StorePack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Start of block b of nb over [0, n): floor(n * b / nb) without overflow (b < nb <= 2^20).
__host__ __device__ __forceinline__ int64_t Split(int64_t b, int64_t nb, int64_t n) {
  return (n / nb) * b + ((n % nb) * b) / nb;
}

// ---- reduction operators: two per-channel sums ----
// As the CPU kernels (cpu_kernels.inc): each element's terms are computed and summed in U
// over a fixed stretch of kFlush elements per accumulator, and each stretch is then added
// into double. The stretches are defined by the thread's element sequence, which depends
// on the shape only.

constexpr int kFlush = 32;  // elements summed in U before adding into double

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
  __device__ Center<U> CenterOf(int64_t c) const { return {hi[c], lo ? lo[c] : U(0)}; }
  __device__ static void Add(T va, T vb, const Center<U>& k, U& s1, U& s2) {
    const U g = Num<T>::ToU(va);
    s1 += g;
    s2 += g * ((Num<T>::ToU(vb) - k.a) - k.b);
  }
};

// Loads kVec channels c0.. of one row; past C (misaligned path only) gives zero.
template <typename T, bool kAligned>
__device__ __forceinline__ Pack<T, kVec<T>> LoadRowGroup(const T* p, int64_t offset,
                                                       int64_t left) {
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
    ReduceRowsKernel(Op op, int64_t rows, int64_t C, int64_t tiles, int64_t nb,
                     double* partial) {
  using T = typename Op::T;
  using U = typename Op::U;
  constexpr int V = kVec<T>, kU = kReduceUnroll<Op>;
  static_assert(kFlush % kU == 0, "a stretch is whole unrolled steps");
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t tile = blockIdx.x % tiles, b = blockIdx.x / tiles;
  const int64_t c0 = (tile * TX + tx) * V;
  const int64_t r_end = Split(b + 1, nb, rows);
  // Shared memory [2][TY][V][TX]: conflict-free across tx.
  extern __shared__ double smem[];
  double* sm1 = smem;
  double* sm2 = smem + TY * V * TX;
#pragma unroll
  for (int l = 0; l < V; ++l) {
    sm1[(ty * V + l) * TX + tx] = 0.0;
    sm2[(ty * V + l) * TX + tx] = 0.0;
  }
  if (c0 < C) {
    Center<U> center[V];
#pragma unroll
    for (int l = 0; l < V; ++l)
      center[l] = c0 + l < C ? op.CenterOf(c0 + l) : Center<U>{U(0), U(0)};
    const int64_t left = C - c0;
    for (int64_t r = Split(b, nb, rows) + ty; r < r_end;) {
      U a1[V], a2[V];
#pragma unroll
      for (int l = 0; l < V; ++l) a1[l] = a2[l] = U(0);
      for (int k = 0; k < kFlush && r < r_end; k += kU) {
        Pack<T, V> va[kU], vb[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t ru = r + int64_t{u} * TY;
          if (ru < r_end) {
            va[u] = LoadRowGroup<T, kAligned>(op.a, ru * C + c0, left);
            if constexpr (Op::kInputs == 2)
              vb[u] = LoadRowGroup<T, kAligned>(op.b, ru * C + c0, left);
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (r + int64_t{u} * TY < r_end) {
#pragma unroll
            for (int l = 0; l < V; ++l)
              Op::Add(va[u].v[l], Op::kInputs == 2 ? vb[u].v[l] : va[u].v[l], center[l],
                      a1[l], a2[l]);
          }
        r += int64_t{kU} * TY;
      }
#pragma unroll
      for (int l = 0; l < V; ++l) {
        sm1[(ty * V + l) * TX + tx] += static_cast<double>(a1[l]);
        sm2[(ty * V + l) * TX + tx] += static_cast<double>(a2[l]);
      }
    }
  }
  for (int s = TY / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
#pragma unroll
      for (int l = 0; l < V; ++l) {
        sm1[(ty * V + l) * TX + tx] += sm1[((ty + s) * V + l) * TX + tx];
        sm2[(ty * V + l) * TX + tx] += sm2[((ty + s) * V + l) * TX + tx];
      }
    }
  }
  if (ty == 0) {
#pragma unroll
    for (int l = 0; l < V; ++l)
      if (c0 + l < C) {
        partial[2 * b * C + c0 + l] = sm1[l * TX + tx];
        partial[(2 * b + 1) * C + c0 + l] = sm2[l * TX + tx];
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
    ReducePlanesKernel(Op op, int64_t outer, int64_t C, int64_t inner, int64_t nb,
                       double* partial) {
  using T = typename Op::T;
  using U = typename Op::U;
  constexpr int V = kVec<T>;
  constexpr int kStretch = kFlush / V;  // groups per stretch
  // kUnroll, not kReduceUnroll: on an H200 the larger unroll (one resident block per SM
  // fewer) made the large planar cases slower
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
    const Center<U> center = op.CenterOf(c);
    const int64_t plane_stride = C * inner;
    const T* pa = op.a + c * inner;
    const T* pb = Op::kInputs == 2 ? op.b + c * inner : pa;
    int64_t o = g * V / inner, i = g * V - o * inner;
    constexpr int64_t kStep = int64_t{kTPC} * V;
    const int64_t step_o = kStep / inner, step_i = kStep - step_o * inner;
    while (g < g_end) {
      U a1 = U(0), a2 = U(0);
      for (int k = 0; k < kStretch && g < g_end; k += kU) {
        Pack<T, V> va[kU], vb[kU];
        int valid[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int64_t gu = g + int64_t{u} * kTPC;
          valid[u] = gu < g_end ? static_cast<int>(min(int64_t{V}, m - gu * V)) : 0;
          if (valid[u] > 0) {
            va[u] = LoadPlaneGroup<T, VL>(pa, o, i, inner, plane_stride, valid[u]);
            if constexpr (Op::kInputs == 2)
              vb[u] = LoadPlaneGroup<T, VL>(pb, o, i, inner, plane_stride, valid[u]);
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
              Op::Add(va[u].v[l], Op::kInputs == 2 ? vb[u].v[l] : va[u].v[l], center, a1, a2);
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

// ---- finalize: partials -> statistics and coefficients ----

struct Sums {
  double s1, s2;
};

// Merges partial[b][k][c] over b for the block's channels: thread row ty sums
// b = ty, ty + FY, ... in order, then rows merge by a fixed tree. Valid in row ty == 0.
__device__ __forceinline__ Sums MergePartials(const double* partial, int64_t C, int64_t nb,
                                              int64_t c) {
  __shared__ double sm1[kFinalizeThreads], sm2[kFinalizeThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, FX = blockDim.x, FY = blockDim.y;
  double s1 = 0.0, s2 = 0.0;
  if (c < C) {
    int64_t b = ty;
    for (; b + 3 * FY < nb; b += 4 * FY) {  // four loads in flight, summed in order
      double p1[4], p2[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        p1[u] = partial[2 * (b + u * FY) * C + c];
        p2[u] = partial[(2 * (b + u * FY) + 1) * C + c];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        s1 += p1[u];
        s2 += p2[u];
      }
    }
    for (; b < nb; b += FY) {
      s1 += partial[2 * b * C + c];
      s2 += partial[(2 * b + 1) * C + c];
    }
  }
  sm1[ty * FX + tx] = s1;
  sm2[ty * FX + tx] = s2;
  for (int s = FY / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
      sm1[ty * FX + tx] += sm1[(ty + s) * FX + tx];
      sm2[ty * FX + tx] += sm2[(ty + s) * FX + tx];
    }
  }
  return {sm1[tx], sm2[tx]};  // meaningful in row 0, which wrote it last
}

// Forward coefficients: coef[0..3][c] = hi, lo, a, b with y = ((x - hi) - lo) * a + b.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    ForwardFinalizeKernel(const T* x, int64_t inner, int64_t C, int64_t nb, int64_t m,
                          const double* partial, const ParamT<T>* scale,
                          const ParamT<T>* offset, const ParamT<T>* mean,
                          const ParamT<T>* variance, float epsilon, bool training,
                          ParamT<T>* batch_mean, ParamT<T>* batch_variance,
                          ParamT<T>* residual, ParamT<T>* coef) {
  using U = ParamT<T>;
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const auto [s1, s2] = MergePartials(partial, C, nb, c);
  if (threadIdx.y != 0 || c >= C) return;
  const double eps = static_cast<double>(epsilon);
  const double md = static_cast<double>(m);
  double var;
  U hi, lo;
  if (training) {
    double mean_d, m2;
    if (m == 0) {
      mean_d = __longlong_as_double(0x7ff8000000000000LL);  // NaN, as the CPU code
      m2 = mean_d;
    } else {
      const double shift = static_cast<double>(Num<T>::ToU(x[c * inner]));  // as summed
      const double d = s1 / md;
      mean_d = shift + d;
      const double v = s2 - s1 * d;
      m2 = v < 0.0 ? 0.0 : v;
    }
    var = m2 / md;
    hi = static_cast<U>(mean_d);
    lo = static_cast<U>(mean_d - static_cast<double>(hi));
  } else {
    var = static_cast<double>(variance[c]);
    hi = mean[c];
    lo = U(0);
  }
  batch_mean[c] = hi;
  batch_variance[c] = training ? static_cast<U>(var) : variance[c];
  residual[c] = lo;
  const double inv_std = 1.0 / sqrt(var + eps);
  coef[c] = hi;
  coef[C + c] = lo;
  coef[2 * C + c] = static_cast<U>(inv_std * (scale ? static_cast<double>(scale[c]) : 1.0));
  coef[3 * C + c] = offset ? offset[c] : U(0);
}

// Backward coefficients: coef[0..4][c] = hi, lo, ga, gb, gc with
// dx = ga * dy + gb * ((x - hi) - lo) + gc (training) or dx = ga * dy (inference).
template <typename U>
__global__ void __launch_bounds__(kFinalizeThreads)
    BackwardFinalizeKernel(int64_t C, int64_t nb, int64_t m, const double* partial,
                           const U* scale, const U* mean, const U* residual, const U* variance,
                           const U* d_batch_mean, const U* d_batch_variance, float epsilon,
                           bool training, U* dscale, U* doffset, U* coef) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const auto [sum_dy, sum_dy_xc] = MergePartials(partial, C, nb, c);
  if (threadIdx.y != 0 || c >= C) return;
  const double eps = static_cast<double>(epsilon);
  const double md = static_cast<double>(m);
  const double r = 1.0 / sqrt(static_cast<double>(variance[c]) + eps);
  const double s = scale ? static_cast<double>(scale[c]) : 1.0;
  const bool empty = m == 0;
  doffset[c] = static_cast<U>(sum_dy);
  dscale[c] = empty ? U(0) : static_cast<U>(r * sum_dy_xc);
  coef[c] = mean[c];
  coef[C + c] = residual ? residual[c] : U(0);
  coef[2 * C + c] = static_cast<U>(s * r);
  U gb = U(0), gc = U(0);
  if (training && !empty) {
    const double dmu = d_batch_mean ? static_cast<double>(d_batch_mean[c]) : 0.0;
    const double dvar = d_batch_variance ? static_cast<double>(d_batch_variance[c]) : 0.0;
    gb = static_cast<U>(-s * r * r * r * sum_dy_xc / md + 2.0 * dvar / md);
    gc = static_cast<U>(-s * r * sum_dy / md + dmu / md);
  }
  coef[3 * C + c] = gb;
  coef[4 * C + c] = gc;
}

// ---- elementwise operators ----
// Each reads kCount coefficient rows starting at row kFirst of the [rows][C] table.

template <typename T_>
struct ForwardApply {  // y = ((x - hi) - lo) * a + b
  using T = T_;
  using U = ParamT<T>;
  static constexpr int kInputs = 1, kFirst = 0, kCount = 4;
  static __device__ __forceinline__ T Apply(T x, T, const U* k) {
    return Num<T>::FromU(((Num<T>::ToU(x) - k[0]) - k[1]) * k[2] + k[3]);
  }
};

template <typename T_>
struct GradApply {  // dx = ga * dy + gb * ((x - hi) - lo) + gc
  using T = T_;
  using U = ParamT<T>;
  static constexpr int kInputs = 2, kFirst = 0, kCount = 5;
  static __device__ __forceinline__ T Apply(T dy, T x, const U* k) {
    return Num<T>::FromU(k[2] * Num<T>::ToU(dy) + k[3] * ((Num<T>::ToU(x) - k[0]) - k[1]) +
                         k[4]);
  }
};

template <typename T_>
struct GradApplyDyOnly {  // dx = ga * dy (inference)
  using T = T_;
  using U = ParamT<T>;
  static constexpr int kInputs = 1, kFirst = 2, kCount = 1;
  static __device__ __forceinline__ T Apply(T dy, T, const U* k) {
    return Num<T>::FromU(k[0] * Num<T>::ToU(dy));
  }
};

// Rows layout with C % kVec == 0 and aligned data: a thread keeps the coefficients of its
// kVec channels in registers and walks rows blockIdx.y * TY + ty + k * gridDim.y * TY,
// counted from the last row: the reduction has just read the rows first to last, so the
// ones it read last are still in L2 when this pass starts.
template <class Op>
__global__ void __launch_bounds__(kThreads, kApplyRowsMinBlocks)
    ApplyRowsKernel(const typename Op::T* a, const typename Op::T* b,
                    const typename Op::U* coef, typename Op::T* out, int64_t rows, int64_t C) {
  using T = typename Op::T;
  using U = typename Op::U;
  constexpr int V = kVec<T>, kU = kUnroll<Op>;
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t c0 = (int64_t{blockIdx.x} * TX + threadIdx.x) * V;
  if (c0 >= C) return;
  U k[V][Op::kCount];
#pragma unroll
  for (int l = 0; l < V; ++l)
#pragma unroll
    for (int j = 0; j < Op::kCount; ++j) k[l][j] = coef[(Op::kFirst + j) * C + c0 + l];
  const int64_t stride = int64_t{gridDim.y} * TY;
  for (int64_t r = int64_t{blockIdx.y} * TY + threadIdx.y; r < rows; r += kU * stride) {
    Pack<T, V> va[kU], vb[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t ru = r + u * stride;
      if (ru < rows) {
        const int64_t at = (rows - 1 - ru) * C + c0;
        va[u] = LoadPack<T, V>(a + at);
        if constexpr (Op::kInputs == 2) vb[u] = LoadPack<T, V>(b + at);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t ru = r + u * stride;
      if (ru < rows) {
        Pack<T, V> o;
#pragma unroll
        for (int l = 0; l < V; ++l)
          o.v[l] = Op::Apply(va[u].v[l], Op::kInputs == 2 ? vb[u].v[l] : va[u].v[l], k[l]);
        StorePack<T, V>(out + (rows - 1 - ru) * C + c0, o);
      }
    }
  }
}

// Any layout, flattened into groups of V consecutive elements (the last may be short).
// kMixed: inner >= V but inner % V != 0, so a group may run from one channel's plane into
// the next channel's; otherwise a group lies in one channel (V == 1, or inner % V == 0).
// Grid-stride over groups, taken last-first (group groups-1-g) for the reason given at
// ApplyRowsKernel. The (position in plane, channel) of a thread's group steps back by
// (step_i, step_c) = ((stride*V) % inner, ((stride*V) / inner) % C), computed on the host,
// so the loop needs no division.
template <class Op, int V, bool kMixed>
__global__ void __launch_bounds__(kThreads, kMixed ? kApplyMixedMinBlocks : kApplyMinBlocks)
    ApplyFlatKernel(const typename Op::T* a, const typename Op::T* b,
                    const typename Op::U* coef, typename Op::T* out, int64_t size, int64_t C,
                    int64_t inner, int64_t step_i, int64_t step_c) {
  using T = typename Op::T;
  using U = typename Op::U;
  constexpr int kU = kUnroll<Op>;
  const int64_t groups = (size + V - 1) / V;
  int64_t g = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (g >= groups) return;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  const int64_t e = (groups - 1 - g) * V;
  const int64_t plane = e / inner;
  int64_t i = e - plane * inner;
  int64_t c = plane % C;
  for (; g < groups; g += kU * stride) {
    Pack<T, V> va[kU], vb[kU];
    U k[kU][Op::kCount], k_next[kU][kMixed ? Op::kCount : 1];
    int64_t i_of[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t gu = g + u * stride;
      i_of[u] = i;
      if (gu < groups) {
        const int64_t q = (groups - 1 - gu) * V;
        if (!kMixed || q + V <= size) {
          va[u] = LoadPack<T, V>(a + q);
          if constexpr (Op::kInputs == 2) vb[u] = LoadPack<T, V>(b + q);
        } else {  // the short last group
#pragma unroll
          for (int l = 0; l < V; ++l) {
            va[u].v[l] = q + l < size ? a[q + l] : Num<T>::FromU(0);
            if constexpr (Op::kInputs == 2) vb[u].v[l] = q + l < size ? b[q + l] : va[u].v[l];
          }
        }
#pragma unroll
        for (int j = 0; j < Op::kCount; ++j) k[u][j] = coef[(Op::kFirst + j) * C + c];
        if constexpr (kMixed) {
          const int64_t c_next = c + 1 == C ? 0 : c + 1;
#pragma unroll
          for (int j = 0; j < Op::kCount; ++j)
            k_next[u][j] = i + V > inner ? coef[(Op::kFirst + j) * C + c_next] : k[u][j];
        }
      }
      i -= step_i;
      c -= step_c;
      if (i < 0) {
        i += inner;
        --c;
      }
      if (c < 0) c += C;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t gu = g + u * stride;
      if (gu < groups) {
        const int64_t q = (groups - 1 - gu) * V;
        Pack<T, V> o;
        const int64_t in_plane = inner - i_of[u];  // lanes before the next channel's plane
        if (!kMixed || in_plane >= V) {  // the common case: one channel
#pragma unroll
          for (int l = 0; l < V; ++l)
            o.v[l] = Op::Apply(va[u].v[l], Op::kInputs == 2 ? vb[u].v[l] : va[u].v[l], k[u]);
        } else {
#pragma unroll
          for (int l = 0; l < V; ++l) {
            U kl[Op::kCount];
#pragma unroll
            for (int j = 0; j < Op::kCount; ++j)
              kl[j] = l < in_plane ? k[u][j] : k_next[u][kMixed ? j : 0];
            o.v[l] = Op::Apply(va[u].v[l], Op::kInputs == 2 ? vb[u].v[l] : va[u].v[l], kl);
          }
        }
        if (!kMixed || q + V <= size) {
          StorePack<T, V>(out + q, o);
        } else {
#pragma unroll
          for (int l = 0; l < V; ++l)
            if (q + l < size) out[q + l] = o.v[l];
        }
      }
    }
  }
}

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
    const int64_t want =
        std::min(CeilDiv(kTargetPlanesBlocks, C), CeilDiv(m, kMinBlockElements));
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
    ReduceRowsKernel<Op, true><<<grid, block, smem, stream>>>(
        op, layout.outer, layout.channels, plan.tiles, plan.nb, partial);
  else
    ReduceRowsKernel<Op, false><<<grid, block, smem, stream>>>(
        op, layout.outer, layout.channels, plan.tiles, plan.nb, partial);
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
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0) !=
          cudaSuccess) {
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
void LaunchApplyFlat(const typename Op::T* a, const typename Op::T* b,
                     const typename Op::U* coef, typename Op::T* out, const Layout& layout,
                     cudaStream_t stream) {
  // The grid: on an H200, resident blocks only (each thread loops, as for rows) were the
  // faster choice for 16-bit types and for groups that span two planes, one pass of the
  // loop per thread for the other cases.
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
    ApplyRowsKernel<Op><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks)),
                          dim3(tx, ty), 0, stream>>>(a, b, coef, out, layout.outer,
                                                     layout.channels);
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

// ---- typed launchers ----

template <typename T>
cudaError_t Forward(const Layout& layout, const T* x, const ParamT<T>* scale,
                    const ParamT<T>* offset, const ParamT<T>* mean, const ParamT<T>* variance,
                    const ForwardArgs& args, T* y, ParamT<T>* batch_mean,
                    ParamT<T>* batch_variance, ParamT<T>* residual, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream) {
  using U = ParamT<T>;
  const int64_t C = layout.channels;
  if (C == 0) return cudaSuccess;
  const ReducePlan plan = MakeReducePlan(layout, kVec<T>, args.training);
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, sizeof(U), 4);
  if (workspace_bytes < w.total() || !GridFits(layout, plan)) return cudaErrorInvalidValue;
  double* partial = static_cast<double*>(workspace);
  U* coef = reinterpret_cast<U*>(static_cast<char*>(workspace) + w.partial_bytes);
  if (plan.nb > 0) {
    const int width = LoadWidth<T>(plan.rows ? C : layout.inner, {x});
    LaunchReduce(MomentsOp<T>{x, nullptr, layout.inner}, layout, plan, width, partial, stream);
  }
  const dim3 fblock = FinalizeBlock(C);
  ForwardFinalizeKernel<T><<<static_cast<unsigned>(CeilDiv(C, fblock.x)), fblock, 0, stream>>>(
      x, layout.inner, C, plan.nb, layout.per_channel(), partial, scale, offset, mean,
      variance, args.epsilon, args.training, batch_mean, batch_variance, residual, coef);
  LaunchApply<ForwardApply<T>>(x, nullptr, coef, y, layout, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Backward(const Layout& layout, const T* dy, const T* x, const ParamT<T>* scale,
                     const ParamT<T>* mean, const ParamT<T>* residual,
                     const ParamT<T>* variance, const ParamT<T>* d_batch_mean,
                     const ParamT<T>* d_batch_variance, const ForwardArgs& args, T* dx,
                     ParamT<T>* dscale, ParamT<T>* doffset, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream) {
  using U = ParamT<T>;
  const int64_t C = layout.channels;
  if (C == 0) return cudaSuccess;
  const ReducePlan plan = MakeReducePlan(layout, kVec<T>, true);
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, sizeof(U), 5);
  if (workspace_bytes < w.total() || !GridFits(layout, plan)) return cudaErrorInvalidValue;
  double* partial = static_cast<double*>(workspace);
  U* coef = reinterpret_cast<U*>(static_cast<char*>(workspace) + w.partial_bytes);
  if (plan.nb > 0) {
    const int width = LoadWidth<T>(plan.rows ? C : layout.inner, {dy, x});
    LaunchReduce(GradSumsOp<T>{dy, x, mean, residual}, layout, plan, width, partial, stream);
  }
  const dim3 fblock = FinalizeBlock(C);
  BackwardFinalizeKernel<U><<<static_cast<unsigned>(CeilDiv(C, fblock.x)), fblock, 0, stream>>>(
      C, plan.nb, layout.per_channel(), partial, scale, mean, residual, variance, d_batch_mean,
      d_batch_variance, args.epsilon, args.training, dscale, doffset, coef);
  if (args.training)
    LaunchApply<GradApply<T>>(dy, x, coef, dx, layout, stream);
  else
    LaunchApply<GradApplyDyOnly<T>>(dy, nullptr, coef, dx, layout, stream);
  return cudaGetLastError();
}

int VecOf(DType t) { return static_cast<int>(16 / ElementBytes(t)); }

}  // namespace

size_t ForwardWorkspaceBytes(DType dtype, const Layout& layout, bool training) {
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), training);
  return MakeWorkspacePlan(layout, plan, ParamBytes(dtype), 4).total();
}

size_t BackwardWorkspaceBytes(DType dtype, const Layout& layout) {
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
  return MakeWorkspacePlan(layout, plan, ParamBytes(dtype), 5).total();
}

cudaError_t BatchNormForward(DType dtype, const Layout& layout, const void* x,
                             const void* scale, const void* offset, const void* mean,
                             const void* variance, const ForwardArgs& args, void* y,
                             void* batch_mean, void* batch_variance, void* mean_residual,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
#define TFBN_FORWARD(T)                                                                     \
  Forward<T>(layout, static_cast<const T*>(x), static_cast<const ParamT<T>*>(scale),        \
             static_cast<const ParamT<T>*>(offset), static_cast<const ParamT<T>*>(mean),    \
             static_cast<const ParamT<T>*>(variance), args, static_cast<T*>(y),             \
             static_cast<ParamT<T>*>(batch_mean), static_cast<ParamT<T>*>(batch_variance),  \
             static_cast<ParamT<T>*>(mean_residual), workspace, workspace_bytes, stream)
  switch (dtype) {
    case DType::kHalf: return TFBN_FORWARD(__half);
    case DType::kBFloat16: return TFBN_FORWARD(__nv_bfloat16);
    case DType::kFloat: return TFBN_FORWARD(float);
    case DType::kDouble: return TFBN_FORWARD(double);
  }
#undef TFBN_FORWARD
  return cudaErrorInvalidValue;
}

cudaError_t BatchNormBackward(DType dtype, const Layout& layout, const void* dy, const void* x,
                              const void* scale, const void* mean, const void* mean_residual,
                              const void* variance, const void* d_batch_mean,
                              const void* d_batch_variance, const ForwardArgs& args, void* dx,
                              void* dscale, void* doffset, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
#define TFBN_BACKWARD(T)                                                                    \
  Backward<T>(layout, static_cast<const T*>(dy), static_cast<const T*>(x),                  \
              static_cast<const ParamT<T>*>(scale), static_cast<const ParamT<T>*>(mean),    \
              static_cast<const ParamT<T>*>(mean_residual),                                 \
              static_cast<const ParamT<T>*>(variance),                                      \
              static_cast<const ParamT<T>*>(d_batch_mean),                                  \
              static_cast<const ParamT<T>*>(d_batch_variance), args, static_cast<T*>(dx),   \
              static_cast<ParamT<T>*>(dscale), static_cast<ParamT<T>*>(doffset), workspace, \
              workspace_bytes, stream)
  switch (dtype) {
    case DType::kHalf: return TFBN_BACKWARD(__half);
    case DType::kBFloat16: return TFBN_BACKWARD(__nv_bfloat16);
    case DType::kFloat: return TFBN_BACKWARD(float);
    case DType::kDouble: return TFBN_BACKWARD(double);
  }
#undef TFBN_BACKWARD
  return cudaErrorInvalidValue;
}

const char* ErrorString(cudaError_t error) { return cudaGetErrorString(error); }

int RuntimeVersion() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int DriverVersion() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear: "no driver" is an answer here, not an error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace tfbn
