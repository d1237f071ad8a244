// Op definitions and shape functions of the split op family: the fused op cut where
// synchronized BatchNorm needs a collective (statistics | merge | apply, gradient sums |
// gradient apply); masks and batch renormalization use the same pieces on one device.
// Partials and sums travel as float64 whatever x's dtype, so a merged mean keeps the
// data's precision. Inputs and outputs are listed in the order of op_signatures.h.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tf/op_signatures.h"
#include "tf/shape_fns.h"

namespace tfbn {
namespace {

using tensorflow::shape_inference::InferenceContext;

absl::Status MergeStatsShape(InferenceContext* c) {
  using In = MergeStatsIo;
  auto p = c->input(In::kPartials);
  auto channels = c->UnknownDim();
  if (c->RankKnown(p)) {
    const int rank = c->Rank(p);
    const int64_t rows = rank >= 2 ? c->Value(c->Dim(p, rank - 2)) : -1;
    TF_RETURN_IF_ERROR(CheckPartials(rank, rows, c->DebugString(p)));
    channels = c->Dim(p, rank - 1);
  }
  for (auto out : {In::kMean, In::kVariance, In::kMeanLo, In::kCount})
    c->set_output(out, c->Vector(channels));
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
    .SetShapeFn(ShapeFn<StatsIo>)
    .Doc(
        "Per-channel partial statistics (count, mean, M2) of x, for a later merge; with "
        "weights: sum of weights, weighted mean, M2 = sum w * (x - mean)^2. A slice "
        "with no weight gives 0, 0, 0.");

REGISTER_OP("TfbnBatchNormMergeStats")
    .Input("partials: double")  // [parts, 3, C] or [3 * parts, C]
    .Output("mean: U")
    .Output("variance: U")       // biased; NaN (with mean) where the merged count is 0
    .Output("mean_lo: U")        // the mean's low part, mean - U(mean)
    .Output("count: double")     // elements per channel, all parts together
    .Attr("U: {float, double}")
    .SetShapeFn(MergeStatsShape)
    .Doc("Merges partial statistics in part order (Chan's pairwise update).");

REGISTER_OP("TfbnBatchNormApply")
    .Input("x: T")
    .Input("scale: U")          // empty means 1
    .Input("offset: U")         // empty means 0
    .Input("mean: U")
    .Input("variance: U")
    .Input("mean_lo: U")        // empty means 0
    .Output("y: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 0.001")
    .Attr("axis: int = -1")
    .SetShapeFn(ShapeFn<ApplyIo>)
    .Doc("y = ((x - mean) - mean_lo) * rsqrt(variance + epsilon) * scale + offset.");

REGISTER_OP("TfbnBatchNormGradSums")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: U")
    .Input("mean_lo: U")        // empty means 0
    .Output("sums: double")     // [2, C]: sum dy, sum dy * (x - mean)
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("axis: int = -1")
    .SetShapeFn(ShapeFn<GradSumsIo>)
    .Doc("Per-channel gradient sums of this slice, for a later all-reduce.");

REGISTER_OP("TfbnBatchNormGradApply")
    .Input("dy: T")
    .Input("x: T")
    .Input("scale: U")          // empty means 1
    .Input("mean: U")
    .Input("variance: U")
    .Input("mean_lo: U")        // empty means 0
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
    .SetShapeFn(ShapeFn<GradApplyIo>)
    .Doc(
        "Training gradient of BatchNorm from sums over the whole batch. With weights, "
        "every term that comes from the statistics' dependence on x is scaled by the "
        "element's weight.");

}  // namespace tfbn
