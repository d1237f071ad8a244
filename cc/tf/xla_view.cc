// Shared pieces of the XLA lowerings (see xla_view.h).
#include "tf/xla_view.h"

#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tf/validation.h"
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/constants.h"

namespace tfbn {

using tensorflow::XlaOpKernelContext;

absl::Status MakeView(XlaOpKernelContext* ctx, int index, int axis_attr, XlaView* view) {
  auto xla_shape = ctx->InputXlaShape(index);
  TF_RETURN_IF_ERROR(xla_shape.status());
  if (!xla_shape->is_static())
    return absl::InvalidArgumentError(absl::StrCat(
        "tfbn: under XLA, x needs a static shape, got ", xla_shape->ToString()));
  tensorflow::TensorShape shape;
  for (int64_t d : xla_shape->dimensions()) shape.AddDim(d);
  int axis = 0;
  TF_RETURN_IF_ERROR(ResolveAxis(axis_attr, shape.dims(), shape.DebugString(), &axis));
  view->axis = axis;
  view->shape = shape;
  view->outer = view->inner = 1;
  for (int d = 0; d < axis; ++d) view->outer *= shape.dim_size(d);
  view->channels = shape.dim_size(axis);
  for (int d = axis + 1; d < shape.dims(); ++d) view->inner *= shape.dim_size(d);
  return absl::OkStatus();
}

absl::Status CheckVector(XlaOpKernelContext* ctx, int index, const char* name,
                         bool allow_empty, const XlaView& view) {
  auto s = ctx->InputXlaShape(index);
  TF_RETURN_IF_ERROR(s.status());
  const int rank = s->dimensions().size();
  return CheckChannelVector(name, rank, rank == 1 ? s->dimensions(0) : -1, view.channels,
                            allow_empty, view.axis, view.shape.DebugString());
}

absl::Status CheckLikeX(XlaOpKernelContext* ctx, int index, const char* name,
                        const XlaView& view) {
  auto s = ctx->InputXlaShape(index);
  TF_RETURN_IF_ERROR(s.status());
  tensorflow::TensorShape shape;
  for (int64_t d : s->dimensions()) shape.AddDim(d);
  if (shape == view.shape) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tfbn: ", name, " has shape ",
                                                 shape.DebugString(), " but x has shape ",
                                                 view.shape.DebugString()));
}

absl::Status CheckWeights(XlaOpKernelContext* ctx, int index, const XlaView& view) {
  auto s = ctx->InputXlaShape(index);
  TF_RETURN_IF_ERROR(s.status());
  tensorflow::TensorShape want, got;
  for (int d = 0; d < view.shape.dims(); ++d)
    if (d != view.axis) want.AddDim(view.shape.dim_size(d));
  for (int64_t d : s->dimensions()) got.AddDim(d);
  if (got == want) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "tfbn: weights must have x's shape without the channel axis, ", want.DebugString(),
      " (x has shape ", view.shape.DebugString(), ", channel axis ", view.axis,
      "), got shape ", got.DebugString()));
}

xla::XlaOp Weights2d(XlaOpKernelContext* ctx, int index, const XlaView& view,
                     xla::PrimitiveType type) {
  return xla::Reshape(xla::ConvertElementType(ctx->Input(index), type),
                      {view.outer, view.inner});
}

bool HasInput(XlaOpKernelContext* ctx, int index) {
  if (index >= ctx->num_inputs()) return false;
  auto s = ctx->InputXlaShape(index);
  return s.ok() && xla::ShapeUtil::ElementsIn(*s) > 0;
}

xla::XlaOp To3d(xla::XlaOp x, const XlaView& view, xla::PrimitiveType type) {
  return xla::ConvertElementType(xla::Reshape(x, view.dims()), type);
}

xla::XlaOp FromView(xla::XlaOp x3, const XlaView& view, xla::PrimitiveType type) {
  return xla::Reshape(xla::ConvertElementType(x3, type), view.shape.dim_sizes());
}

xla::XlaOp PerChannel(xla::XlaOp vector, const XlaView& view) {
  return xla::BroadcastInDim(vector, view.dims(), {1});
}

xla::XlaOp Scalar(xla::XlaBuilder* b, xla::PrimitiveType type, double value) {
  return xla::ConvertElementType(xla::ConstantR0<double>(b, value), type);
}

xla::XlaOp VectorOr(XlaOpKernelContext* ctx, int index, double fill, xla::PrimitiveType type,
                    int64_t channels) {
  if (HasInput(ctx, index)) return xla::ConvertElementType(ctx->Input(index), type);
  return xla::Broadcast(Scalar(ctx->builder(), type, fill), {channels});
}

xla::XlaOp SumPerChannel(xla::XlaOp x3) {
  xla::XlaBuilder* b = x3.builder();
  return xla::Reduce(x3, xla::Zero(b, xla::F64), xla::CreateScalarAddComputation(xla::F64, b),
                     {0, 2});
}

xla::XlaOp Row(xla::XlaOp matrix, int64_t row, int64_t channels) {
  return xla::Reshape(xla::SliceInDim(matrix, row, row + 1, 1, 0), {channels});
}

xla::XlaOp InverseStd(xla::XlaOp variance_f64, float epsilon) {
  xla::XlaBuilder* b = variance_f64.builder();
  return xla::Div(Scalar(b, xla::F64, 1.0),
                  xla::Sqrt(xla::Add(variance_f64,
                                     Scalar(b, xla::F64, static_cast<double>(epsilon)))));
}

xla::XlaOp Centred(xla::XlaOp x3, xla::XlaOp hi, xla::XlaOp lo, const XlaView& view) {
  return xla::Sub(xla::Sub(x3, PerChannel(hi, view)), PerChannel(lo, view));
}

GradCoefficients TrainingGradCoefficients(xla::XlaOp sr, xla::XlaOp r, xla::XlaOp sum_dy,
                                          xla::XlaOp sum_dy_xc, xla::XlaOp d_mean,
                                          xla::XlaOp d_variance, xla::XlaOp m) {
  xla::XlaBuilder* b = sr.builder();
  // gb = -s*r^3 * sum(dy*xc) / m + 2 * d_var / m;  gc = -s*r * sum(dy) / m + d_mean / m
  const xla::XlaOp gb =
      xla::Add(xla::Div(xla::Mul(xla::Neg(xla::Mul(xla::Mul(sr, r), r)), sum_dy_xc), m),
               xla::Div(xla::Mul(Scalar(b, xla::F64, 2.0), d_variance), m));
  const xla::XlaOp gc = xla::Add(xla::Div(xla::Mul(xla::Neg(sr), sum_dy), m), xla::Div(d_mean, m));
  return {gb, gc};
}

absl::Status CheckGradInputs(XlaOpKernelContext* ctx, const XlaView& view,
                             const char* residual_name) {
  TF_RETURN_IF_ERROR(CheckLikeX(ctx, 0, "dy", view));
  TF_RETURN_IF_ERROR(CheckVector(ctx, 2, "scale", true, view));
  TF_RETURN_IF_ERROR(CheckVector(ctx, 3, "mean", false, view));
  TF_RETURN_IF_ERROR(CheckVector(ctx, 4, "variance", false, view));
  return CheckVector(ctx, 5, residual_name, true, view);
}

absl::Status ReadCommonAttrs(tensorflow::OpKernelConstruction* ctx, int* axis,
                             float* epsilon) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("axis", axis));
  if (epsilon != nullptr) {
    TF_RETURN_IF_ERROR(ctx->GetAttr("epsilon", epsilon));
    TF_RETURN_IF_ERROR(CheckEpsilon(*epsilon));
  }
  if (!ctx->HasAttr("U")) return absl::OkStatus();
  tensorflow::DataType t, u;
  TF_RETURN_IF_ERROR(ctx->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(ctx->GetAttr("U", &u));
  return CheckParamDtype(t, u);
}

absl::Status ReadEpilogueAttrs(tensorflow::OpKernelConstruction* ctx, Activation* activation,
                               bool* has_residual) {
  *activation = Activation::kIdentity;
  *has_residual = false;
  if (ctx->HasAttr("has_residual")) TF_RETURN_IF_ERROR(ctx->GetAttr("has_residual", has_residual));
  if (!ctx->HasAttr("activation")) return absl::OkStatus();
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr("activation", &name));
  if (name == "identity") *activation = Activation::kIdentity;
  else if (name == "relu") *activation = Activation::kRelu;
  else if (name == "relu6") *activation = Activation::kRelu6;
  else if (name == "silu") *activation = Activation::kSilu;
  else
    return absl::InvalidArgumentError(absl::StrCat(
        "tfbn: activation must be identity, relu, relu6 or silu, got activation = ", name));
  return absl::OkStatus();
}

xla::XlaOp Activate(xla::XlaOp z, Activation activation) {
  switch (activation) {
    case Activation::kIdentity: return z;
    case Activation::kRelu: return xla::Max(z, xla::ScalarLike(z, 0));
    case Activation::kRelu6:
      return xla::Min(xla::Max(z, xla::ScalarLike(z, 0)), xla::ScalarLike(z, 6));
    case Activation::kSilu: return xla::Mul(z, xla::Logistic(z));
  }
  return z;
}

xla::XlaOp ActivationGrad(xla::XlaOp dy, xla::XlaOp z, Activation activation) {
  const xla::XlaOp zero = xla::ZerosLike(dy);
  switch (activation) {
    case Activation::kIdentity: return dy;
    case Activation::kRelu: return xla::Select(xla::Gt(z, xla::ScalarLike(z, 0)), dy, zero);
    case Activation::kRelu6:
      return xla::Select(
          xla::And(xla::Gt(z, xla::ScalarLike(z, 0)), xla::Lt(z, xla::ScalarLike(z, 6))), dy,
          zero);
    case Activation::kSilu: {
      // d/dz z*s(z) = s * (1 + z * (1 - s)), s = sigmoid(z)
      const xla::XlaOp s = xla::Logistic(z);
      const xla::XlaOp one = xla::ScalarLike(z, 1);
      return xla::Mul(dy, xla::Mul(s, xla::Add(one, xla::Mul(z, xla::Sub(one, s)))));
    }
  }
  return dy;
}

}  // namespace tfbn
