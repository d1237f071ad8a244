// What the XLA lowerings of the tfbn ops share: the [outer, C, inner] view of x as HLO,
// per-channel parameters (an empty one meaning a constant), float64 reductions, the
// kernels' argument checks on named inputs, and the epilogue activation.
//
// Why the lowerings restate the math in XLA ops instead of calling cc/core: XLA compiles
// a whole function into one HLO program (fused, on CPU or GPU), and an opaque kernel call
// cannot take part in that. Each lowering therefore restates cc/core's contract
// (batch_norm.h) in HLO: statistics in float64 (mean first, then the mean of squared
// deviations, so data far from zero keeps its precision), gradient sums accumulated in
// float64 (terms formed in U, as the kernels form them), the mean applied as two parts
// hi + lo, per-element arithmetic in U (float32 for half types, float64 for float64) and
// one rounding to T. Bit equality with the CPU kernels is not promised (summation order
// differs); the tests hold both to the float64 reference.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/activation.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tf/input_checks.h"
#include "tf/op_attrs.h"
#include "tf/op_signatures.h"
#include "xla/hlo/builder/xla_builder.h"

namespace tfbn {

// x viewed as [outer, C, inner] (outer = product of the dimensions before the channel axis,
// inner = product after).
struct XlaView {
  int64_t outer = 1, channels = 0, inner = 1;
  int axis = 0;
  tensorflow::TensorShape shape;  // x's own shape
  int64_t per_channel() const { return outer * inner; }
  std::vector<int64_t> dims() const { return {outer, channels, inner}; }
};

// Resolves the axis for input `index` (x) and checks its rank; x's shape must be static.
absl::Status MakeView(tensorflow::XlaOpKernelContext* ctx, int index, int axis_attr, XlaView* view);

// The shape of input `index` as a TensorShape.
absl::Status InputShape(tensorflow::XlaOpKernelContext* ctx, int index,
                        tensorflow::TensorShape* shape);

// Weights input `index` as [outer, inner] in `type` (one weight per position, shared by
// every channel).
xla::XlaOp Weights2d(tensorflow::XlaOpKernelContext* ctx, int index, const XlaView& view,
                     xla::PrimitiveType type);

// True where input `index` is not empty.
bool HasInput(tensorflow::XlaOpKernelContext* ctx, int index);

// x (any shape of view's size) as [outer, C, inner] in `type`.
xla::XlaOp To3d(xla::XlaOp x, const XlaView& view, xla::PrimitiveType type);
// [outer, C, inner] back to x's shape in `type`.
xla::XlaOp FromView(xla::XlaOp x3, const XlaView& view, xla::PrimitiveType type);

// A [C] vector broadcast over [outer, C, inner].
xla::XlaOp PerChannel(xla::XlaOp vector, const XlaView& view);

// Input `index` as a [C] vector in `type`, or `fill` repeated where it is empty or absent.
xla::XlaOp VectorOr(tensorflow::XlaOpKernelContext* ctx, int index, double fill,
                    xla::PrimitiveType type, int64_t channels);

// Per-channel sum of a [outer, C, inner] float64 array (0 for an empty one).
xla::XlaOp SumPerChannel(xla::XlaOp x3);

// A scalar constant of `type`.
xla::XlaOp Scalar(xla::XlaBuilder* b, xla::PrimitiveType type, double value);

// Row `row` of a [rows, C] matrix, as a [C] vector.
xla::XlaOp Row(xla::XlaOp matrix, int64_t row, int64_t channels);

// ---- The math the lowerings share (the kernels' formulas, in their order). ----

// 1 / sqrt(variance + epsilon) of a float64 [C] vector.
xla::XlaOp InverseStd(xla::XlaOp variance_f64, float epsilon);

// (x - hi) - lo over [outer, C, inner]: x centred on the mean carried in two parts, as the
// kernels centre it (x3, hi and lo of one type).
xla::XlaOp Centred(xla::XlaOp x3, xla::XlaOp hi, xla::XlaOp lo, const XlaView& view);

// The training gradient's per-channel coefficients in float64, with
// dx = s*r*dy + gb * ((x - hi) - lo) + gc: from sr = s*r, r, the sums of dy and of
// dy * ((x - hi) - lo), the gradients reaching the batch mean and variance, and the count m.
struct GradCoefficients {
  xla::XlaOp gb, gc;
};
GradCoefficients TrainingGradCoefficients(xla::XlaOp sr, xla::XlaOp r, xla::XlaOp sum_dy,
                                          xla::XlaOp sum_dy_xc, xla::XlaOp d_mean,
                                          xla::XlaOp d_variance, xla::XlaOp m);

// The base of every tfbn lowering: the attributes and argument checks of the OpKernels
// (op_kernel_base.h), on the inputs op Io names (op_signatures.h), with their messages.
template <typename Io>
class TfbnXlaOpKernel : public WithOpAttrs<tensorflow::XlaOpKernel, Io> {
 public:
  using WithOpAttrs<tensorflow::XlaOpKernel, Io>::WithOpAttrs;

 protected:
  // Views input x (a static shape) and runs the op's input checks (input_checks.h).
  absl::Status Prepare(tensorflow::XlaOpKernelContext* ctx, XlaView* view) const {
    TF_RETURN_IF_ERROR(MakeView(ctx, Io::kX, this->attrs_.axis, view));
    absl::Status status;
    auto shape_of = [ctx, &status](int index) {
      tensorflow::TensorShape shape;
      status.Update(InputShape(ctx, index, &shape));
      return shape;
    };
    int axis;
    TF_RETURN_IF_ERROR(CheckInputs<Io>(this->attrs_, shape_of, &axis));
    return status;
  }
};

// ---- Epilogue (activation after an optional residual add). ----

// act(z) and dy * act'(z), elementwise in z's type (TensorFlow's gradient conventions:
// relu passes dy where z > 0, relu6 where 0 < z < 6).
xla::XlaOp Activate(xla::XlaOp z, Activation activation);
xla::XlaOp ActivationGrad(xla::XlaOp dy, xla::XlaOp z, Activation activation);

}  // namespace tfbn
