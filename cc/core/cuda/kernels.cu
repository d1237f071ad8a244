// The device sources of every tfbn CUDA kernel: one translation unit, compiled at build
// time by NVRTC (cmake/nvrtc_compile.py) for each architecture, with --fmad=false (no
// multiply-add contraction, so the arithmetic is the CPU code's). The instantiations
// compiled are the names the launchers list (kernel_names.h); the host code launches them
// through the driver API (driver.cc). Nothing here is compiled by the host compiler.
//
// Structure, per direction: a reduction kernel writes per-block double partials into the
// workspace (terms computed in U and summed in U over short stretches that are flushed
// into double, as the CPU kernels do); a small finalize kernel merges the partials in a
// fixed order and turns them into per-channel coefficients (the CPU code's formulas,
// evaluated in double); an elementwise kernel applies the coefficients, visiting the data
// last-first so that the part the reduction read last is still in L2. Two layouts of the
// [outer, C, inner] view:
//   rows   (inner == 1, channels last): a thread owns kVec adjacent channels and walks rows;
//   planes (inner > 1): a channel gets a block, or 64 threads of one when it has little
//          data, for a range of its outer*inner elements.
//
// Determinism: what each thread sums, in which order, and how blocks and threads are merged
// depends on the shape and dtype only. Vector loads are an implementation detail of the
// same element order (narrower or scalar loads for misaligned data, or planes that are not
// a multiple of the vector, visit the same elements in the same order), so alignment does
// not change the bits either. How the launch constants were chosen: docs/tuning.md.
#if !defined(__CUDACC_RTC__)
#error "kernels.cu is compiled by NVRTC at build time (cmake/nvrtc_compile.py)"
#endif

#include "core/cuda/apply_kernels.cuh"
#include "core/cuda/epilogue_kernels.cuh"
#include "core/cuda/finalize_kernels.cuh"
#include "core/cuda/reduce_kernels.cuh"
#include "core/cuda/split_kernels.cuh"
