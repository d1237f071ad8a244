// tfbn core: CUDA launchers for Batch Normalization (see batch_norm.h for the math).
//
// Framework-free host code: raw device pointers, sizes as a Layout, a stream handle and a
// device workspace the caller allocates (size from the *WorkspaceBytes functions). Every
// launcher only enqueues work on `stream`: no allocation, no synchronization, no host
// copies. Per-channel inputs and outputs live in device memory.
//
// The kernels are compiled at build time by NVRTC (CUDA 12.5) into SASS for each supported
// architecture plus PTX for newer GPUs, embedded in this library, and launched through the
// CUDA driver API (libcuda.so.1, opened with dlopen at the first launch, in the context the
// stream belongs to). Nothing CUDA is linked: the library loads on machines without a GPU or
// a driver, and those never open libcuda.
//
// The results follow the CPU functions of batch_norm.h formula by formula (moments shifted
// by the channel's first sample, terms summed in U over short stretches flushed into
// double, and batch_norm_math.h's two-part mean and per-channel coefficients, without
// fused multiply-add), so the elementwise part matches the CPU kernels bit for bit given
// the same statistics; the statistics agree up to the order of the additions. Reductions
// use a partition that depends on the shape and dtype only, and merge partials in a fixed
// order, without floating-point atomics: the same inputs give bitwise the same outputs on
// every run and every GPU of one architecture.
//
// Data of dtype T is x, y, dy, dx, residual, dresidual. Per-channel values (scale, offset,
// mean, variance, statistics, mean_lo, gradients) are U = double for kDouble and float
// otherwise. kHalf is IEEE binary16 (__half, Eigen::half); kBFloat16 is bfloat16
// (__nv_bfloat16, Eigen::bfloat16): only the bit layout matters. Partials, sums and
// counts of the split family are double; weights are float.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/batch_norm.h"

namespace tfbn {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

inline size_t ElementBytes(DType t) { return t == DType::kDouble ? 8 : t == DType::kFloat ? 4 : 2; }
inline size_t ParamBytes(DType t) { return t == DType::kDouble ? 8 : 4; }

// A CUstream (the same handle as a cudaStream_t); nullptr is the legacy default stream.
using Stream = void*;

// A CUresult: 0 (kSuccess) or the driver's error code, or one of tfbn's below.
using Result = int;
constexpr Result kSuccess = 0;
constexpr Result kInvalidValue = 1;    // CUDA_ERROR_INVALID_VALUE: too small a workspace, ...
constexpr Result kNoDriver = 35;       // CUDA_ERROR_INSUFFICIENT_DRIVER: no usable libcuda
constexpr Result kNoBinary = 209;      // CUDA_ERROR_NO_BINARY_FOR_GPU: no image for this GPU
constexpr Result kNotSupported = 801;  // CUDA_ERROR_NOT_SUPPORTED
// What went wrong, in words (the driver's description, or tfbn's for the codes above,
// with the detail of the last failure on this thread where there is one).
const char* ErrorString(Result result);

// ---- The fused op ----

// Device workspace the launchers need for these sizes (0 is possible). The size depends on
// dtype, layout and mode only, never on the pointers.
size_t ForwardWorkspaceBytes(DType dtype, const Layout& layout, bool training);
size_t BackwardWorkspaceBytes(DType dtype, const Layout& layout);

// As BatchNormForward in batch_norm.h. scale/offset may be nullptr (1 and 0);
// mean/variance are read in inference only. y may alias x.
// Returns kInvalidValue for a too small workspace or a grid CUDA cannot launch,
// kNotSupported for an activation (use the epilogue launchers), else the launch status.
Result BatchNormForward(DType dtype, const Layout& layout, const void* x, const void* scale,
                        const void* offset, const void* mean, const void* variance,
                        const ForwardArgs& args, void* y, void* batch_mean, void* batch_variance,
                        void* mean_lo, void* workspace, size_t workspace_bytes, Stream stream);

// As BatchNormBackward in batch_norm.h. scale, mean_lo, d_batch_mean and
// d_batch_variance may be nullptr (1, 0, 0, 0). dx may alias dy.
Result BatchNormBackward(DType dtype, const Layout& layout, const void* dy, const void* x,
                         const void* scale, const void* mean, const void* mean_lo,
                         const void* variance, const void* d_batch_mean,
                         const void* d_batch_variance, const ForwardArgs& args, void* dx,
                         void* dscale, void* doffset, void* workspace, size_t workspace_bytes,
                         Stream stream);

// ---- The fused epilogue: y = act(BN(x) + residual) ----
// As BatchNormForwardEpilogue / BatchNormBackwardEpilogue in batch_norm.h (residual nullptr:
// none; args.activation any). The forward's workspace is the plain op's; the backward's
// holds two more per-channel rows (z is recomputed from the forward's factor and offset).
size_t ForwardEpilogueWorkspaceBytes(DType dtype, const Layout& layout, bool training);
size_t BackwardEpilogueWorkspaceBytes(DType dtype, const Layout& layout);
Result BatchNormForwardEpilogue(DType dtype, const Layout& layout, const void* x, const void* scale,
                                const void* offset, const void* mean, const void* variance,
                                const void* residual, const ForwardArgs& args, void* y,
                                void* batch_mean, void* batch_variance, void* mean_lo,
                                void* workspace, size_t workspace_bytes, Stream stream);
// dresidual nullptr: not wanted. dx, dresidual never alias dy, x or the residual.
Result BatchNormBackwardEpilogue(DType dtype, const Layout& layout, const void* dy, const void* x,
                                 const void* scale, const void* offset, const void* residual,
                                 const void* mean, const void* mean_lo, const void* variance,
                                 const void* d_batch_mean, const void* d_batch_variance,
                                 const ForwardArgs& args, void* dx, void* dresidual, void* dscale,
                                 void* doffset, void* workspace, size_t workspace_bytes,
                                 Stream stream);

// ---- The split family (batch_norm.h): statistics | merge | apply ----

// PartialMoments / WeightedPartialMoments: partial [kPartialRows][C] doubles (count or
// weight sum, mean, M2). weights nullptr: every element weighs 1; else [outer * inner]
// floats, finite and >= 0 (the caller checks; a negative or non-finite weight makes that
// channel's partial NaN).
size_t StatsWorkspaceBytes(DType dtype, const Layout& layout, bool weighted);
Result PartialMoments(DType dtype, const Layout& layout, const void* x, const float* weights,
                      double* partial, void* workspace, size_t workspace_bytes, Stream stream);

// MergeMoments + FinalizeMoments: partials [parts][kPartialRows][C] -> mean, variance,
// mean_lo (U = param_dtype, kFloat or kDouble) and count [C] doubles. No workspace.
Result MergeMoments(DType param_dtype, int64_t parts, int64_t channels, const double* partials,
                    void* mean, void* variance, void* mean_lo, double* count, Stream stream);

// ApplyStatistics: y = ((x - mean) - mean_lo) * rsqrt(variance + epsilon) * scale + offset.
size_t ApplyWorkspaceBytes(DType dtype, const Layout& layout);
Result ApplyStatistics(DType dtype, const Layout& layout, const void* x, const void* scale,
                       const void* offset, const void* mean, const void* mean_lo,
                       const void* variance, float epsilon, void* y, void* workspace,
                       size_t workspace_bytes, Stream stream);

// GradSums: sums [2][C] doubles, sum dy and sum dy * ((x - mean) - mean_lo); mean_lo may
// be nullptr (0).
size_t GradSumsWorkspaceBytes(DType dtype, const Layout& layout);
Result GradSums(DType dtype, const Layout& layout, const void* dy, const void* x, const void* mean,
                const void* mean_lo, double* sums, void* workspace, size_t workspace_bytes,
                Stream stream);

// ApplyGradWithSums / WeightedApplyGradWithSums (weights nullptr: the plain one).
// global_rows is 2 or 4. dx may alias dy.
size_t GradApplyWorkspaceBytes(DType dtype, const Layout& layout);
Result ApplyGradWithSums(DType dtype, const Layout& layout, const void* dy, const void* x,
                         const void* scale, const void* mean, const void* mean_lo,
                         const void* variance, const double* local_sums, const double* global_sums,
                         int64_t global_rows, const double* count, const float* weights,
                         float epsilon, void* dx, void* dscale, void* doffset, void* workspace,
                         size_t workspace_bytes, Stream stream);

// ---- The driver ----

// The NVRTC version the kernels were compiled with (e.g. 12050) and the images embedded
// ("sm_60 ... sm_90 compute_90"), without touching the driver.
int CompilerVersion();
const char* Architectures();
// How the images are embedded: "zlib" (inflated at their first use) or "none".
const char* ImageCompression();
// One embedded image as the driver gets it (inflated; a PTX image ends in its NUL), for
// tools and tests. Empty, with *error set, for an arch not in Architectures().
std::string InflatedImage(const std::string& arch, std::string* error);
// The driver's version (e.g. 12080), 0 without a usable libcuda. Opens libcuda (once).
int DriverVersion();
// Devices the driver sees, 0 without a driver or a GPU.
int DeviceCount();

}  // namespace cuda
}  // namespace tfbn
