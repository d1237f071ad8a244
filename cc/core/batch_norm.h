// tfbn core: Batch Normalization math, framework-free (no TensorFlow, no Python).
//
// Every tensor is viewed as [outer, channels, inner] (see Layout): NHWC is inner == 1,
// NCHW is outer == N. Statistics are accumulated in double and returned in U (float for
// half/bfloat16/float data, double for double data). Reductions use a block partition that
// depends on the shape only, and partials are merged in a fixed order, so results are
// bitwise identical for any number of threads.
#pragma once

#include <cstdint>
#include <functional>

#include "core/activation.h"

namespace tfbn {

struct Layout {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
  int64_t per_channel() const { return outer * inner; }  // m: elements reduced per channel
  int64_t size() const { return outer * channels * inner; }
};

// Runs fn(begin, end) over sub-ranges that together cover [0, n) exactly once, possibly
// on several threads. cost_per_item is a rough cycle count per item, used for sharding.
using RangeFn = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = std::function<void(int64_t n, int64_t cost_per_item, const RangeFn& fn)>;

// A ParallelFor that runs everything on the calling thread.
const ParallelFor& SerialFor();

// Copies nbytes with non-temporal stores, the way the kernels write large outputs: the
// memory-bandwidth yardstick the benchmarks compare the kernels with.
void StreamCopy(const void* src, void* dst, int64_t nbytes, const ParallelFor& parallel_for);

// The instruction set whose CPU kernels run ("avx512_bf16", "avx512", "avx2" or "generic"):
// the best this processor supports, or the one the environment variable TFBN_CPU_ISA names
// (chosen once, at the first kernel call). A TFBN_CPU_ISA that cannot be honoured (unknown, or not
// supported here) leaves the best supported set running, with a warning on stderr.
const char* CpuInstructionSet();
// The instruction sets this processor and build support, space-separated ("generic avx2").
const char* CpuInstructionSetsSupported();
// TFBN_CPU_ISA as read ("" when unset), and why it was not honoured ("" when it was).
const char* CpuInstructionSetRequested();
const char* CpuInstructionSetWarning();

// ---- Building blocks (shared by the fused ops and, later, synchronized BN). ----

// Per-channel mean and M2 = sum of squared deviations from the mean, in double.
// An empty reduction (m == 0) gives NaN for both.
template <typename T>
void ChannelMoments(const Layout& layout, const T* x, double* mean, double* m2,
                    const ParallelFor& parallel_for);

// y = ((x - mean_hi) - mean_lo) * a + b per channel. The mean is split into two parts
// (batch_norm_math.h's SplitMean) so the subtraction keeps the data's precision when the
// mean is far from zero.
template <typename T, typename U>
void ApplyAffine(const Layout& layout, const T* x, const U* mean_hi, const U* mean_lo, const U* a,
                 const U* b, T* y, const ParallelFor& parallel_for);

// Per-channel sum(dy) and sum(dy * (x - mean)) in double, with mean = mean_hi + mean_lo.
template <typename T, typename U>
void GradSums(const Layout& layout, const T* dy, const T* x, const U* mean_hi, const U* mean_lo,
              double* sum_dy, double* sum_dy_xc, const ParallelFor& parallel_for);

// dx = ga * dy + gb * ((x - mean_hi) - mean_lo) + gc per channel. With gb == gc == nullptr the
// last two terms are skipped and x is not read (inference backward).
template <typename T, typename U>
void ApplyGrad(const Layout& layout, const T* dy, const T* x, const U* mean_hi, const U* mean_lo,
               const U* ga, const U* gb, const U* gc, T* dx, const ParallelFor& parallel_for);

// ---- The fused op, as TensorFlow and the Python module call it. ----

struct ForwardArgs {
  float epsilon = 1e-3f;
  bool training = true;
  Activation activation = Activation::kIdentity;  // CPU only: the CUDA launchers refuse others
};

// Training: batch mean and biased variance are computed and written to batch_mean /
// batch_variance; mean_lo receives the mean's low part mean - U(mean), which the backward pass
// needs to rebuild the centred input exactly. Inference: mean/variance are used and
// copied to batch_mean/batch_variance; mean_lo is set to zero.
// scale/offset may be nullptr (1 and 0). mean/variance are ignored in training.
template <typename T, typename U>
void BatchNormForward(const Layout& layout, const T* x, const U* scale, const U* offset,
                      const U* mean, const U* variance, const ForwardArgs& args, T* y,
                      U* batch_mean, U* batch_variance, U* mean_lo,
                      const ParallelFor& parallel_for);

// Gradient of BatchNormForward. mean/variance are the statistics the forward pass used
// (its batch_mean/batch_variance in training), mean_lo the low part of its mean (nullptr = 0).
// d_batch_mean/d_batch_variance (nullptr = 0) are the gradients reaching the forward's
// statistics outputs in training; they are folded into dx. scale nullptr means 1.
template <typename T, typename U>
void BatchNormBackward(const Layout& layout, const T* dy, const T* x, const U* scale, const U* mean,
                       const U* mean_lo, const U* variance, const U* d_batch_mean,
                       const U* d_batch_variance, const ForwardArgs& args, T* dx, U* dscale,
                       U* doffset, const ParallelFor& parallel_for);

// ---- The fused epilogue: y = act(z), z = BN(x) + residual, CPU. ----
// residual (nullptr = none) has x's shape; args.activation picks act. With an activation
// other than identity the normalization uses the variance as rounded to U (the value the
// gradient receives), so the gradient recomputes z bit for bit.
template <typename T, typename U>
void BatchNormForwardEpilogue(const Layout& layout, const T* x, const U* scale, const U* offset,
                              const U* mean, const U* variance, const T* residual,
                              const ForwardArgs& args, T* y, U* batch_mean, U* batch_variance,
                              U* mean_lo, const ParallelFor& parallel_for);

// Its gradient: z is recomputed from x, the statistics, scale, offset (nullptr = 0) and
// residual (nullptr = none), dz = dy * act'(z) replaces dy in BatchNormBackward, and
// dresidual (nullptr = not wanted) receives dz. No full-size temporary: the sums pass and
// the apply pass each recompute z.
template <typename T, typename U>
void BatchNormBackwardEpilogue(const Layout& layout, const T* dy, const T* x, const U* scale,
                               const U* offset, const T* residual, const U* mean, const U* mean_lo,
                               const U* variance, const U* d_batch_mean, const U* d_batch_variance,
                               const ForwardArgs& args, T* dx, T* dresidual, U* dscale, U* doffset,
                               const ParallelFor& parallel_for);

// ---- Split op family (batch_norm_split.cc): statistics | collective | apply. ----
// Synchronized BatchNorm runs these with a collective between the statistics and the
// apply steps, forward and backward; one replica runs the same kernels as the fused op,
// and for one part gives the same bits.

// Per-channel partial statistics of one slice of the batch, packed as kPartialRows rows
// of C doubles: count, mean, M2 (sum of squared deviations from the mean). An empty
// slice gives 0, 0, 0 (it contributes nothing to a merge).
constexpr int64_t kPartialRows = 3;
template <typename T>
void PartialMoments(const Layout& layout, const T* x, double* partial,
                    const ParallelFor& parallel_for);

// Merges partials [parts][kPartialRows][C] into merged [kPartialRows][C] with Chan's
// pairwise update, in part order (so every replica merging the same parts gets the same
// bits). Parts with count 0 are skipped; all empty gives 0, 0, 0.
void MergeMoments(int64_t parts, int64_t channels, const double* partials, double* merged);

// Merged [count, mean, M2] -> mean split into mean + mean_lo, biased variance; NaN for both
// where count is 0 (as the fused op's empty batch).
template <typename U>
void FinalizeMoments(int64_t channels, const double* merged, U* mean, U* mean_lo, U* variance);

// y = ((x - mean) - mean_lo) * rsqrt(variance + epsilon) * scale + offset.
// scale/offset nullptr mean 1/0, mean_lo nullptr means 0.
template <typename T, typename U>
void ApplyStatistics(const Layout& layout, const T* x, const U* scale, const U* offset,
                     const U* mean, const U* mean_lo, const U* variance, float epsilon, T* y,
                     const ParallelFor& parallel_for);

// Backward given sums over the whole (global) batch. local_sums [2][C]: GradSums of this
// slice (sum dy, sum dy * (x - mean)), which give dscale and doffset of this slice.
// global_sums [global_rows][C], global_rows 2 or 4: the same sums over every slice, and
// with 4 rows also the summed gradients reaching the batch mean and variance outputs.
// count [C]: elements per channel in the whole batch.
template <typename T, typename U>
void ApplyGradWithSums(const Layout& layout, const T* dy, const T* x, const U* scale, const U* mean,
                       const U* mean_lo, const U* variance, const double* local_sums,
                       const double* global_sums, int64_t global_rows, const double* count,
                       float epsilon, T* dx, U* dscale, U* doffset,
                       const ParallelFor& parallel_for);

// ---- Weighted split pieces (batch_norm_weighted.cc): masks. ----
// weights holds one value per (outer, inner) position, [outer * inner] in that order,
// shared by all channels (Keras' mask of rank - 1 for channels-last x); finite, >= 0.

// PartialMoments with weights: rows sum of weights W, weighted mean, M2 = sum w*(x-mean)^2.
// Positions of weight 0 are skipped (their values, NaN included, never reach the sums);
// all weights 0 gives 0, 0, 0.
template <typename T>
void WeightedPartialMoments(const Layout& layout, const T* x, const float* weights, double* partial,
                            const ParallelFor& parallel_for);

// ApplyGradWithSums for weighted statistics: count holds the merged weight sum W, and
// every term that comes from the statistics' dependence on x is scaled by the element's
// weight: dx = s*r*(dy - w*S1/W - w*xhat*S2/W) + w*d_mean/W + 2*w*d_var*(x - mean)/W.
template <typename T, typename U>
void WeightedApplyGradWithSums(const Layout& layout, const T* dy, const T* x, const U* scale,
                               const U* mean, const U* mean_lo, const U* variance,
                               const double* local_sums, const double* global_sums,
                               int64_t global_rows, const double* count, const float* weights,
                               float epsilon, T* dx, U* dscale, U* doffset,
                               const ParallelFor& parallel_for);

}  // namespace tfbn
