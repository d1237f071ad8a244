// Launch constants, element types (Num<T>: storage <-> compute type), vector packs.
// Part of the CUDA kernels: batch_norm_cuda.cu includes it (one translation unit, so the
// kernels and their launchers share one anonymous namespace).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/batch_norm_cuda.h"

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
// Rows: fewer partial rows for the finalize to merge; planes: more blocks (docs/tuning.md).
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

}  // namespace
}  // namespace cuda
}  // namespace tfbn
