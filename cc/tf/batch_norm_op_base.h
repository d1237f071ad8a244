// What the CPU and GPU OpKernels of TfbnBatchNorm / TfbnBatchNormGrad share: attributes,
// argument checks (validation.h) and the [outer, C, inner] view of x.
#pragma once

#include <initializer_list>
#include <string>
#include <utility>

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/validation.h"

namespace tfbn {

inline Layout MakeLayout(const tensorflow::TensorShape& shape, int axis) {
  Layout layout{1, shape.dim_size(axis), 1};
  for (int d = 0; d < axis; ++d) layout.outer *= shape.dim_size(d);
  for (int d = axis + 1; d < shape.dims(); ++d) layout.inner *= shape.dim_size(d);
  return layout;
}

// An empty per-channel tensor stands for "not given" (nullptr) in the core API.
template <typename U>
const U* DataOrNull(const tensorflow::Tensor& t) {
  return t.NumElements() == 0 ? nullptr : t.flat<U>().data();
}

// The activation attribute's values (the op definition allows these only).
inline absl::Status ParseActivation(const std::string& name, Activation* activation) {
  static const char* const kNames[kNumActivations] = {"identity", "relu", "relu6", "silu"};
  for (int i = 0; i < kNumActivations; ++i)
    if (name == kNames[i]) {
      *activation = static_cast<Activation>(i);
      return absl::OkStatus();
    }
  return absl::InvalidArgumentError(absl::StrCat(
      "tfbn: activation must be identity, relu, relu6 or silu, got activation = ", name));
}

// dy must have x's shape (the gradient ops).
inline absl::Status CheckSameShape(const tensorflow::Tensor& dy, const tensorflow::Tensor& x) {
  if (dy.shape() == x.shape()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tfbn: dy has shape ", dy.shape().DebugString(),
                                                 " but x has shape ", x.shape().DebugString()));
}

// Shared attributes and checks of both ops, on every device.
class BatchNormOpBase : public tensorflow::OpKernel {
 public:
  explicit BatchNormOpBase(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &args_.epsilon));
    OP_REQUIRES_OK(ctx, CheckEpsilon(args_.epsilon));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_attr_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("is_training", &args_.training));
    tensorflow::DataType t, u;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &t));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("U", &u));
    OP_REQUIRES_OK(ctx, CheckParamDtype(t, u));
    // The forward op says whether scale/offset were given: only a missing one may be empty.
    if (ctx->HasAttr("has_scale")) OP_REQUIRES_OK(ctx, ctx->GetAttr("has_scale", &has_scale_));
    if (ctx->HasAttr("has_offset"))
      OP_REQUIRES_OK(ctx, ctx->GetAttr("has_offset", &has_offset_));
    if (ctx->HasAttr("activation")) {
      std::string activation;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &activation));
      OP_REQUIRES_OK(ctx, ParseActivation(activation, &args_.activation));
    }
    if (ctx->HasAttr("has_residual"))
      OP_REQUIRES_OK(ctx, ctx->GetAttr("has_residual", &has_residual_));
  }

 protected:
  // Resolves the axis for x and checks each per-channel input listed.
  absl::Status Prepare(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& x,
                       std::initializer_list<std::pair<int, bool>> vectors,
                       const char* const* names, Layout* layout) const {
    int axis = 0;
    TF_RETURN_IF_ERROR(ResolveAxis(axis_attr_, x.dims(), x.shape().DebugString(), &axis));
    *layout = MakeLayout(x.shape(), axis);
    int k = 0;
    for (const auto& [index, allow_empty] : vectors) {
      const tensorflow::Tensor& v = ctx->input(index);
      TF_RETURN_IF_ERROR(CheckChannelVector(names[k++], v.dims(),
                                            v.dims() == 1 ? v.dim_size(0) : -1,
                                            layout->channels, allow_empty, axis,
                                            x.shape().DebugString()));
    }
    return absl::OkStatus();
  }

  // The epilogue's residual input: x's shape where has_residual, else empty.
  absl::Status CheckResidualInput(const tensorflow::Tensor& residual,
                                  const tensorflow::Tensor& x) const {
    if (has_residual_ ? residual.shape() == x.shape()
                      : residual.dims() == 1 && residual.dim_size(0) == 0)
      return absl::OkStatus();
    if (!has_residual_)
      return absl::InvalidArgumentError(absl::StrCat(
          "tfbn: residual must be empty ([0]) where has_residual is false, got shape ",
          residual.shape().DebugString()));
    return absl::InvalidArgumentError(absl::StrCat(
        "tfbn: residual must have the shape of x ", x.shape().DebugString(),
        ", got residual of shape ", residual.shape().DebugString()));
  }

  // The forward's checks; returns the layout of x.
  absl::Status PrepareForward(tensorflow::OpKernelContext* ctx, Layout* layout) const {
    static const char* const kNames[] = {"scale", "offset", "mean", "variance"};
    const bool training = args_.training;
    TF_RETURN_IF_ERROR(CheckResidualInput(ctx->input(5), ctx->input(0)));
    return Prepare(ctx, ctx->input(0),
                   {{1, !has_scale_}, {2, !has_offset_}, {3, training}, {4, training}}, kNames,
                   layout);
  }

  // The forward's outputs: y (which may take over x's or the residual's buffer: every
  // element is read before it is written) and the three per-channel vectors.
  struct ForwardOutputs {
    tensorflow::Tensor *y, *batch_mean, *batch_variance, *reserve;
  };
  absl::Status AllocateForward(tensorflow::OpKernelContext* ctx, const Layout& layout,
                               ForwardOutputs* out) const {
    const tensorflow::TensorShape channels({layout.channels});
    TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output(
        has_residual_ ? std::initializer_list<int>{0, 5} : std::initializer_list<int>{0}, 0,
        ctx->input(0).shape(), &out->y));
    TF_RETURN_IF_ERROR(ctx->allocate_output(1, channels, &out->batch_mean));
    TF_RETURN_IF_ERROR(ctx->allocate_output(2, channels, &out->batch_variance));
    return ctx->allocate_output(3, channels, &out->reserve);
  }

  // The gradient's checks (dy and x of one shape); returns the layout of x.
  absl::Status PrepareBackward(tensorflow::OpKernelContext* ctx, Layout* layout) const {
    const tensorflow::Tensor& dy = ctx->input(0);
    const tensorflow::Tensor& x = ctx->input(1);
    TF_RETURN_IF_ERROR(CheckSameShape(dy, x));
    TF_RETURN_IF_ERROR(CheckResidualInput(ctx->input(9), x));
    static const char* const kNames[] = {"scale",        "mean",
                                         "variance",     "reserve",
                                         "d_batch_mean", "d_batch_variance",
                                         "offset"};
    return Prepare(ctx, x,
                   {{2, true}, {3, false}, {4, false}, {5, true}, {6, true}, {7, true}, {8, true}},
                   kNames, layout);
  }

  ForwardArgs args_;
  int axis_attr_;
  bool has_scale_ = false;
  bool has_offset_ = false;
  bool has_residual_ = false;
};

}  // namespace tfbn
