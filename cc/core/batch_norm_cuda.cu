// CUDA kernels and launchers for the core Batch Normalization math (see batch_norm_cuda.h
// for the contract and batch_norm_cpu.cc for the reference these kernels follow).
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
// not change the bits either. The file is compiled with --fmad=false: no multiply-add
// contraction, so the arithmetic is the CPU code's. How the launch constants were chosen:
// docs/tuning.md.
#include "core/batch_norm_cuda.h"

#include <cuda_runtime.h>

#include "core/cuda/common.cuh"
#include "core/cuda/finalize_kernels.cuh"
#include "core/cuda/launch_plans.cuh"

#ifndef __CUDACC__
#error "batch_norm_cuda.cu must be compiled by nvcc"
#endif

namespace tfbn {
namespace cuda {
namespace {

// ---- typed launchers ----

template <typename T>
cudaError_t Forward(const Layout& layout, const T* x, const ParamT<T>* scale,
                    const ParamT<T>* offset, const ParamT<T>* mean, const ParamT<T>* variance,
                    const ForwardArgs& args, T* y, ParamT<T>* batch_mean, ParamT<T>* batch_variance,
                    ParamT<T>* mean_lo, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream) {
  using U = ParamT<T>;
  const int64_t C = layout.channels;
  if (C == 0) return cudaSuccess;
  const ReducePlan plan = MakeReducePlan(layout, kVec<T>, args.training);
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, sizeof(U), 4);
  if (workspace_bytes < w.total() || !GridFits(layout, plan)) return cudaErrorInvalidValue;
  double* partial = static_cast<double*>(workspace);
  U* coef = reinterpret_cast<U*>(static_cast<char*>(workspace) + w.partial_bytes);
  if (plan.nb > 0) {
    const int width = LoadWidth<T>(plan.rows ? C : layout.inner, {x});
    LaunchReduce(MomentsOp<T>{x, nullptr, layout.inner}, layout, plan, width, partial, stream);
  }
  const dim3 fblock = FinalizeBlock(C);
  ForwardFinalizeKernel<T><<<static_cast<unsigned>(CeilDiv(C, fblock.x)), fblock, 0, stream>>>(
      x, layout.inner, C, plan.nb, layout.per_channel(), partial, scale, offset, mean, variance,
      args.epsilon, args.training, batch_mean, batch_variance, mean_lo, coef);
  LaunchApply<ForwardApply<T>>(x, nullptr, coef, y, layout, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Backward(const Layout& layout, const T* dy, const T* x, const ParamT<T>* scale,
                     const ParamT<T>* mean, const ParamT<T>* mean_lo, const ParamT<T>* variance,
                     const ParamT<T>* d_batch_mean, const ParamT<T>* d_batch_variance,
                     const ForwardArgs& args, T* dx, ParamT<T>* dscale, ParamT<T>* doffset,
                     void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using U = ParamT<T>;
  const int64_t C = layout.channels;
  if (C == 0) return cudaSuccess;
  const ReducePlan plan = MakeReducePlan(layout, kVec<T>, true);
  const WorkspacePlan w = MakeWorkspacePlan(layout, plan, sizeof(U), 5);
  if (workspace_bytes < w.total() || !GridFits(layout, plan)) return cudaErrorInvalidValue;
  double* partial = static_cast<double*>(workspace);
  U* coef = reinterpret_cast<U*>(static_cast<char*>(workspace) + w.partial_bytes);
  if (plan.nb > 0) {
    const int width = LoadWidth<T>(plan.rows ? C : layout.inner, {dy, x});
    LaunchReduce(GradSumsOp<T>{dy, x, mean, mean_lo}, layout, plan, width, partial, stream);
  }
  const dim3 fblock = FinalizeBlock(C);
  BackwardFinalizeKernel<U><<<static_cast<unsigned>(CeilDiv(C, fblock.x)), fblock, 0, stream>>>(
      C, plan.nb, layout.per_channel(), partial, scale, mean, mean_lo, variance, d_batch_mean,
      d_batch_variance, args.epsilon, args.training, dscale, doffset, coef);
  if (args.training)
    LaunchApply<GradApply<T>>(dy, x, coef, dx, layout, stream);
  else
    LaunchApply<GradApplyDyOnly<T>>(dy, nullptr, coef, dx, layout, stream);
  return cudaGetLastError();
}

int VecOf(DType t) { return static_cast<int>(16 / ElementBytes(t)); }

}  // namespace

size_t ForwardWorkspaceBytes(DType dtype, const Layout& layout, bool training) {
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), training);
  return MakeWorkspacePlan(layout, plan, ParamBytes(dtype), 4).total();
}

size_t BackwardWorkspaceBytes(DType dtype, const Layout& layout) {
  const ReducePlan plan = MakeReducePlan(layout, VecOf(dtype), true);
  return MakeWorkspacePlan(layout, plan, ParamBytes(dtype), 5).total();
}

cudaError_t BatchNormForward(DType dtype, const Layout& layout, const void* x, const void* scale,
                             const void* offset, const void* mean, const void* variance,
                             const ForwardArgs& args, void* y, void* batch_mean,
                             void* batch_variance, void* mean_lo, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  if (UnsupportedArgs(args) != nullptr) return cudaErrorNotSupported;
#define TFBN_FORWARD(T)                                                                    \
  Forward<T>(layout, static_cast<const T*>(x), static_cast<const ParamT<T>*>(scale),       \
             static_cast<const ParamT<T>*>(offset), static_cast<const ParamT<T>*>(mean),   \
             static_cast<const ParamT<T>*>(variance), args, static_cast<T*>(y),            \
             static_cast<ParamT<T>*>(batch_mean), static_cast<ParamT<T>*>(batch_variance), \
             static_cast<ParamT<T>*>(mean_lo), workspace, workspace_bytes, stream)
  switch (dtype) {
    case DType::kHalf:
      return TFBN_FORWARD(__half);
    case DType::kBFloat16:
      return TFBN_FORWARD(__nv_bfloat16);
    case DType::kFloat:
      return TFBN_FORWARD(float);
    case DType::kDouble:
      return TFBN_FORWARD(double);
  }
#undef TFBN_FORWARD
  return cudaErrorInvalidValue;
}

cudaError_t BatchNormBackward(DType dtype, const Layout& layout, const void* dy, const void* x,
                              const void* scale, const void* mean, const void* mean_lo,
                              const void* variance, const void* d_batch_mean,
                              const void* d_batch_variance, const ForwardArgs& args, void* dx,
                              void* dscale, void* doffset, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  if (UnsupportedArgs(args) != nullptr) return cudaErrorNotSupported;
#define TFBN_BACKWARD(T)                                                                       \
  Backward<T>(layout, static_cast<const T*>(dy), static_cast<const T*>(x),                     \
              static_cast<const ParamT<T>*>(scale), static_cast<const ParamT<T>*>(mean),       \
              static_cast<const ParamT<T>*>(mean_lo), static_cast<const ParamT<T>*>(variance), \
              static_cast<const ParamT<T>*>(d_batch_mean),                                     \
              static_cast<const ParamT<T>*>(d_batch_variance), args, static_cast<T*>(dx),      \
              static_cast<ParamT<T>*>(dscale), static_cast<ParamT<T>*>(doffset), workspace,    \
              workspace_bytes, stream)
  switch (dtype) {
    case DType::kHalf:
      return TFBN_BACKWARD(__half);
    case DType::kBFloat16:
      return TFBN_BACKWARD(__nv_bfloat16);
    case DType::kFloat:
      return TFBN_BACKWARD(float);
    case DType::kDouble:
      return TFBN_BACKWARD(double);
  }
#undef TFBN_BACKWARD
  return cudaErrorInvalidValue;
}

const char* UnsupportedArgs(const ForwardArgs& args) {
  if (args.activation != Activation::kIdentity)
    return "the CUDA kernels have no fused epilogue: activation must be 'identity' on the GPU "
           "(the relu, relu6 and silu epilogues run on the CPU)";
  return nullptr;
}

const char* ErrorString(cudaError_t error) { return cudaGetErrorString(error); }

int RuntimeVersion() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int DriverVersion() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear: "no driver" is an answer here, not an error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace tfbn
