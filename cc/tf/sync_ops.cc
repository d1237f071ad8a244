// Op definitions of the split op family: the fused op cut where synchronized BatchNorm
// needs a collective (statistics | merge | apply, gradient sums | apply). Partials and
// sums travel as float64 whatever x's dtype, so a merged mean keeps the data's precision.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/validation.h"
#include "tf/weights.h"

namespace tfbn {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

constexpr int64_t kRows = 3;  // count, mean, M2

absl::Status CheckTU(InferenceContext* c) {
  tensorflow::DataType t, u;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("U", &u));
  return CheckParamDtype(t, u);
}

absl::Status CheckEps(InferenceContext* c) {
  float epsilon;
  TF_RETURN_IF_ERROR(c->GetAttr("epsilon", &epsilon));
  return CheckEpsilon(epsilon);
}

// x's channel dimension (unknown where the rank is).
absl::Status Channels(InferenceContext* c, ShapeHandle x, int* axis_out, DimensionHandle* ch) {
  int axis;
  TF_RETURN_IF_ERROR(c->GetAttr("axis", &axis));
  *axis_out = axis;
  *ch = c->UnknownDim();
  if (!c->RankKnown(x)) return absl::OkStatus();
  TF_RETURN_IF_ERROR(ResolveAxis(axis, c->Rank(x), c->DebugString(x), axis_out));
  *ch = c->Dim(x, *axis_out);
  return absl::OkStatus();
}

// Merges per-channel vector input `index` (length C, or 0 where allow_empty) into *ch.
absl::Status Vector(InferenceContext* c, int index, const char* name, bool allow_empty,
                    int axis, ShapeHandle x, DimensionHandle* ch) {
  ShapeHandle v = c->input(index);
  if (!c->RankKnown(v)) return absl::OkStatus();
  const int rank = c->Rank(v);
  const int64_t length = rank == 1 ? c->Value(c->Dim(v, 0)) : -1;
  TF_RETURN_IF_ERROR(CheckChannelVector(name, rank, length, c->Value(*ch), allow_empty, axis,
                                        c->DebugString(x)));
  if (allow_empty && length == 0) return absl::OkStatus();
  return c->Merge(*ch, c->Dim(v, 0), ch);
}

// A [rows, C] float64 matrix input; rows is one of the allowed values.
absl::Status Matrix(InferenceContext* c, int index, const char* name,
                    std::initializer_list<int64_t> rows, DimensionHandle* ch) {
  ShapeHandle m;
  if (!c->WithRank(c->input(index), 2, &m).ok())
    return absl::InvalidArgumentError(absl::StrCat("tfbn: ", name, " must be a [rows, C] matrix, got shape ",
                                                   c->DebugString(c->input(index))));
  const int64_t r = c->Value(c->Dim(m, 0));
  bool ok = r < 0;
  for (int64_t want : rows) ok = ok || r == want;
  if (!ok)
    return absl::InvalidArgumentError(
        absl::StrCat("tfbn: ", name, " has ", r, " rows, expected ", *rows.begin(),
                     rows.size() > 1 ? absl::StrCat(" or ", *(rows.end() - 1)) : ""));
  if (!c->Merge(*ch, c->Dim(m, 1), ch).ok())
    return absl::InvalidArgumentError(absl::StrCat("tfbn: ", name, " has shape ",
                                                   c->DebugString(m), ", which does not match C = ",
                                                   c->DebugString(*ch)));
  return absl::OkStatus();
}

// The weights input (see weights.h), checked where x's rank and axis are known.
absl::Status Weights(InferenceContext* c, int index, ShapeHandle x, int axis) {
  ShapeHandle w = c->input(index);
  if (!c->RankKnown(x)) return absl::OkStatus();
  std::vector<int64_t> x_dims, w_dims;
  for (int d = 0; d < c->Rank(x); ++d) x_dims.push_back(c->Value(c->Dim(x, d)));
  const int w_rank = c->RankKnown(w) ? c->Rank(w) : -1;
  for (int d = 0; d < w_rank; ++d) w_dims.push_back(c->Value(c->Dim(w, d)));
  bool weighted;
  return CheckWeightsShape(x_dims, axis, w_rank, w_dims, &weighted);
}

absl::Status StatsShape(InferenceContext* c) {
  int axis;
  DimensionHandle ch;
  TF_RETURN_IF_ERROR(Channels(c, c->input(0), &axis, &ch));
  TF_RETURN_IF_ERROR(Weights(c, 1, c->input(0), axis));
  c->set_output(0, c->Matrix(kRows, ch));
  return absl::OkStatus();
}

absl::Status MergeShape(InferenceContext* c) {
  ShapeHandle p = c->input(0);
  DimensionHandle ch = c->UnknownDim();
  if (c->RankKnown(p)) {
    const int rank = c->Rank(p);
    if (rank != 2 && rank != 3)
      return absl::InvalidArgumentError(absl::StrCat(
          "tfbn: partials must be [parts, 3, C] or [3 * parts, C], got shape ",
          c->DebugString(p)));
    const int64_t rows = c->Value(c->Dim(p, rank - 2));
    if (rows >= 0 && (rank == 3 ? rows != kRows : rows % kRows != 0))
      return absl::InvalidArgumentError(absl::StrCat(
          "tfbn: partials must be [parts, 3, C] or [3 * parts, C] (rows count, mean, M2), "
          "got shape ", c->DebugString(p)));
    ch = c->Dim(p, rank - 1);
  }
  for (int i = 0; i < 4; ++i) c->set_output(i, c->Vector(ch));
  return absl::OkStatus();
}

absl::Status ApplyShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckTU(c));
  TF_RETURN_IF_ERROR(CheckEps(c));
  ShapeHandle x = c->input(0);
  int axis;
  DimensionHandle ch;
  TF_RETURN_IF_ERROR(Channels(c, x, &axis, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 1, "scale", true, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 2, "offset", true, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 3, "mean", false, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 4, "variance", false, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 5, "mean_residual", true, axis, x, &ch));
  c->set_output(0, x);
  return absl::OkStatus();
}

absl::Status SameShape(InferenceContext* c, ShapeHandle* x) {
  if (c->Merge(c->input(0), c->input(1), x).ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tfbn: dy has shape ", c->DebugString(c->input(0)),
                                                 " but x has shape ", c->DebugString(c->input(1))));
}

absl::Status GradSumsShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckTU(c));
  ShapeHandle x;
  TF_RETURN_IF_ERROR(SameShape(c, &x));
  int axis;
  DimensionHandle ch;
  TF_RETURN_IF_ERROR(Channels(c, x, &axis, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 2, "mean", false, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 3, "mean_residual", true, axis, x, &ch));
  c->set_output(0, c->Matrix(2, ch));
  return absl::OkStatus();
}

absl::Status GradApplyShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckTU(c));
  TF_RETURN_IF_ERROR(CheckEps(c));
  ShapeHandle x;
  TF_RETURN_IF_ERROR(SameShape(c, &x));
  int axis;
  DimensionHandle ch;
  TF_RETURN_IF_ERROR(Channels(c, x, &axis, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 2, "scale", true, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 3, "mean", false, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 4, "variance", false, axis, x, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 5, "mean_residual", true, axis, x, &ch));
  TF_RETURN_IF_ERROR(Matrix(c, 6, "local_sums", {2}, &ch));
  TF_RETURN_IF_ERROR(Matrix(c, 7, "global_sums", {2, 4}, &ch));
  TF_RETURN_IF_ERROR(Vector(c, 8, "count", false, axis, x, &ch));
  TF_RETURN_IF_ERROR(Weights(c, 9, x, axis));
  c->set_output(0, x);
  c->set_output(1, c->Vector(ch));
  c->set_output(2, c->Vector(ch));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfbnBatchNormStats")
    .Input("x: T")
    // Empty [0]: every element weighs 1. Else x's shape without the channel axis: one
    // weight per position, shared by all channels (a Keras mask); finite and >= 0.
    .Input("weights: float")
    .Output("partial: double")  // [3, C]: weight sum (count), mean, M2 of this slice
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("axis: int = -1")
    .SetShapeFn(StatsShape)
    .Doc("Per-channel partial statistics (count, mean, M2) of x, for a later merge; with "
         "weights: sum of weights, weighted mean, M2 = sum w * (x - mean)^2. A slice "
         "with no weight gives 0, 0, 0.");

REGISTER_OP("TfbnBatchNormMergeStats")
    .Input("partials: double")  // [parts, 3, C] or [3 * parts, C]
    .Output("mean: U")
    .Output("variance: U")       // biased; NaN (with mean) where the merged count is 0
    .Output("mean_residual: U")  // mean - U(mean)
    .Output("count: double")     // elements per channel, all parts together
    .Attr("U: {float, double}")
    .SetShapeFn(MergeShape)
    .Doc("Merges partial statistics in part order (Chan's pairwise update).");

REGISTER_OP("TfbnBatchNormApply")
    .Input("x: T")
    .Input("scale: U")          // empty means 1
    .Input("offset: U")         // empty means 0
    .Input("mean: U")
    .Input("variance: U")
    .Input("mean_residual: U")  // empty means 0
    .Output("y: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 0.001")
    .Attr("axis: int = -1")
    .SetShapeFn(ApplyShape)
    .Doc("y = ((x - mean) - mean_residual) * rsqrt(variance + epsilon) * scale + offset.");

REGISTER_OP("TfbnBatchNormGradSums")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: U")
    .Input("mean_residual: U")  // empty means 0
    .Output("sums: double")     // [2, C]: sum dy, sum dy * (x - mean)
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("axis: int = -1")
    .SetShapeFn(GradSumsShape)
    .Doc("Per-channel gradient sums of this slice, for a later all-reduce.");

REGISTER_OP("TfbnBatchNormGradApply")
    .Input("dy: T")
    .Input("x: T")
    .Input("scale: U")          // empty means 1
    .Input("mean: U")
    .Input("variance: U")
    .Input("mean_residual: U")  // empty means 0
    .Input("local_sums: double")   // [2, C]: TfbnBatchNormGradSums of this slice
    .Input("global_sums: double")  // [2 or 4, C]: summed over all slices (+ d_mean, d_var)
    .Input("count: double")        // [C]: elements (weight sum) per channel, whole batch
    .Input("weights: float")       // as TfbnBatchNormStats' weights (empty [0]: all 1)
    .Output("dx: T")
    .Output("dscale: U")   // of this slice
    .Output("doffset: U")  // of this slice
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 0.001")
    .Attr("axis: int = -1")
    .SetShapeFn(GradApplyShape)
    .Doc("Training gradient of BatchNorm from sums over the whole batch. With weights, "
         "every term that comes from the statistics' dependence on x is scaled by the "
         "element's weight.");

}  // namespace tfbn
