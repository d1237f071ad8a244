// CPU kernels of the split op family (split_ops.cc): check, allocate, call the core.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <vector>

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/cpu_parallel.h"
#include "tf/op_kernel_base.h"
#include "tf/validation.h"

namespace tfbn {
namespace {

using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

template <typename T>
class StatsOp : public TfbnOpKernel<StatsIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = Get(ctx, In::kX);
    Layout layout;
    const float* weights;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout, &weights));
    Tensor* partial;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            In::kPartial, TensorShape({kPartialRows, layout.channels}), &partial));
    if (weights)
      WeightedPartialMoments<T>(layout, x.flat<T>().data(), weights, partial->flat<double>().data(),
                                IntraOpParallelFor(ctx));
    else
      PartialMoments<T>(layout, x.flat<T>().data(), partial->flat<double>().data(),
                        IntraOpParallelFor(ctx));
  }
};

template <typename U>
class MergeStatsOp : public TfbnOpKernel<MergeStatsIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& p = Get(ctx, In::kPartials);
    const int rank = p.dims();
    OP_REQUIRES_OK(
        ctx, CheckPartials(rank, rank >= 2 ? p.dim_size(rank - 2) : -1, p.shape().DebugString()));
    const int64_t C = p.dim_size(rank - 1);
    const int64_t parts = rank == 3 ? p.dim_size(0) : p.dim_size(0) / kPartialRows;
    Tensor *mean, *variance, *mean_lo, *count;
    const TensorShape channels({C});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kMean, channels, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kVariance, channels, &variance));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kMeanLo, channels, &mean_lo));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kCount, channels, &count));
    std::vector<double> merged(static_cast<size_t>(kPartialRows * C));
    MergeMoments(parts, C, p.flat<double>().data(), merged.data());
    FinalizeMoments<U>(C, merged.data(), mean->flat<U>().data(), mean_lo->flat<U>().data(),
                       variance->flat<U>().data());
    std::copy(merged.begin(), merged.begin() + C, count->flat<double>().data());
  }
};

template <typename T, typename U>
class ApplyOp : public TfbnOpKernel<ApplyIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = Get(ctx, In::kX);
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout));
    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({In::kX}, In::kY, x.shape(), &y));
    ApplyStatistics<T, U>(layout, x.flat<T>().data(), DataOrNull<U>(ctx, In::kScale),
                          DataOrNull<U>(ctx, In::kOffset), Data<U>(ctx, In::kMean),
                          DataOrNull<U>(ctx, In::kMeanLo), Data<U>(ctx, In::kVariance),
                          attrs_.args.epsilon, y->flat<T>().data(), IntraOpParallelFor(ctx));
  }
};

template <typename T, typename U>
class GradSumsOp : public TfbnOpKernel<GradSumsIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;
  void Compute(OpKernelContext* ctx) override {
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout));
    const int64_t C = layout.channels;
    Tensor* sums;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kSums, TensorShape({kGradSumRows, C}), &sums));
    std::vector<U> lo(static_cast<size_t>(C), U(0));  // GradSums takes no nullptr for 0
    if (const U* given = DataOrNull<U>(ctx, In::kMeanLo)) std::copy(given, given + C, lo.begin());
    double* out = sums->flat<double>().data();
    GradSums<T, U>(layout, Data<T>(ctx, In::kDy), Data<T>(ctx, In::kX), Data<U>(ctx, In::kMean),
                   lo.data(), out, out + C, IntraOpParallelFor(ctx));
  }
};

template <typename T, typename U>
class GradApplyOp : public TfbnOpKernel<GradApplyIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = Get(ctx, In::kX);
    Layout layout;
    const float* weights;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout, &weights));
    Tensor *dx, *dscale, *doffset;
    const TensorShape channels({layout.channels});
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({In::kDy}, In::kDx, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kDScale, channels, &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kDOffset, channels, &doffset));
    const Tensor& global = Get(ctx, In::kGlobalSums);
    // The weighted and the plain kernel take the same arguments, weights aside.
    auto run = [&](auto kernel, auto... weights_arg) {
      kernel(layout, Data<T>(ctx, In::kDy), x.flat<T>().data(), DataOrNull<U>(ctx, In::kScale),
             Data<U>(ctx, In::kMean), DataOrNull<U>(ctx, In::kMeanLo), Data<U>(ctx, In::kVariance),
             Data<double>(ctx, In::kLocalSums), global.flat<double>().data(), global.dim_size(0),
             Data<double>(ctx, In::kCount), weights_arg..., attrs_.args.epsilon,
             dx->flat<T>().data(), dscale->flat<U>().data(), doffset->flat<U>().data(),
             IntraOpParallelFor(ctx));
    };
    if (weights)
      run(WeightedApplyGradWithSums<T, U>, weights);
    else
      run(ApplyGradWithSums<T, U>);
  }
};

#define TFBN_REGISTER_SPLIT(T, U)                                                       \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("TfbnBatchNormStats").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      StatsOp<T>);                                                                      \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormApply", DEVICE_CPU, T, U, ApplyOp<T, U>);       \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormGradSums", DEVICE_CPU, T, U, GradSumsOp<T, U>); \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormGradApply", DEVICE_CPU, T, U, GradApplyOp<T, U>);

TFBN_REGISTER_SPLIT(Eigen::half, float)
TFBN_REGISTER_SPLIT(tensorflow::bfloat16, float)
TFBN_REGISTER_SPLIT(float, float)
TFBN_REGISTER_SPLIT(double, double)
#undef TFBN_REGISTER_SPLIT

#define TFBN_REGISTER_MERGE(U)                                                               \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("TfbnBatchNormMergeStats").Device(tensorflow::DEVICE_CPU).TypeConstraint<U>("U"), \
      MergeStatsOp<U>);
TFBN_REGISTER_MERGE(float)
TFBN_REGISTER_MERGE(double)
#undef TFBN_REGISTER_MERGE

}  // namespace
}  // namespace tfbn
