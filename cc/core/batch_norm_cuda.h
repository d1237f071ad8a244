// tfbn core: CUDA launchers for the fused Batch Normalization (see batch_norm.h for the math).
//
// Framework-free: raw device pointers, sizes as a Layout, a cudaStream_t and a device
// workspace the caller allocates (size from the *WorkspaceBytes functions). Every launcher
// only enqueues work on `stream`: no allocation, no synchronization, no host copies.
// Per-channel inputs and outputs live in device memory.
//
// The results follow BatchNormForward / BatchNormBackward in batch_norm.h formula by
// formula (moments shifted by the channel's first sample, terms summed in U over short
// stretches flushed into double, and batch_norm_math.h's two-part mean and per-channel
// coefficients, without fused multiply-add), so the elementwise part matches the CPU
// kernels bit for bit given the same statistics; the statistics agree up to the order of
// the additions. Reductions use a partition that depends on the shape and dtype only, and
// merge partials in a fixed order, without floating-point atomics: the same inputs give
// bitwise the same outputs on every run and every GPU.
//
// Data of dtype T is x, y, dy, dx. Per-channel values (scale, offset, mean, variance,
// statistics, mean_lo, gradients) are U = double for kDouble and float otherwise.
// kHalf is IEEE binary16 (__half, Eigen::half); kBFloat16 is bfloat16 (__nv_bfloat16,
// Eigen::bfloat16): only the bit layout matters.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "core/batch_norm.h"

namespace tfbn {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

inline size_t ElementBytes(DType t) { return t == DType::kDouble ? 8 : t == DType::kFloat ? 4 : 2; }
inline size_t ParamBytes(DType t) { return t == DType::kDouble ? 8 : 4; }

// Device workspace the launchers need for these sizes (0 is possible). The size depends on
// dtype, layout and mode only, never on the pointers.
size_t ForwardWorkspaceBytes(DType dtype, const Layout& layout, bool training);
size_t BackwardWorkspaceBytes(DType dtype, const Layout& layout);

// As BatchNormForward in batch_norm.h. scale/offset may be nullptr (1 and 0);
// mean/variance are read in inference only. y may alias x.
// Returns cudaErrorInvalidValue for a too small workspace or a grid CUDA cannot launch,
// else the launch status.
cudaError_t BatchNormForward(DType dtype, const Layout& layout, const void* x, const void* scale,
                             const void* offset, const void* mean, const void* variance,
                             const ForwardArgs& args, void* y, void* batch_mean,
                             void* batch_variance, void* mean_lo, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// As BatchNormBackward in batch_norm.h. scale, mean_lo, d_batch_mean and
// d_batch_variance may be nullptr (1, 0, 0, 0). dx may alias dy.
cudaError_t BatchNormBackward(DType dtype, const Layout& layout, const void* dy, const void* x,
                              const void* scale, const void* mean, const void* mean_lo,
                              const void* variance, const void* d_batch_mean,
                              const void* d_batch_variance, const ForwardArgs& args, void* dx,
                              void* dscale, void* doffset, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

// The CUDA kernels have no fused epilogue: the launchers refuse an activation other than
// identity with cudaErrorNotSupported. This says why in words (nullptr where the launchers
// take these arguments), for the callers' error messages.
const char* UnsupportedArgs(const ForwardArgs& args);

// The CUDA runtime linked into this library (static), for callers that must not bind to
// another one (the TensorFlow glue, which sees TensorFlow's runtime stubs).
const char* ErrorString(cudaError_t error);
int RuntimeVersion();  // e.g. 13000; 0 if unknown
int DriverVersion();   // 0 without a driver
int DeviceCount();     // 0 without a usable GPU (no driver, no device)

}  // namespace cuda
}  // namespace tfbn
