// Op definitions and shape functions for the tfbn ops.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/validation.h"

namespace tfbn {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

absl::Status CheckAttrs(InferenceContext* c) {
  float epsilon;
  TF_RETURN_IF_ERROR(c->GetAttr("epsilon", &epsilon));
  TF_RETURN_IF_ERROR(CheckEpsilon(epsilon));
  tensorflow::DataType t, u;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("U", &u));
  return CheckParamDtype(t, u);
}

// Checks x's rank and axis where known; *channels is C or unknown.
absl::Status ChannelDim(InferenceContext* c, ShapeHandle x, int* axis_out,
                        DimensionHandle* channels) {
  int axis;
  TF_RETURN_IF_ERROR(c->GetAttr("axis", &axis));
  *axis_out = axis;
  *channels = c->UnknownDim();
  if (!c->RankKnown(x)) return absl::OkStatus();
  int resolved;
  TF_RETURN_IF_ERROR(ResolveAxis(axis, c->Rank(x), c->DebugString(x), &resolved));
  *axis_out = resolved;
  *channels = c->Dim(x, resolved);
  return absl::OkStatus();
}

// Merges the length of per-channel input `index` into *channels.
absl::Status MergeChannelVector(InferenceContext* c, int index, const char* name,
                                bool allow_empty, int axis, ShapeHandle x,
                                DimensionHandle* channels) {
  ShapeHandle v = c->input(index);
  if (!c->RankKnown(v)) return absl::OkStatus();
  const int rank = c->Rank(v);
  const int64_t length = rank == 1 ? c->Value(c->Dim(v, 0)) : -1;
  const int64_t want = c->Value(*channels);
  TF_RETURN_IF_ERROR(CheckChannelVector(name, rank, length, want, allow_empty, axis,
                                        c->DebugString(x)));
  if (allow_empty && length == 0) return absl::OkStatus();
  DimensionHandle merged;
  TF_RETURN_IF_ERROR(c->Merge(*channels, c->Dim(v, 0), &merged));
  *channels = merged;
  return absl::OkStatus();
}

// The epilogue's residual (input `index`): x's shape where has_residual, else empty [0].
absl::Status CheckResidual(InferenceContext* c, int index, ShapeHandle x) {
  bool has_residual;
  TF_RETURN_IF_ERROR(c->GetAttr("has_residual", &has_residual));
  ShapeHandle residual = c->input(index);
  if (!has_residual) {
    if (!c->RankKnown(residual)) return absl::OkStatus();
    const bool empty = c->Rank(residual) == 1 && c->Value(c->Dim(residual, 0)) <= 0;
    if (empty) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "tfbn: residual must be empty ([0]) where has_residual is false, got shape ",
        c->DebugString(residual)));
  }
  ShapeHandle merged;
  if (c->Merge(x, residual, &merged).ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tfbn: residual must have the shape of x ",
                                                 c->DebugString(x), ", got residual of shape ",
                                                 c->DebugString(residual)));
}

absl::Status ForwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckAttrs(c));
  bool training;
  TF_RETURN_IF_ERROR(c->GetAttr("is_training", &training));
  ShapeHandle x = c->input(0);
  int axis;
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelDim(c, x, &axis, &channels));
  bool has_scale, has_offset;
  TF_RETURN_IF_ERROR(c->GetAttr("has_scale", &has_scale));
  TF_RETURN_IF_ERROR(c->GetAttr("has_offset", &has_offset));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 1, "scale", !has_scale, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 2, "offset", !has_offset, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 3, "mean", training, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 4, "variance", training, axis, x, &channels));
  TF_RETURN_IF_ERROR(CheckResidual(c, 5, x));
  c->set_output(0, x);
  for (int i = 1; i < 4; ++i) c->set_output(i, c->Vector(channels));
  return absl::OkStatus();
}

absl::Status BackwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckAttrs(c));
  ShapeHandle x;
  if (!c->Merge(c->input(0), c->input(1), &x).ok())
    return absl::InvalidArgumentError(absl::StrCat("tfbn: dy has shape ",
                                                   c->DebugString(c->input(0)),
                                                   " but x has shape ",
                                                   c->DebugString(c->input(1))));
  int axis;
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelDim(c, x, &axis, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 2, "scale", true, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 3, "mean", false, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 4, "variance", false, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 5, "reserve", true, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 6, "d_batch_mean", true, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 7, "d_batch_variance", true, axis, x, &channels));
  TF_RETURN_IF_ERROR(MergeChannelVector(c, 8, "offset", true, axis, x, &channels));
  TF_RETURN_IF_ERROR(CheckResidual(c, 9, x));
  bool has_residual;
  TF_RETURN_IF_ERROR(c->GetAttr("has_residual", &has_residual));
  c->set_output(0, x);
  c->set_output(1, c->Vector(channels));
  c->set_output(2, c->Vector(channels));
  c->set_output(3, has_residual ? x : c->Vector(0));
  return absl::OkStatus();
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
    .Output("reserve: U")  // mean residual (mean - float(mean)) for the gradient
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 0.001")
    .Attr("axis: int = -1")
    .Attr("is_training: bool = true")
    .Attr("has_scale: bool = false")   // true: scale must have C entries
    .Attr("has_offset: bool = false")  // true: offset must have C entries
    .Attr("activation: {'identity', 'relu', 'relu6', 'silu'} = 'identity'")
    .Attr("has_residual: bool = false")
    .SetShapeFn(ForwardShape)
    .Doc("Fused Batch Normalization over any channel axis of an input of rank >= 2, with an "
         "optional epilogue: y = activation(normalized x * scale + offset + residual).");

REGISTER_OP("TfbnBatchNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("scale: U")     // empty means 1
    .Input("mean: U")      // the statistics the forward pass normalized with
    .Input("variance: U")
    .Input("reserve: U")   // the forward's reserve output, or empty (zero)
    .Input("d_batch_mean: U")      // gradients of the forward's statistics outputs,
    .Input("d_batch_variance: U")  // or empty (zero); used in training only
    .Input("offset: U")    // empty means 0; the epilogue recomputes z from it
    .Input("residual: T")  // x's shape where has_residual, else empty [0]
    .Output("dx: T")
    .Output("dscale: U")
    .Output("doffset: U")
    .Output("dresidual: T")  // dz = dy * act'(z) where has_residual, else empty [0]
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 0.001")
    .Attr("axis: int = -1")
    .Attr("is_training: bool = true")
    .Attr("activation: {'identity', 'relu', 'relu6', 'silu'} = 'identity'")
    .Attr("has_residual: bool = false")
    .SetShapeFn(BackwardShape)
    .Doc("Gradient of TfbnBatchNorm with respect to x, scale, offset and residual; z is "
         "recomputed from x, the statistics, scale, offset and residual.");

}  // namespace tfbn
