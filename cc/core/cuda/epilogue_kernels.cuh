// The fused epilogue y = act(BN(x) + residual) and its gradient: the per-element math of
// the CPU epilogue kernels (cpu_walk.inc, cpu_reductions.inc) in the same order of
// operations, with core/activation_math.h's activations, so that y and dx match the CPU's
// bits given the same statistics. kAct is an Activation's code (core/activation.h).
// Part of the device sources (kernels.cu, compiled by NVRTC).
//
// Backward coefficient table [7][C] (U): hi, lo, ga, gb, gc as BackwardFinalizeKernel writes
// them (rows 0..4), then the forward's a and b (rows 5, 6), from which z is recomputed.
#pragma once

#include "core/activation.h"
#include "core/activation_math.h"
#include "core/batch_norm_math.h"
#include "core/cuda/common.cuh"
#include "core/cuda/finalize_kernels.cuh"

namespace tfbn {
namespace cuda {

constexpr int kEpilogueCoefRows = 7;

template <int kAct, typename U>
__device__ __forceinline__ U EpilogueActivate(U z) {
  return activation_math::Activate<static_cast<Activation>(kAct)>(z);
}

// dy * act'(z)
template <int kAct, typename U>
__device__ __forceinline__ U EpilogueActGrad(U dy, U z) {
  return activation_math::ActivationGrad<static_cast<Activation>(kAct)>(dy, z);
}

// ---- forward ----

// For the generic apply kernels: y = act(((x - hi) - lo) * a + b (+ residual)). The
// residual is a compile-time choice: adding a zero would turn a -0 into +0 before the
// activation, which the CPU does not.
template <typename T_, int kAct, bool kResidual>
struct EpilogueForwardApply {
  using T = T_;
  using U = ParamT<T>;
  static constexpr int kInputs = kResidual ? 2 : 1, kFirst = 0, kCount = 4;
  static __device__ __forceinline__ T Apply(T x, T res, const U* k) {
    U z = ((Num<T>::ToU(x) - k[0]) - k[1]) * k[2] + k[3];
    if constexpr (kResidual) z = z + Num<T>::ToU(res);
    return Num<T>::FromU(EpilogueActivate<kAct>(z));
  }
};

// ForwardFinalizeKernel, plus the CPU epilogue's rule that with an activation the variance
// is rounded to U before it is used: the gradient only gets that rounded value, and it
// must see the same z.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    EpilogueForwardFinalizeKernel(const T* x, int64_t inner, int64_t C, int64_t nb, int64_t m,
                                  const double* partial, const ParamT<T>* scale,
                                  const ParamT<T>* offset, const ParamT<T>* mean,
                                  const ParamT<T>* variance, float epsilon, bool training,
                                  bool variance_as_u, ParamT<T>* batch_mean,
                                  ParamT<T>* batch_variance, ParamT<T>* mean_lo, ParamT<T>* coef) {
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
    if (variance_as_u) var = static_cast<double>(static_cast<U>(var));
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

// ---- backward ----

// Rows 0, 1, 5, 6 of the table, which the sums pass needs before the finalize writes the
// rest: a = U(r * s) is the forward's factor bit for bit.
template <typename U>
__global__ void EpiloguePrepareKernel(int64_t C, const U* scale, const U* offset, const U* mean,
                                      const U* mean_lo, const U* variance, float epsilon, U* coef) {
  const int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double r = InverseStd(static_cast<double>(variance[c]), static_cast<double>(epsilon));
  const double s = scale ? static_cast<double>(scale[c]) : 1.0;
  coef[c] = mean[c];
  coef[C + c] = mean_lo ? mean_lo[c] : U(0);
  coef[5 * C + c] = static_cast<U>(r * s);
  coef[6 * C + c] = offset ? offset[c] : U(0);
}

template <typename U>
struct EpilogueCenter {
  U hi, lo, a, b;
};

// Sums of dz and dz * ((x - hi) - lo), dz = dy * act'(z), for the generic reductions (three
// inputs: dy, x, residual). An absent residual reads as zeros: z + 0 differs from z only
// in the sign of a zero, and every act'(z) is the same at -0 and +0, so dz is the CPU's.
template <typename T_, int kAct>
struct EpilogueGradSumsOp {
  using T = T_;
  using U = ParamT<T>;
  static constexpr int kInputs = 3;
  const T* a;  // dy
  const T* b;  // x
  const T* c;  // residual, nullable
  const U* coef;
  int64_t C;
  __device__ explicit EpilogueGradSumsOp(const ReduceArgs& r)
      : a(static_cast<const T*>(r.a)),
        b(static_cast<const T*>(r.b)),
        c(static_cast<const T*>(r.c)),
        coef(static_cast<const U*>(r.coef)),
        C(r.channels) {}
  __device__ EpilogueCenter<U> CenterOf(int64_t ch) const {
    return {coef[ch], coef[C + ch], coef[5 * C + ch], coef[6 * C + ch]};
  }
  __device__ static void Add(T vdy, T vx, T vres, const EpilogueCenter<U>& k, U& s1, U& s2) {
    const U xc = (Num<T>::ToU(vx) - k.hi) - k.lo;
    const U z = (xc * k.a + k.b) + Num<T>::ToU(vres);
    const U g = EpilogueActGrad<kAct>(Num<T>::ToU(vdy), z);
    s1 += g;
    s2 += g * xc;
  }
};

// dz recomputed in U (never read back rounded to T), dx = ga * dz + gb * xc + gc (training)
// or ga * dz; dresidual = dz where wanted. k: the channel's 7 table entries.
template <int kAct, typename T>
__device__ __forceinline__ void EpilogueGradElement(T dy, T x, T res, bool has_res, bool full,
                                                    const ParamT<T>* k, T& dx, T& dz) {
  using U = ParamT<T>;
  const U xc = (Num<T>::ToU(x) - k[0]) - k[1];
  U z = xc * k[5] + k[6];
  if (has_res) z = z + Num<T>::ToU(res);
  const U g = EpilogueActGrad<kAct>(Num<T>::ToU(dy), z);
  dx = Num<T>::FromU(full ? k[2] * g + k[3] * xc + k[4] : k[2] * g);
  dz = Num<T>::FromU(g);
}

// Rows layout with C % kVec == 0 and every pointer 16-byte aligned: as ApplyRowsKernel (a
// thread keeps its kVec channels' coefficients in registers, rows taken last-first).
template <typename T, int kAct>
__global__ void __launch_bounds__(kThreads, kApplyRowsMinBlocks)
    EpilogueGradRowsKernel(const T* dy, const T* x, const T* res, const ParamT<T>* coef, bool full,
                           T* dx, T* dres, int64_t rows, int64_t C) {
  using U = ParamT<T>;
  constexpr int V = kVec<T>, kU = UnrollFor(2);
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t c0 = (int64_t{blockIdx.x} * TX + threadIdx.x) * V;
  if (c0 >= C) return;
  U k[V][kEpilogueCoefRows];
#pragma unroll
  for (int l = 0; l < V; ++l)
#pragma unroll
    for (int j = 0; j < kEpilogueCoefRows; ++j) k[l][j] = coef[j * C + c0 + l];
  const bool has_res = res != nullptr;
  const int64_t stride = int64_t{gridDim.y} * TY;
  for (int64_t r = int64_t{blockIdx.y} * TY + threadIdx.y; r < rows; r += kU * stride) {
    Pack<T, V> vg[kU], vx[kU], vr[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t ru = r + u * stride;
      if (ru < rows) {
        const int64_t at = (rows - 1 - ru) * C + c0;
        vg[u] = LoadPack<T, V>(dy + at);
        vx[u] = LoadPack<T, V>(x + at);
        if (has_res) vr[u] = LoadPack<T, V>(res + at);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t ru = r + u * stride;
      if (ru < rows) {
        Pack<T, V> odx, odz;
#pragma unroll
        for (int l = 0; l < V; ++l)
          EpilogueGradElement<kAct>(vg[u].v[l], vx[u].v[l], has_res ? vr[u].v[l] : vx[u].v[l],
                                    has_res, full, k[l], odx.v[l], odz.v[l]);
        const int64_t at = (rows - 1 - ru) * C + c0;
        StorePack<T, V>(dx + at, odx);
        if (dres) StorePack<T, V>(dres + at, odz);
      }
    }
  }
}

// Any layout, flattened into groups of V consecutive elements of one channel (V == 1, or
// inner % V == 0 with aligned pointers), grid-stride, last-first, with the position in the
// plane and the channel stepped back by the host's (step_i, step_c) as in ApplyFlatKernel.
template <typename T, int kAct, int V>
__global__ void __launch_bounds__(kThreads, kApplyMinBlocks)
    EpilogueGradFlatKernel(const T* dy, const T* x, const T* res, const ParamT<T>* coef, bool full,
                           T* dx, T* dres, int64_t size, int64_t C, int64_t inner, int64_t step_i,
                           int64_t step_c) {
  using U = ParamT<T>;
  constexpr int kU = UnrollFor(2);
  const int64_t groups = (size + V - 1) / V;
  int64_t g = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (g >= groups) return;
  const bool has_res = res != nullptr;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  const int64_t e = (groups - 1 - g) * V;
  const int64_t plane = e / inner;
  int64_t i = e - plane * inner;
  int64_t c = plane % C;
  for (; g < groups; g += kU * stride) {
    Pack<T, V> vg[kU], vx[kU], vr[kU];
    U k[kU][kEpilogueCoefRows];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t gu = g + u * stride;
      if (gu < groups) {
        const int64_t q = (groups - 1 - gu) * V;
        vg[u] = LoadPack<T, V>(dy + q);
        vx[u] = LoadPack<T, V>(x + q);
        if (has_res) vr[u] = LoadPack<T, V>(res + q);
#pragma unroll
        for (int j = 0; j < kEpilogueCoefRows; ++j) k[u][j] = coef[j * C + c];
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
        Pack<T, V> odx, odz;
#pragma unroll
        for (int l = 0; l < V; ++l)
          EpilogueGradElement<kAct>(vg[u].v[l], vx[u].v[l], has_res ? vr[u].v[l] : vx[u].v[l],
                                    has_res, full, k[u], odx.v[l], odz.v[l]);
        StorePack<T, V>(dx + q, odx);
        if (dres) StorePack<T, V>(dres + q, odz);
      }
    }
  }
}

}  // namespace cuda
}  // namespace tfbn
