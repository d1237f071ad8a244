// Finalize: partials merged in a fixed order and turned into per-channel statistics and
// coefficients (core/batch_norm_math.h's formulas, in double).
// Part of the device sources (kernels.cu, compiled by NVRTC).
#pragma once

#include "core/batch_norm_math.h"
#include "core/cuda/common.cuh"

namespace tfbn {
namespace cuda {

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
                          const double* partial, const ParamT<T>* scale, const ParamT<T>* offset,
                          const ParamT<T>* mean, const ParamT<T>* variance, float epsilon,
                          bool training, ParamT<T>* batch_mean, ParamT<T>* batch_variance,
                          ParamT<T>* mean_lo, ParamT<T>* coef) {
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
      const auto moments = MomentsFromShiftedSums(shift, s1, s2, md);
      mean_d = moments.mean;
      m2 = moments.m2;
    }
    var = m2 / md;
    const MeanParts<U> parts = SplitMean<U>(mean_d);
    hi = parts.hi;
    lo = parts.lo;
  } else {
    var = static_cast<double>(variance[c]);
    hi = mean[c];
    lo = U(0);
  }
  batch_mean[c] = hi;
  batch_variance[c] = training ? static_cast<U>(var) : variance[c];
  mean_lo[c] = lo;
  const double inv_std = InverseStd(var, eps);
  coef[c] = hi;
  coef[C + c] = lo;
  coef[2 * C + c] = static_cast<U>(inv_std * (scale ? static_cast<double>(scale[c]) : 1.0));
  coef[3 * C + c] = offset ? offset[c] : U(0);
}

// Backward coefficients: coef[0..4][c] = hi, lo, ga, gb, gc with
// dx = ga * dy + gb * ((x - hi) - lo) + gc (training) or dx = ga * dy (inference).
template <typename U>
__global__ void __launch_bounds__(kFinalizeThreads)
    BackwardFinalizeKernel(int64_t C, int64_t nb, int64_t m, const double* partial, const U* scale,
                           const U* mean, const U* mean_lo, const U* variance,
                           const U* d_batch_mean, const U* d_batch_variance, float epsilon,
                           bool training, U* dscale, U* doffset, U* coef) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const auto [sum_dy, sum_dy_xc] = MergePartials(partial, C, nb, c);
  if (threadIdx.y != 0 || c >= C) return;
  const double eps = static_cast<double>(epsilon);
  const double md = static_cast<double>(m);
  const double r = InverseStd(static_cast<double>(variance[c]), eps);
  const double s = scale ? static_cast<double>(scale[c]) : 1.0;
  const bool empty = m == 0;
  doffset[c] = static_cast<U>(sum_dy);
  dscale[c] = empty ? U(0) : static_cast<U>(r * sum_dy_xc);
  coef[c] = mean[c];
  coef[C + c] = mean_lo ? mean_lo[c] : U(0);
  coef[2 * C + c] = static_cast<U>(s * r);
  U gb = U(0), gc = U(0);
  if (training && !empty) {
    const double dmu = d_batch_mean ? static_cast<double>(d_batch_mean[c]) : 0.0;
    const double dvar = d_batch_variance ? static_cast<double>(d_batch_variance[c]) : 0.0;
    const auto g = TrainingGradCoefficients(s, r, sum_dy, sum_dy_xc, dmu, dvar, md);
    gb = static_cast<U>(g.gb);
    gc = static_cast<U>(g.gc);
  }
  coef[3 * C + c] = gb;
  coef[4 * C + c] = gc;
}

}  // namespace cuda
}  // namespace tfbn
