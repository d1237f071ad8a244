// Op definitions and shape functions of the fused op and its gradient. Inputs and outputs
// are listed in the order of op_signatures.h.
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/activation.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/op_signatures.h"
#include "tf/shape_fns.h"

namespace tfbn {
namespace {

// The activation attribute: the names of core/activation.h, identity by default.
std::string ActivationAttr() {
  std::vector<std::string> quoted;
  for (const char* name : kActivationNames) quoted.push_back(absl::StrCat("'", name, "'"));
  return absl::StrCat("activation: {", absl::StrJoin(quoted, ", "), "} = '",
                      ActivationName(Activation::kIdentity), "'");
}

}  // namespace

REGISTER_OP("TfbnBatchNorm")
    .Input("x: T")
    .Input("scale: U")     // empty means 1 where has_scale is false
    .Input("offset: U")    // empty means 0 where has_offset is false
    .Input("mean: U")      // inference statistics; empty (or ignored) in training
    .Input("variance: U")
    .Input("residual: T")  // x's shape where has_residual, else empty [0]
    .Output("y: T")
    .Output("batch_mean: U")
    .Output("batch_variance: U")  // biased
    .Output("mean_lo: U")  // the mean's low part, mean - U(mean), for the gradient
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 0.001")
    .Attr("axis: int = -1")
    .Attr("is_training: bool = true")
    .Attr("has_scale: bool = false")   // true: scale must have C entries
    .Attr("has_offset: bool = false")  // true: offset must have C entries
    .Attr(ActivationAttr())
    .Attr("has_residual: bool = false")
    .SetShapeFn(ShapeFn<BatchNormIo>)
    .Doc(
        "Fused Batch Normalization over any channel axis of an input of rank >= 2, with an "
        "optional epilogue: y = activation(normalized x * scale + offset + residual).");

REGISTER_OP("TfbnBatchNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("scale: U")     // empty means 1
    .Input("offset: U")    // empty means 0; the epilogue recomputes z from it
    .Input("mean: U")      // the statistics the forward pass normalized with
    .Input("variance: U")
    .Input("mean_lo: U")   // the forward's mean_lo output, or empty (zero)
    .Input("residual: T")  // x's shape where has_residual, else empty [0]
    .Input("d_batch_mean: U")      // gradients of the forward's statistics outputs,
    .Input("d_batch_variance: U")  // or empty (zero); used in training only
    .Output("dx: T")
    .Output("dscale: U")
    .Output("doffset: U")
    .Output("dresidual: T")  // dz = dy * act'(z) where has_residual, else empty [0]
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 0.001")
    .Attr("axis: int = -1")
    .Attr("is_training: bool = true")
    .Attr(ActivationAttr())
    .Attr("has_residual: bool = false")
    .SetShapeFn(ShapeFn<BatchNormGradIo>)
    .Doc(
        "Gradient of TfbnBatchNorm with respect to x, scale, offset and residual; z is "
        "recomputed from x, the statistics, scale, offset and residual.");

}  // namespace tfbn
