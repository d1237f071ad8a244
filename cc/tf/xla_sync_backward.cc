// XLA lowerings of the split op family's backward pieces: TfbnBatchNormGradSums and
// TfbnBatchNormGradApply (optionally weighted). Restate GradSums and ApplyGradWithSums of
// cc/core in HLO; see xla_view.h.
#include "absl/strings/str_cat.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tf/xla_registration.h"
#include "tf/validation.h"
#include "tf/xla_view.h"
#include "xla/hlo/builder/lib/constants.h"

namespace tfbn {
namespace {

using tensorflow::OpKernelConstruction;
using tensorflow::XlaOpKernel;
using tensorflow::XlaOpKernelContext;

constexpr int kWeights = 9;  // GradApply's input appended for masks

// (x - hi) - lo as [outer, C, inner] in `type`, from inputs x, hi and lo.
xla::XlaOp CentredInput(XlaOpKernelContext* ctx, const XlaView& v, int x, int hi, int lo,
                        xla::PrimitiveType type) {
  return Centred(To3d(ctx->Input(x), v, type), xla::ConvertElementType(ctx->Input(hi), type),
                 VectorOr(ctx, lo, 0.0, type, v.channels), v);
}

// A [rows, C] float64 matrix input; rows_a or rows_b rows.
absl::Status CheckMatrix(XlaOpKernelContext* ctx, int index, const char* name, int64_t rows_a,
                         int64_t rows_b, const XlaView& v, int64_t* rows) {
  auto s = ctx->InputXlaShape(index);
  TF_RETURN_IF_ERROR(s.status());
  const auto d = s->dimensions();
  if (d.size() == 2 && (d[0] == rows_a || d[0] == rows_b) && d[1] == v.channels) {
    *rows = d[0];
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "tfbn: ", name, " must be a [", rows_a == rows_b ? absl::StrCat(rows_a)
                                                      : absl::StrCat(rows_a, " or ", rows_b),
      ", C = ", v.channels, "] matrix, got shape ", s->ToString()));
}

class GradSumsXlaOp : public XlaOpKernel {
 public:
  explicit GradSumsXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadCommonAttrs(ctx, &axis_, nullptr));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, MakeView(ctx, 1, axis_, &v));
    OP_REQUIRES_OK(ctx, CheckLikeX(ctx, 0, "dy", v));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 2, "mean", false, v));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 3, "mean_residual", true, v));
    const int64_t C = v.channels;
    const xla::PrimitiveType U = ctx->input_xla_type(2);
    // Terms formed in U (as the CPU kernels form them), accumulated in float64.
    const xla::XlaOp dy = To3d(ctx->Input(0), v, U);
    const xla::XlaOp sum_dy = SumPerChannel(xla::ConvertElementType(dy, xla::F64));  // 0 if empty
    const xla::XlaOp sum_dy_xc = SumPerChannel(
        xla::ConvertElementType(xla::Mul(dy, CentredInput(ctx, v, 1, 2, 3, U)), xla::F64));
    ctx->SetOutput(0, xla::ConcatInDim(ctx->builder(),
                                       {xla::Reshape(sum_dy, {1, C}), xla::Reshape(sum_dy_xc, {1, C})},
                                       0));
  }

 private:
  int axis_ = -1;
};

class GradApplyXlaOp : public XlaOpKernel {
 public:
  explicit GradApplyXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadCommonAttrs(ctx, &axis_, &epsilon_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, MakeView(ctx, 1, axis_, &v));
    OP_REQUIRES_OK(ctx, CheckGradInputs(ctx, v, "mean_residual"));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 8, "count", false, v));
    int64_t local_rows, global_rows;
    OP_REQUIRES_OK(ctx, CheckMatrix(ctx, 6, "local_sums", 2, 2, v, &local_rows));
    OP_REQUIRES_OK(ctx, CheckMatrix(ctx, 7, "global_sums", 2, 4, v, &global_rows));

    xla::XlaBuilder* b = ctx->builder();
    const xla::PrimitiveType T = ctx->input_xla_type(1), U = ctx->input_xla_type(3);
    const int64_t C = v.channels;
    const xla::XlaOp zeros_d = xla::Broadcast(xla::Zero(b, xla::F64), {C});
    const xla::XlaOp zeros_u = xla::Broadcast(xla::Zero(b, U), {C});

    const xla::XlaOp r = InverseStd(xla::ConvertElementType(ctx->Input(4), xla::F64), epsilon_);
    const xla::XlaOp s = VectorOr(ctx, 2, 1.0, xla::F64, C);
    const xla::XlaOp local = ctx->Input(6), global = ctx->Input(7);
    ctx->SetOutput(2, xla::ConvertElementType(Row(local, 0, C), U));
    ctx->SetOutput(1, v.per_channel() == 0
                          ? zeros_u
                          : xla::ConvertElementType(xla::Mul(r, Row(local, 1, C)), U));

    // The fused formula with the global sums and count M (the merged weight sum):
    // dx = s*r*dy + w * (gb * (x - mean) + gc), w = 1 without weights.
    const xla::XlaOp m = ctx->Input(8);
    const xla::XlaOp some = xla::Gt(m, zeros_d);
    const xla::XlaOp dmu = global_rows == 4 ? Row(global, 2, C) : zeros_d;
    const xla::XlaOp dvar = global_rows == 4 ? Row(global, 3, C) : zeros_d;
    const xla::XlaOp sr = xla::Mul(s, r);
    const GradCoefficients g =
        TrainingGradCoefficients(sr, r, Row(global, 0, C), Row(global, 1, C), dmu, dvar, m);
    const xla::XlaOp gb = xla::Select(some, g.gb, zeros_d);
    const xla::XlaOp gc = xla::Select(some, g.gc, zeros_d);

    const xla::XlaOp dy = To3d(ctx->Input(0), v, U);
    const xla::XlaOp ga_dy = xla::Mul(PerChannel(xla::ConvertElementType(sr, U), v), dy);
    const xla::XlaOp gb_xc =
        xla::Mul(PerChannel(xla::ConvertElementType(gb, U), v), CentredInput(ctx, v, 1, 3, 5, U));
    const xla::XlaOp gc_u = PerChannel(xla::ConvertElementType(gc, U), v);
    xla::XlaOp dx;
    if (HasInput(ctx, kWeights)) {
      // Only the terms from the statistics' dependence on x carry the element's weight.
      OP_REQUIRES_OK(ctx, CheckWeights(ctx, kWeights, v));
      const xla::XlaOp w = xla::BroadcastInDim(Weights2d(ctx, kWeights, v, U), v.dims(), {0, 2});
      dx = xla::Add(ga_dy, xla::Mul(w, xla::Add(gb_xc, gc_u)));
    } else {
      dx = xla::Add(xla::Add(ga_dy, gb_xc), gc_u);  // the CPU kernel's order
    }
    ctx->SetOutput(0, FromView(dx, v, T));
  }

 private:
  int axis_ = -1;
  float epsilon_ = 1e-3f;
};

TFBN_REGISTER_XLA_OP("TfbnBatchNormGradSums", GradSumsXlaOp);
TFBN_REGISTER_XLA_OP("TfbnBatchNormGradApply", GradApplyXlaOp);

}  // namespace
}  // namespace tfbn
