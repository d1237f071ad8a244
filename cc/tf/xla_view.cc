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
    return absl::InvalidArgumentError(
        absl::StrCat("tfbn: under XLA, x needs a static shape, got ", xla_shape->ToString()));
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

absl::Status InputShape(XlaOpKernelContext* ctx, int index, tensorflow::TensorShape* shape) {
  auto s = ctx->InputXlaShape(index);
  TF_RETURN_IF_ERROR(s.status());
  *shape = tensorflow::TensorShape();
  for (int64_t d : s->dimensions()) shape->AddDim(d);
  return absl::OkStatus();
}

xla::XlaOp Weights2d(XlaOpKernelContext* ctx, int index, const XlaView& view,
                     xla::PrimitiveType type) {
  return xla::Reshape(xla::ConvertElementType(ctx->Input(index), type), {view.outer, view.inner});
}

bool HasInput(XlaOpKernelContext* ctx, int index) {
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
  return xla::Div(
      Scalar(b, xla::F64, 1.0),
      xla::Sqrt(xla::Add(variance_f64, Scalar(b, xla::F64, static_cast<double>(epsilon)))));
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

xla::XlaOp Activate(xla::XlaOp z, Activation activation) {
  switch (activation) {
    case Activation::kIdentity:
      return z;
    case Activation::kRelu:
      return xla::Max(z, xla::ScalarLike(z, 0));
    case Activation::kRelu6:
      return xla::Min(xla::Max(z, xla::ScalarLike(z, 0)), xla::ScalarLike(z, 6));
    case Activation::kSilu:
      return xla::Mul(z, xla::Logistic(z));
  }
  return z;
}

xla::XlaOp ActivationGrad(xla::XlaOp dy, xla::XlaOp z, Activation activation) {
  const xla::XlaOp zero = xla::ZerosLike(dy);
  switch (activation) {
    case Activation::kIdentity:
      return dy;
    case Activation::kRelu:
      return xla::Select(xla::Gt(z, xla::ScalarLike(z, 0)), dy, zero);
    case Activation::kRelu6:
      return xla::Select(
          xla::And(xla::Gt(z, xla::ScalarLike(z, 0)), xla::Lt(z, xla::ScalarLike(z, 6))), dy, zero);
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
