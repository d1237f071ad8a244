// The inner loops of the CPU kernels, compiled once per instruction set (baseline x86-64,
// AVX2+FMA+F16C, AVX-512) and chosen at run time (cpu_dispatch.cc). The driver in
// batch_norm_cpu.cc owns the partition, the threads and the per-channel math; these only
// stream over memory. Every kernel sums in a fixed order, so all instruction sets give
// the same bits.
#pragma once

#include <cstdint>

namespace tfbn {

// Storage-compatible stand-ins for Eigen::half / Eigen::bfloat16, so the per-ISA files
// need no Eigen (inline functions compiled with different -m flags must not be shared).
struct HalfBits {
  uint16_t bits;
};
struct BFloat16Bits {
  uint16_t bits;
};

// Reductions: "rows" kernels add rows [r0, r1) of a channels-last layout (inner == 1) into
// per-channel sums; "planar" kernels sum channels [c0, c1) of an [outer, C, inner] tensor
// over their per-channel indices [j0, j1) (j = o * inner + i) into s1[c], s2[c], walking
// the planes in memory order (the sums do not depend on how the channels are grouped).
// hi and lo are the mean's two parts (batch_norm.h's mean and mean_lo): x is centred as
// (x - hi) - lo.
// The per-channel parameter arrays of the elementwise kernels (hi, lo, a, b, ga, gb, gc)
// hold C + kParamPadding entries, entry C + j repeating entry j % C: channels-last blocks
// then read their parameters with one load even where they wrap into the next row.
constexpr int64_t kParamPadding = 16;

template <typename T, typename U>
struct CpuKernels {
  void (*moments_rows)(const T* x, int64_t C, int64_t r0, int64_t r1, const U* shift, double* s1,
                       double* s2);
  void (*moments_planar)(const T* x, int64_t C, int64_t inner, int64_t c0, int64_t c1, int64_t j0,
                         int64_t j1, const U* shift, double* s1, double* s2);
  void (*grad_sums_rows)(const T* dy, const T* x, int64_t C, int64_t r0, int64_t r1, const U* hi,
                         const U* lo, double* s1, double* s2);
  void (*grad_sums_planar)(const T* dy, const T* x, int64_t C, int64_t inner, int64_t c0,
                           int64_t c1, int64_t j0, int64_t j1, const U* hi, const U* lo, double* s1,
                           double* s2);
  // Elementwise passes over the flat element range [e0, e1) of an [outer, C, inner]
  // tensor. stream: write with non-temporal stores (outputs too large to stay cached).
  // y = ((x - hi) - lo) * a + b
  void (*affine)(const T* x, T* y, int64_t C, int64_t inner, int64_t e0, int64_t e1, const U* hi,
                 const U* lo, const U* a, const U* b, bool stream);
  // dx = ga * dy + gb * ((x - hi) - lo) + gc; gb == nullptr: dx = ga * dy.
  void (*grad)(const T* dy, const T* x, T* dx, int64_t C, int64_t inner, int64_t e0, int64_t e1,
               const U* hi, const U* lo, const U* ga, const U* gb, const U* gc, bool stream);

  // The fused epilogue, one entry per Activation (batch_norm.h), residual nullptr = none:
  // z = ((x - hi) - lo) * a + b + residual, the forward's z bit for bit.
  // y = act(z)
  void (*affine_epilogue[4])(const T* x, const T* residual, T* y, int64_t C, int64_t inner,
                             int64_t e0, int64_t e1, const U* hi, const U* lo, const U* a,
                             const U* b, bool stream);
  // The sums of grad_sums_* with dz = dy * act'(z) in place of dy; dz (nullptr: not
  // wanted) receives dz itself (stream: with non-temporal stores where aligned).
  void (*epilogue_sums_rows[4])(const T* dy, const T* x, const T* residual, int64_t C, int64_t r0,
                                int64_t r1, const U* hi, const U* lo, const U* a, const U* b,
                                double* s1, double* s2, T* dz, bool stream);
  void (*epilogue_sums_planar[4])(const T* dy, const T* x, const T* residual, int64_t C,
                                  int64_t inner, int64_t c0, int64_t c1, int64_t j0, int64_t j1,
                                  const U* hi, const U* lo, const U* a, const U* b, double* s1,
                                  double* s2, T* dz, bool stream);
  // dx = ga * dz + gb * ((x - hi) - lo) + gc (gb == nullptr: dx = ga * dz), z recomputed
  // (the gradient without a dresidual output; with one, grad reads the stored dz).
  void (*epilogue_grad[4])(const T* dy, const T* x, const T* residual, T* dx, int64_t C,
                           int64_t inner, int64_t e0, int64_t e1, const U* hi, const U* lo,
                           const U* a, const U* b, const U* ga, const U* gb, const U* gc,
                           bool stream);

  // The weighted (masked) kernels: one float weight per (outer, inner) position, times
  // wscale (a power of two). Statistics: s1 += w * d, s2 += w * d * d with d = x - shift,
  // over channels-last rows [r0, r1) or channel c's per-channel indices [j0, j1).
  void (*weighted_moments_rows)(const T* x, const float* w, U wscale, int64_t C, int64_t r0,
                                int64_t r1, const U* shift, double* s1, double* s2);
  void (*weighted_moments_planar)(const T* x, const float* w, U wscale, int64_t C, int64_t inner,
                                  int64_t c, int64_t j0, int64_t j1, U shift, double* s1,
                                  double* s2);
  // dx = ga * dy + w * (gb * ((x - hi) - lo) + gc) over channels-last rows [r0, r1), R rows
  // at a time with the coefficients tiled R times (R * C <= 512 where R > 1), or over the
  // planes [p0, p1) (plane p = o * C + c) of a planar layout.
  void (*weighted_grad_rows)(const T* dy, const T* x, T* dx, const float* w, U wscale, int64_t C,
                             int64_t r0, int64_t r1, int64_t R, const U* hi, const U* lo,
                             const U* ga, const U* gb, const U* gc);
  void (*weighted_grad_planes)(const T* dy, const T* x, T* dx, const float* w, U wscale, int64_t C,
                               int64_t inner, int64_t p0, int64_t p1, const U* hi, const U* lo,
                               const U* ga, const U* gb, const U* gc);
};

// The most values weighted_grad_rows takes in one pass: R rows of C channels, R * C <= this.
constexpr int64_t kWeightedRowsSpan = 512;

struct CpuKernelTable {
  const char* isa;
  // A streaming copy (non-temporal stores, as the kernels write large outputs): the
  // memory-bandwidth yardstick of the benchmarks.
  void (*stream_copy)(const void* src, void* dst, int64_t nbytes);
  CpuKernels<HalfBits, float> half;
  CpuKernels<BFloat16Bits, float> bfloat16;
  CpuKernels<float, float> f32;
  CpuKernels<double, double> f64;
};

// The table the kernels use: the best instruction set this processor supports, or the one
// TFBN_CPU_ISA names (see CpuInstructionSet in batch_norm.h).
const CpuKernelTable& BestCpuKernels();

// Per-ISA tables (defined in cpu_kernels_<isa>.cc).
const CpuKernelTable& GenericCpuKernels();
const CpuKernelTable& Avx2CpuKernels();
const CpuKernelTable& Avx512CpuKernels();
const CpuKernelTable& Avx512Bf16CpuKernels();

}  // namespace tfbn
