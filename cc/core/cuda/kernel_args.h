// What the host launchers and the device kernels share: launch constants and the structs
// passed to kernels by value. Compiled by both the host compiler and NVRTC, so a struct
// here has one layout on both sides (cuLaunchKernel copies its bytes as they are).
#pragma once

#if defined(__CUDACC_RTC__)
#include <cuda/std/cstdint>
#else
#include <cstdint>
#endif

#include "core/host_device.h"

namespace tfbn {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of the reduction and apply kernels
constexpr int kFlush = 32;     // elements summed in U before adding into double
// Loads in flight per thread and input: fewer for two inputs, to keep registers (and so
// resident warps) in check; the bytes in flight per thread stay the same.
constexpr TFBN_HD int UnrollFor(int inputs) { return inputs >= 2 ? 2 : 4; }
// The rows reduction keeps more loads in flight (its blocks are latency-bound otherwise),
// except with three 16-bit inputs: a thread's 8 channels' constants (4 per channel for the
// epilogue) and sums leave no room under the 128-register cap for 4 rows of 3 loads, and
// that kernel spilled 404 bytes per thread (ptxas, sm_90). The unroll only groups loads:
// the order in which elements are summed does not depend on it.
constexpr TFBN_HD int ReduceUnrollFor(int inputs, int element_bytes) {
  return inputs == 3 && element_bytes == 2 ? UnrollFor(inputs) : 2 * UnrollFor(inputs);
}
constexpr int kReduceMinBlocks = 2;      // per SM: caps registers at 128
constexpr int kApplyMinBlocks = 3;       // per SM: caps registers at 80
constexpr int kApplyRowsMinBlocks = 2;   // keeps 4 x kVec coefficients per thread in registers
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
// Workspace bytes the weighted split kernels keep what they learn about the weights in
// (split_kernels.cuh's WeightInfo).
constexpr int64_t kWeightInfoBytes = 256;

// The inputs of a two-sum reduction (reduce_kernels.cuh). Pointers to T or U as the
// operator says; nullptr where unused.
struct ReduceArgs {
  const void* a;   // x (moments) or dy (gradient sums)
  const void* b;   // x (gradient sums)
  const void* hi;  // gradient sums: the mean (U)
  const void* lo;  // gradient sums: the mean's low part (U), nullptr for 0
  int64_t inner;   // moments: channel c's shift is a[c * inner]
  // Epilogue gradient sums only (three inputs): the residual (nullptr: none), the [7][C]
  // coefficient table (epilogue_kernels.cuh) and C.
  const void* c = nullptr;
  const void* coef = nullptr;
  int64_t channels = 0;
};

}  // namespace cuda
}  // namespace tfbn
