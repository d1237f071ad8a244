// Elementwise passes: the per-channel coefficients applied to every element.
// Part of the device sources (kernels.cu, compiled by NVRTC).
#pragma once

#include "core/cuda/common.cuh"

namespace tfbn {
namespace cuda {

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
    return Num<T>::FromU(k[2] * Num<T>::ToU(dy) + k[3] * ((Num<T>::ToU(x) - k[0]) - k[1]) + k[4]);
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
    ApplyRowsKernel(const typename Op::T* a, const typename Op::T* b, const typename Op::U* coef,
                    typename Op::T* out, int64_t rows, int64_t C) {
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
    ApplyFlatKernel(const typename Op::T* a, const typename Op::T* b, const typename Op::U* coef,
                    typename Op::T* out, int64_t size, int64_t C, int64_t inner, int64_t step_i,
                    int64_t step_c) {
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

}  // namespace cuda
}  // namespace tfbn
