// CPU OpKernels of the split op family (sync_ops.cc): validate, allocate, call core.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/batch_norm_op_base.h"
#include "tf/cpu_parallel.h"
#include "tf/validation.h"
#include "tf/weights.h"

namespace tfbn {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// Attributes and checks shared by the kernels that take x.
class SplitOpBase : public OpKernel {
 public:
  SplitOpBase(OpKernelConstruction* ctx, bool has_epsilon) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_attr_));
    if (has_epsilon) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
      OP_REQUIRES_OK(ctx, CheckEpsilon(epsilon_));
    }
  }

 protected:
  // Resolves the axis for x; checks the per-channel vectors {input, name, allow_empty}
  // and the [rows, C] matrices {input, rows} (rows 0: 2 or 4).
  absl::Status Prepare(OpKernelContext* ctx, const Tensor& x,
                       std::initializer_list<std::tuple<int, const char*, bool>> vectors,
                       std::initializer_list<std::pair<int, int>> matrices,
                       Layout* layout) const {
    int axis;
    TF_RETURN_IF_ERROR(ResolveAxis(axis_attr_, x.dims(), x.shape().DebugString(), &axis));
    *layout = MakeLayout(x.shape(), axis);
    for (const auto& [index, name, allow_empty] : vectors) {
      const Tensor& v = ctx->input(index);
      TF_RETURN_IF_ERROR(CheckChannelVector(
          name, v.dims(), v.dims() == 1 ? v.dim_size(0) : -1,
          layout->channels, allow_empty, axis, x.shape().DebugString()));
    }
    for (const auto& [index, rows] : matrices) {
      const Tensor& m = ctx->input(index);
      const bool rows_ok = m.dims() == 2 && (rows ? m.dim_size(0) == rows
                                                  : (m.dim_size(0) == 2 || m.dim_size(0) == 4));
      if (!rows_ok || m.dim_size(1) != layout->channels)
        return absl::InvalidArgumentError(absl::StrCat(
            "tfbn: ", index == 6 ? "local_sums" : index == 7 ? "global_sums" : "input",
            " must be a [", rows ? absl::StrCat(rows) : "2 or 4",
            ", C = ", layout->channels, "] matrix, got shape ", m.shape().DebugString()));
    }
    return absl::OkStatus();
  }

  // The weights input `index` for x (see weights.h): nullptr for the empty form (every
  // element weighs 1), else its data, checked finite and non-negative.
  absl::Status Weights(OpKernelContext* ctx, int index, const Tensor& x,
                       const float** weights) const {
    int axis;
    TF_RETURN_IF_ERROR(ResolveAxis(axis_attr_, x.dims(), x.shape().DebugString(), &axis));
    const Tensor& w = ctx->input(index);
    std::vector<int64_t> x_dims, w_dims;
    for (int d = 0; d < x.dims(); ++d) x_dims.push_back(x.dim_size(d));
    for (int d = 0; d < w.dims(); ++d) w_dims.push_back(w.dim_size(d));
    bool weighted;
    TF_RETURN_IF_ERROR(CheckWeightsShape(x_dims, axis, w.dims(), w_dims, &weighted));
    *weights = nullptr;
    if (!weighted) return absl::OkStatus();
    const auto v = w.flat<float>();
    for (int64_t k = 0; k < v.size(); ++k)  // one value per position: cheap next to x
      if (!(v(k) >= 0.0f && v(k) <= std::numeric_limits<float>::max()))
        return absl::InvalidArgumentError(absl::StrCat(
            "tfbn: weights must be finite and non-negative, got weights[", k, "] = ", v(k),
            " (flat index)"));
    *weights = v.data();
    return absl::OkStatus();
  }

  int axis_attr_ = -1;
  float epsilon_ = 1e-3f;
};

template <typename T>
class StatsOp : public SplitOpBase {
 public:
  explicit StatsOp(OpKernelConstruction* ctx) : SplitOpBase(ctx, false) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, x, {}, {}, &layout));
    const float* weights;
    OP_REQUIRES_OK(ctx, Weights(ctx, 1, x, &weights));
    Tensor* partial;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({kPartialRows, layout.channels}),
                                             &partial));
    if (weights)
      WeightedPartialMoments<T>(layout, x.flat<T>().data(), weights,
                                partial->flat<double>().data(), IntraOpParallelFor(ctx));
    else
      PartialMoments<T>(layout, x.flat<T>().data(), partial->flat<double>().data(),
                        IntraOpParallelFor(ctx));
  }
};

template <typename U>
class MergeStatsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    const Tensor& p = ctx->input(0);
    const int rank = p.dims();
    const bool ok = (rank == 3 && p.dim_size(1) == kPartialRows) ||
                    (rank == 2 && p.dim_size(0) % kPartialRows == 0);
    OP_REQUIRES(ctx, ok,
                absl::InvalidArgumentError(absl::StrCat(
                    "tfbn: partials must be [parts, 3, C] or [3 * parts, C] (rows count, "
                    "mean, M2), got shape ", p.shape().DebugString())));
    const int64_t C = p.dim_size(rank - 1);
    const int64_t parts = rank == 3 ? p.dim_size(0) : p.dim_size(0) / kPartialRows;
    Tensor *mean, *variance, *residual, *count;
    const TensorShape channels({C});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, channels, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, channels, &variance));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, channels, &residual));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, channels, &count));
    std::vector<double> merged(static_cast<size_t>(kPartialRows * C));
    MergeMoments(parts, C, p.flat<double>().data(), merged.data());
    FinalizeMoments<U>(C, merged.data(), mean->flat<U>().data(), residual->flat<U>().data(),
                       variance->flat<U>().data());
    std::copy(merged.begin(), merged.begin() + C, count->flat<double>().data());
  }
};

template <typename T, typename U>
class ApplyOp : public SplitOpBase {
 public:
  explicit ApplyOp(OpKernelConstruction* ctx) : SplitOpBase(ctx, true) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, x, {{1, "scale", true},
                                         {2, "offset", true},
                                         {3, "mean", false},
                                         {4, "variance", false},
                                         {5, "mean_residual", true}}, {}, &layout));
    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    ApplyStatistics<T, U>(layout, x.flat<T>().data(), DataOrNull<U>(ctx->input(1)),
                          DataOrNull<U>(ctx->input(2)), ctx->input(3).flat<U>().data(),
                          DataOrNull<U>(ctx->input(5)), ctx->input(4).flat<U>().data(), epsilon_,
                          y->flat<T>().data(), IntraOpParallelFor(ctx));
  }
};

template <typename T, typename U>
class GradSumsOp : public SplitOpBase {
 public:
  explicit GradSumsOp(OpKernelConstruction* ctx) : SplitOpBase(ctx, false) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckSameShape(dy, x));
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, x, {{2, "mean", false}, {3, "mean_residual", true}}, {}, &layout));
    const int64_t C = layout.channels;
    Tensor* sums;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({2, C}), &sums));
    std::vector<U> lo(static_cast<size_t>(C), U(0));
    if (const U* r = DataOrNull<U>(ctx->input(3))) std::copy(r, r + C, lo.begin());
    double* out = sums->flat<double>().data();
    GradSums<T, U>(layout, dy.flat<T>().data(), x.flat<T>().data(),
                   ctx->input(2).flat<U>().data(), lo.data(), out, out + C, IntraOpParallelFor(ctx));
  }
};

template <typename T, typename U>
class GradApplyOp : public SplitOpBase {
 public:
  explicit GradApplyOp(OpKernelConstruction* ctx) : SplitOpBase(ctx, true) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckSameShape(dy, x));
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, x, {{2, "scale", true},
                                         {3, "mean", false},
                                         {4, "variance", false},
                                         {5, "mean_residual", true},
                                         {8, "count", false}},
                                {{6, 2}, {7, 0}}, &layout));
    const float* weights;
    OP_REQUIRES_OK(ctx, Weights(ctx, 9, x, &weights));
    Tensor *dx, *dscale, *doffset;
    const TensorShape channels({layout.channels});
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, channels, &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, channels, &doffset));
    const Tensor& global = ctx->input(7);
    const T* dy_data = dy.flat<T>().data();
    const T* x_data = x.flat<T>().data();
    const U* scale = DataOrNull<U>(ctx->input(2));
    const U* mean = ctx->input(3).flat<U>().data();
    const U* variance = ctx->input(4).flat<U>().data();
    const U* residual = DataOrNull<U>(ctx->input(5));
    const double* local = ctx->input(6).flat<double>().data();
    const double* count = ctx->input(8).flat<double>().data();
    if (weights)
      WeightedApplyGradWithSums<T, U>(
          layout, dy_data, x_data, scale, mean, residual, variance, local,
          global.flat<double>().data(), global.dim_size(0), count, weights, epsilon_,
          dx->flat<T>().data(), dscale->flat<U>().data(), doffset->flat<U>().data(),
          IntraOpParallelFor(ctx));
    else
      ApplyGradWithSums<T, U>(
          layout, dy_data, x_data, scale, mean, residual, variance, local,
          global.flat<double>().data(), global.dim_size(0), count, epsilon_,
          dx->flat<T>().data(), dscale->flat<U>().data(), doffset->flat<U>().data(),
          IntraOpParallelFor(ctx));
  }
};

#define TFBN_REGISTER_SPLIT(T, U)                                                           \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("TfbnBatchNormStats").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),     \
      StatsOp<T>);                                                                          \
  REGISTER_KERNEL_BUILDER(Name("TfbnBatchNormApply")                                        \
                              .Device(tensorflow::DEVICE_CPU)                               \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<U>("U"),                                      \
                          ApplyOp<T, U>);                                                   \
  REGISTER_KERNEL_BUILDER(Name("TfbnBatchNormGradSums")                                     \
                              .Device(tensorflow::DEVICE_CPU)                               \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<U>("U"),                                      \
                          GradSumsOp<T, U>);                                                \
  REGISTER_KERNEL_BUILDER(Name("TfbnBatchNormGradApply")                                    \
                              .Device(tensorflow::DEVICE_CPU)                               \
                              .TypeConstraint<T>("T")                                       \
                              .TypeConstraint<U>("U"),                                      \
                          GradApplyOp<T, U>);

TFBN_REGISTER_SPLIT(Eigen::half, float)
TFBN_REGISTER_SPLIT(tensorflow::bfloat16, float)
TFBN_REGISTER_SPLIT(float, float)
TFBN_REGISTER_SPLIT(double, double)
#undef TFBN_REGISTER_SPLIT

REGISTER_KERNEL_BUILDER(
    Name("TfbnBatchNormMergeStats").Device(tensorflow::DEVICE_CPU).TypeConstraint<float>("U"),
    MergeStatsOp<float>);
REGISTER_KERNEL_BUILDER(
    Name("TfbnBatchNormMergeStats").Device(tensorflow::DEVICE_CPU).TypeConstraint<double>("U"),
    MergeStatsOp<double>);

}  // namespace
}  // namespace tfbn
