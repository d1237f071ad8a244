// Device-side launch constants, element types (Num<T>: storage <-> compute type), vector
// packs. Part of the device sources (kernels.cu, compiled by NVRTC).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda/kernel_args.h"

namespace tfbn {
namespace cuda {

template <class Op>
constexpr int kUnroll = UnrollFor(Op::kInputs);
template <class Op>
constexpr int kReduceUnroll = ReduceUnrollFor(Op::kInputs, sizeof(typename Op::T));

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
  static __device__ __forceinline__ __nv_bfloat16 FromU(float v) { return __float2bfloat16_rn(v); }
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

}  // namespace cuda
}  // namespace tfbn
