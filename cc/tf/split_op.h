// The OpKernels of the split op family (split_ops.cc), one body per op for every device:
// check the inputs, allocate the outputs, gather the tensors' data, then hand them to the
// device's Launcher, a policy with
//   // Whether the weights may be read on the host, where they are checked finite and
//   // non-negative; else they are passed on unread.
//   static constexpr bool kWeightsOnHost;
//   static constexpr bool kApplyYMayTakeX;  // whether Apply's y may take over x's buffer
//   template <T> Stats(ctx, layout, x, weights, partial);
//   template <U> Merge(ctx, parts, channels, partials, mean, variance, mean_lo, count);
//   template <T, U> Apply(ctx, layout, ApplyData<T, U>, epsilon);
//   template <T, U> GradSums(ctx, layout, dy, x, mean, mean_lo, sums);
//   template <T, U> GradApply(ctx, layout, GradApplyData<T, U>, epsilon);
// each returning absl::Status (CpuSplitLauncher in split_kernels.cc, GpuSplitLauncher in
// split_kernels_gpu.cc). Pointers are nullptr where the core takes nullptr for "not given".
#pragma once

#include <cstdint>
#include <vector>

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/large_outputs.h"
#include "tf/op_kernel_base.h"
#include "tf/validation.h"

namespace tfbn {

template <typename T, typename U>
struct ApplyData {
  const T* x;
  const U *scale, *offset, *mean, *mean_lo, *variance;
  T* y;
};

template <typename T, typename U>
struct GradApplyData {
  const T *dy, *x;
  const U *scale, *mean, *mean_lo, *variance;
  const double *local_sums, *global_sums;
  int64_t global_rows;
  const double* count;
  const float* weights;
  T* dx;
  U *dscale, *doffset;
};

template <typename Launcher, typename T>
class StatsOp : public TfbnOpKernel<StatsIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    Layout layout;
    const float* weights = nullptr;
    OP_REQUIRES_OK(ctx, PrepareWeights<Launcher::kWeightsOnHost>(ctx, &layout, &weights));
    tensorflow::Tensor* partial;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_output(
                 In::kPartial, tensorflow::TensorShape({kPartialRows, layout.channels}), &partial));
    OP_REQUIRES_OK(ctx, Launcher::Stats(ctx, layout, Data<T>(ctx, In::kX), weights,
                                        partial->flat<double>().data()));
  }
};

template <typename Launcher, typename U>
class MergeStatsOp : public TfbnOpKernel<MergeStatsIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    // The partials' shape only: their values stay where they are (device memory on GPU).
    const tensorflow::Tensor& p = Get(ctx, In::kPartials);
    const int rank = p.dims();
    OP_REQUIRES_OK(
        ctx, CheckPartials(rank, rank >= 2 ? p.dim_size(rank - 2) : -1, p.shape().DebugString()));
    const int64_t C = p.dim_size(rank - 1);
    const int64_t parts = rank == 3 ? p.dim_size(0) : p.dim_size(0) / kPartialRows;
    tensorflow::Tensor *mean, *variance, *mean_lo, *count;
    const tensorflow::TensorShape channels({C});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kMean, channels, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kVariance, channels, &variance));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kMeanLo, channels, &mean_lo));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kCount, channels, &count));
    OP_REQUIRES_OK(ctx, Launcher::Merge(ctx, parts, C, p.flat<double>().data(),
                                        mean->flat<U>().data(), variance->flat<U>().data(),
                                        mean_lo->flat<U>().data(), count->flat<double>().data()));
  }
};

template <typename Launcher, typename T, typename U>
class ApplyOp : public TfbnOpKernel<ApplyIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& x = Get(ctx, In::kX);
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout));
    tensorflow::Tensor* y;
    std::vector<int> candidates;
    if (Launcher::kApplyYMayTakeX) candidates.push_back(In::kX);
    OP_REQUIRES_OK(ctx, ForwardOrAllocateLarge(ctx, candidates, In::kY, x.shape(), &y));
    const ApplyData<T, U> data{
        x.flat<T>().data(),      DataOrNull<U>(ctx, In::kScale),  DataOrNull<U>(ctx, In::kOffset),
        Data<U>(ctx, In::kMean), DataOrNull<U>(ctx, In::kMeanLo), Data<U>(ctx, In::kVariance),
        y->flat<T>().data()};
    OP_REQUIRES_OK(ctx, Launcher::Apply(ctx, layout, data, attrs_.args.epsilon));
  }
};

template <typename Launcher, typename T, typename U>
class GradSumsOp : public TfbnOpKernel<GradSumsIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout));
    tensorflow::Tensor* sums;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_output(In::kSums,
                                  tensorflow::TensorShape({kGradSumRows, layout.channels}), &sums));
    OP_REQUIRES_OK(ctx, Launcher::GradSums(ctx, layout, Data<T>(ctx, In::kDy), Data<T>(ctx, In::kX),
                                           Data<U>(ctx, In::kMean), DataOrNull<U>(ctx, In::kMeanLo),
                                           sums->flat<double>().data()));
  }
};

template <typename Launcher, typename T, typename U>
class GradApplyOp : public TfbnOpKernel<GradApplyIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& x = Get(ctx, In::kX);
    Layout layout;
    const float* weights = nullptr;
    OP_REQUIRES_OK(ctx, PrepareWeights<Launcher::kWeightsOnHost>(ctx, &layout, &weights));
    tensorflow::Tensor *dx, *dscale, *doffset;
    const tensorflow::TensorShape channels({layout.channels});
    // Both launchers read each element of dy before they write that element of dx.
    OP_REQUIRES_OK(ctx, ForwardOrAllocateLarge(ctx, {In::kDy}, In::kDx, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kDScale, channels, &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kDOffset, channels, &doffset));
    const tensorflow::Tensor& global = Get(ctx, In::kGlobalSums);
    const GradApplyData<T, U> data{Data<T>(ctx, In::kDy),
                                   x.flat<T>().data(),
                                   DataOrNull<U>(ctx, In::kScale),
                                   Data<U>(ctx, In::kMean),
                                   DataOrNull<U>(ctx, In::kMeanLo),
                                   Data<U>(ctx, In::kVariance),
                                   Data<double>(ctx, In::kLocalSums),
                                   global.flat<double>().data(),
                                   global.dim_size(0),
                                   Data<double>(ctx, In::kCount),
                                   weights,
                                   dx->flat<T>().data(),
                                   dscale->flat<U>().data(),
                                   doffset->flat<U>().data()};
    OP_REQUIRES_OK(ctx, Launcher::GradApply(ctx, layout, data, attrs_.args.epsilon));
  }
};

}  // namespace tfbn

// Registers the split ops' kernels on DEVICE (DEVICE_CPU, DEVICE_GPU) with LAUNCHER: the
// same (T, U) pairs on every device.
#define TFBN_REGISTER_SPLIT_PAIR(DEVICE, LAUNCHER, T, U)                                        \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("TfbnBatchNormStats").Device(::tensorflow::DEVICE).TypeConstraint<T>("T"),           \
      ::tfbn::StatsOp<LAUNCHER, T>);                                                            \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormApply", DEVICE, T, U, ::tfbn::ApplyOp<LAUNCHER, T, U>); \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormGradSums", DEVICE, T, U,                                \
                          ::tfbn::GradSumsOp<LAUNCHER, T, U>);                                  \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormGradApply", DEVICE, T, U,                               \
                          ::tfbn::GradApplyOp<LAUNCHER, T, U>);
#define TFBN_REGISTER_SPLIT_MERGE(DEVICE, LAUNCHER, U)                                     \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name("TfbnBatchNormMergeStats").Device(::tensorflow::DEVICE).TypeConstraint<U>("U"), \
      ::tfbn::MergeStatsOp<LAUNCHER, U>);
#define TFBN_REGISTER_SPLIT_OPS(DEVICE, LAUNCHER)                         \
  TFBN_REGISTER_SPLIT_PAIR(DEVICE, LAUNCHER, Eigen::half, float)          \
  TFBN_REGISTER_SPLIT_PAIR(DEVICE, LAUNCHER, tensorflow::bfloat16, float) \
  TFBN_REGISTER_SPLIT_PAIR(DEVICE, LAUNCHER, float, float)                \
  TFBN_REGISTER_SPLIT_PAIR(DEVICE, LAUNCHER, double, double)              \
  TFBN_REGISTER_SPLIT_MERGE(DEVICE, LAUNCHER, float)                      \
  TFBN_REGISTER_SPLIT_MERGE(DEVICE, LAUNCHER, double)
