// The split op family's own kernels (statistics | merge | apply, see batch_norm.h): the
// finalize steps that turn the shared reductions' partials into packed partial moments or
// gradient sums, the merge, the coefficient kernels of the apply steps, and the weighted
// (masked) reduction and gradient apply, whose weight per (outer, inner) position the
// generic operators have no place for.
// Part of the device sources (kernels.cu, compiled by NVRTC).
#pragma once

#include "core/batch_norm_math.h"
#include "core/cuda/common.cuh"
#include "core/cuda/finalize_kernels.cuh"

namespace tfbn {
namespace cuda {

__device__ __forceinline__ double SplitNaN() { return __longlong_as_double(0x7ff8000000000000LL); }

// ---- unweighted statistics: MomentsOp partials -> [count, mean, M2] ----

// The fused forward finalize's arithmetic (same merge, same shift), so that one part merged
// and finalized gives the fused op's batch statistics bit for bit.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    SplitMomentsFinalizeKernel(const T* x, int64_t inner, int64_t C, int64_t nb, int64_t m,
                               const double* partial, double* out) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const auto [s1, s2] = MergePartials(partial, C, nb, c);
  if (threadIdx.y != 0 || c >= C) return;
  if (m == 0) {  // contributes nothing to a merge
    out[c] = out[C + c] = out[2 * C + c] = 0.0;
    return;
  }
  const double md = static_cast<double>(m);
  const double shift = static_cast<double>(Num<T>::ToU(x[c * inner]));
  const auto moments = MomentsFromShiftedSums(shift, s1, s2, md);
  out[c] = md;
  out[C + c] = moments.mean;
  out[2 * C + c] = moments.m2;
}

// ---- merge: Chan's update over parts in order, then the finalize ----

template <typename U>
__global__ void __launch_bounds__(kThreads)
    MergeMomentsKernel(int64_t parts, int64_t C, const double* partials, U* mean, U* variance,
                       U* mean_lo, double* count) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0.0, mu = 0.0, m2 = 0.0;
  for (int64_t p = 0; p < parts; ++p) {
    const double* part = partials + p * 3 * C;
    const double nb = part[c], mb = part[C + c], m2b = part[2 * C + c];
    if (!(nb > 0.0)) continue;
    if (n == 0.0) {  // one part: taken as is, exact
      n = nb, mu = mb, m2 = m2b;
      continue;
    }
    const double total = n + nb;
    const double delta = mb - mu;
    mu += delta * (nb / total);
    m2 += m2b + delta * delta * (n * nb / total);
    n = total;
  }
  count[c] = n;
  const MeanParts<U> parts_of = SplitMean<U>(n > 0.0 ? mu : SplitNaN());
  mean[c] = parts_of.hi;
  mean_lo[c] = parts_of.lo;
  variance[c] = static_cast<U>(n > 0.0 ? m2 / n : SplitNaN());
}

// ---- apply: the fused forward's coefficients from given statistics ----

// coef[0..3][c] = hi, lo, a, b for ForwardApply.
template <typename U>
__global__ void __launch_bounds__(kThreads)
    StatisticsCoefKernel(int64_t C, const U* scale, const U* offset, const U* mean,
                         const U* mean_lo, const U* variance, float epsilon, U* coef) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double inv_std = InverseStd(static_cast<double>(variance[c]), static_cast<double>(epsilon));
  coef[c] = mean[c];
  coef[C + c] = mean_lo ? mean_lo[c] : U(0);
  coef[2 * C + c] = static_cast<U>(inv_std * (scale ? static_cast<double>(scale[c]) : 1.0));
  coef[3 * C + c] = offset ? offset[c] : U(0);
}

// ---- gradient sums: GradSumsOp partials -> sums [2][C] ----

__global__ void __launch_bounds__(kFinalizeThreads)
    GradSumsFinalizeKernel(int64_t C, int64_t nb, const double* partial, double* sums) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const auto [s1, s2] = MergePartials(partial, C, nb, c);
  if (threadIdx.y != 0 || c >= C) return;
  sums[c] = s1;
  sums[C + c] = s2;
}

// ---- weights: what the weighted kernels need to know about them ----

// Written by WeightInfoKernel into the workspace.
struct WeightInfo {
  double wscale;  // a power of two bringing the largest weight into [1, 4); NaN: bad weights
  double wsum;    // sum of the weights
  int64_t first;  // the first position with a weight other than 0, m where none
};
static_assert(sizeof(WeightInfo) <= kWeightInfoBytes, "the workspace reserves that much");

// One block: the weights' scale (the CPU's WeightScale), sum and first weighted position. A
// negative or non-finite weight sets wscale to NaN, which the finalize turns into NaN
// statistics and the gradient into NaN dx. Thread t takes positions t, t + kFinalizeThreads,
// ..., then threads merge by a fixed tree: the same bits on every run.
__global__ void __launch_bounds__(kFinalizeThreads)
    WeightInfoKernel(const float* w, int64_t m, WeightInfo* info) {
  __shared__ double ssum[kFinalizeThreads];
  __shared__ float smax[kFinalizeThreads];
  __shared__ long long sfirst[kFinalizeThreads];
  __shared__ int sbad[kFinalizeThreads];
  const int t = threadIdx.x;
  double sum = 0.0;
  float wmax = 0.0f;
  long long first = m;
  int bad = 0;
  for (int64_t j = t; j < m; j += kFinalizeThreads) {
    const float v = w[j];
    if (!(v >= 0.0f) || isinf(v)) bad = 1;
    sum += static_cast<double>(v);
    wmax = fmaxf(wmax, v);
    if (v != 0.0f && j < first) first = j;
  }
  ssum[t] = sum;
  smax[t] = wmax;
  sfirst[t] = first;
  sbad[t] = bad;
  for (int s = kFinalizeThreads / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (t < s) {
      ssum[t] += ssum[t + s];
      smax[t] = fmaxf(smax[t], smax[t + s]);
      sfirst[t] = min(sfirst[t], sfirst[t + s]);
      sbad[t] |= sbad[t + s];
    }
  }
  if (t == 0) {
    const float top = smax[0];
    const int e = top > 0.0f ? max(-126, min(126, ilogbf(top))) : 0;
    info->wscale = sbad[0] ? SplitNaN() : ldexp(1.0, -e);
    info->wsum = ssum[0];
    info->first = sfirst[0];
  }
}

// ---- weighted statistics: sums of w * d and w * d^2, d = x - shift ----
// As the CPU's weighted kernels: w is the weight times wscale (exact), a position of
// weight 0 adds nothing (its x, NaN included, is not used), terms are summed in U over
// kFlush positions per thread and then in double. The partition is the generic one's for
// scalar loads (MakeReducePlan with a vector of 1), so the partials have its layout
// [nb][2][C] and MergePartials merges them.

// Channel c's shift: its sample at the first weighted position.
template <typename T>
__device__ __forceinline__ ParamT<T> WeightedShift(const T* x, const WeightInfo& info, int64_t C,
                                                   int64_t inner, int64_t c) {
  const int64_t o = info.first / inner, i = info.first - o * inner;
  return Num<T>::ToU(x[(o * C + c) * inner + i]);
}

template <typename U>
__device__ __forceinline__ void AddWeighted(U w, U v, U shift, U& a1, U& a2) {
  const U d = w != U(0) ? v - shift : U(0);
  const U wd = w * d;
  a1 += wd;
  a2 += wd * d;
}

// Rows [rows, C]: block (tile, b), thread (tx, ty) owns channel tile * TX + tx and rows
// Split(b) + ty + k * TY; the TY sums merge by a fixed tree.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    WeightedReduceRowsKernel(const T* x, const float* w, const WeightInfo* info_p, int64_t rows,
                             int64_t C, int64_t tiles, int64_t nb, double* partial) {
  using U = ParamT<T>;
  __shared__ double sm1[kThreads], sm2[kThreads];
  const WeightInfo info = *info_p;
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t tile = blockIdx.x % tiles, b = blockIdx.x / tiles;
  const int64_t c = tile * TX + tx;
  double s1 = 0.0, s2 = 0.0;
  if (c < C && info.first < rows) {
    const U shift = WeightedShift(x, info, C, 1, c);
    const U wscale = static_cast<U>(info.wscale);
    const int64_t r_end = Split(b + 1, nb, rows);
    for (int64_t r = Split(b, nb, rows) + ty; r < r_end;) {
      U a1 = U(0), a2 = U(0);
      for (int k = 0; k < kFlush && r < r_end; ++k, r += TY)
        AddWeighted(static_cast<U>(w[r]) * wscale, Num<T>::ToU(x[r * C + c]), shift, a1, a2);
      s1 += static_cast<double>(a1);
      s2 += static_cast<double>(a2);
    }
  }
  sm1[ty * TX + tx] = s1;
  sm2[ty * TX + tx] = s2;
  for (int s = TY / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
      sm1[ty * TX + tx] += sm1[(ty + s) * TX + tx];
      sm2[ty * TX + tx] += sm2[(ty + s) * TX + tx];
    }
  }
  if (ty == 0 && c < C) {
    partial[2 * b * C + c] = sm1[tx];
    partial[(2 * b + 1) * C + c] = sm2[tx];
  }
}

// Planes [outer, C, inner]: kThreads / kTPC channels per block; block (channel group, b)
// sums positions j = o * inner + i in [Split(b), Split(b+1)) of each channel, thread t of a
// channel the positions begin + t + k * kTPC; a shuffle tree, then the warps in order.
template <typename T, int kTPC>
__global__ void __launch_bounds__(kThreads)
    WeightedReducePlanesKernel(const T* x, const float* w, const WeightInfo* info_p, int64_t outer,
                               int64_t C, int64_t inner, int64_t nb, double* partial) {
  using U = ParamT<T>;
  constexpr int kPerBlock = kThreads / kTPC, kWarps = kTPC / 32;
  static_assert(kTPC % 32 == 0 && kThreads % kTPC == 0, "a channel has whole warps");
  __shared__ double smem[2][kThreads / 32];
  const WeightInfo info = *info_p;
  const int64_t channel_blocks = (C + kPerBlock - 1) / kPerBlock;
  const int sub = threadIdx.x / kTPC, t = threadIdx.x % kTPC;
  const int64_t c = (blockIdx.x % channel_blocks) * kPerBlock + sub;
  const int64_t b = blockIdx.x / channel_blocks;
  const int64_t m = outer * inner;
  const int64_t j_end = Split(b + 1, nb, m);
  double s1 = 0.0, s2 = 0.0;
  int64_t j = Split(b, nb, m) + t;
  if (c < C && j < j_end && info.first < m) {
    const U shift = WeightedShift(x, info, C, inner, c);
    const U wscale = static_cast<U>(info.wscale);
    const T* px = x + c * inner;
    const int64_t plane_stride = C * inner;
    int64_t o = j / inner, i = j - o * inner;
    const int64_t step_o = kTPC / inner, step_i = kTPC - step_o * inner;
    while (j < j_end) {
      U a1 = U(0), a2 = U(0);
      for (int k = 0; k < kFlush && j < j_end; ++k) {
        AddWeighted(static_cast<U>(w[j]) * wscale, Num<T>::ToU(px[o * plane_stride + i]), shift, a1,
                    a2);
        j += kTPC;
        o += step_o;
        i += step_i;
        if (i >= inner) {
          i -= inner;
          ++o;
        }
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
    for (int v = 1; v < kWarps; ++v) {
      s1 += smem[0][warp + v];
      s2 += smem[1][warp + v];
    }
    partial[2 * b * C + c] = s1;
    partial[(2 * b + 1) * C + c] = s2;
  }
}

// [W, mean, M2] from the merged weighted sums (the CPU's WeightedPartialMoments, one pass).
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    WeightedMomentsFinalizeKernel(const T* x, int64_t inner, int64_t C, int64_t nb, int64_t m,
                                  const WeightInfo* info_p, const double* partial, double* out) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const auto [s1, s2] = MergePartials(partial, C, nb, c);
  if (threadIdx.y != 0 || c >= C) return;
  const WeightInfo info = *info_p;
  if (isnan(info.wscale)) {
    out[c] = out[C + c] = out[2 * C + c] = SplitNaN();
    return;
  }
  if (info.first >= m) {  // no weight: contributes nothing to a merge
    out[c] = out[C + c] = out[2 * C + c] = 0.0;
    return;
  }
  const double shift = static_cast<double>(WeightedShift(x, info, C, inner, c));
  const double unscale = 1.0 / info.wscale;  // a power of two: exact
  const auto moments = MomentsFromShiftedSums(shift, s1 * unscale, s2 * unscale, info.wsum);
  out[c] = info.wsum;
  out[C + c] = moments.mean;
  out[2 * C + c] = moments.m2;
}

// ---- gradient apply from sums ----

// The CPU's SplitGradCoefficientsFromSums: dscale, doffset of this slice from local_sums,
// coef[0..4][c] = hi, lo, ga, gb, gc for GradApply from the global sums and count[c] *
// count_scale (info: the weights' scale, nullptr for 1).
template <typename U>
__global__ void __launch_bounds__(kThreads)
    SumsGradCoefKernel(int64_t C, bool empty, const U* scale, const U* mean, const U* mean_lo,
                       const U* variance, const double* local_sums, const double* global_sums,
                       int64_t global_rows, const double* count, const WeightInfo* info,
                       float epsilon, U* dscale, U* doffset, U* coef) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= C) return;
  // The CPU takes the scale as U, then widens it.
  const double count_scale = info ? static_cast<double>(static_cast<U>(info->wscale)) : 1.0;
  const double r = InverseStd(static_cast<double>(variance[c]), static_cast<double>(epsilon));
  const double s = scale ? static_cast<double>(scale[c]) : 1.0;
  doffset[c] = static_cast<U>(local_sums[c]);
  dscale[c] = empty ? U(0) : static_cast<U>(r * local_sums[C + c]);
  const double m = count[c] * count_scale;
  const double dmu = global_rows == 4 ? global_sums[2 * C + c] : 0.0;
  const double dvar = global_rows == 4 ? global_sums[3 * C + c] : 0.0;
  const auto g = TrainingGradCoefficients(s, r, global_sums[c], global_sums[C + c], dmu, dvar, m);
  coef[c] = mean[c];
  coef[C + c] = mean_lo ? mean_lo[c] : U(0);
  coef[2 * C + c] = static_cast<U>(g.ga);
  coef[3 * C + c] = m > 0.0 ? static_cast<U>(g.gb) : U(0);
  coef[4 * C + c] = m > 0.0 ? static_cast<U>(g.gc) : U(0);
}

// dx = ga * dy + w * (gb * ((x - hi) - lo) + gc), w = weight * wscale: the CPU's weighted
// gradient kernels' expression. A grid-stride loop over elements; the weight of element
// (o, c, i) is w[o * inner + i].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    WeightedGradApplyKernel(const T* dy, const T* x, const float* w, const WeightInfo* info,
                            const ParamT<T>* coef, T* dx, int64_t size, int64_t C, int64_t inner) {
  using U = ParamT<T>;
  const U wscale = static_cast<U>(info->wscale);
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < size; e += stride) {
    const int64_t plane = e / inner, i = e - plane * inner;
    const int64_t o = plane / C, c = plane - o * C;
    const U wi = static_cast<U>(w[o * inner + i]) * wscale;
    const U g = Num<T>::ToU(dy[e]), v = Num<T>::ToU(x[e]);
    const U h = coef[c], l = coef[C + c], a = coef[2 * C + c], gb = coef[3 * C + c],
            k = coef[4 * C + c];
    dx[e] = Num<T>::FromU(a * g + wi * (gb * ((v - h) - l) + k));
  }
}

}  // namespace cuda
}  // namespace tfbn
