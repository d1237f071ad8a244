// XLA lowerings of the split op family's backward pieces: TfbnBatchNormGradSums and
// TfbnBatchNormGradApply (optionally weighted). Restate GradSums and ApplyGradWithSums of
// cc/core in HLO; see xla_view.h.
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tf/xla_registration.h"
#include "tf/xla_view.h"
#include "xla/hlo/builder/lib/constants.h"

namespace tfbn {
namespace {

using tensorflow::XlaOpKernelContext;

// (x - hi) - lo as [outer, C, inner] in `type`, from inputs x, hi and lo.
template <typename Input>
xla::XlaOp CentredInput(XlaOpKernelContext* ctx, const XlaView& v, Input x, Input hi, Input lo,
                        xla::PrimitiveType type) {
  return Centred(To3d(ctx->Input(x), v, type), xla::ConvertElementType(ctx->Input(hi), type),
                 VectorOr(ctx, lo, 0.0, type, v.channels), v);
}

class GradSumsXlaOp : public TfbnXlaOpKernel<GradSumsIo> {
 public:
  using TfbnXlaOpKernel::TfbnXlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &v));
    const int64_t C = v.channels;
    const xla::PrimitiveType U = ctx->input_xla_type(In::kMean);
    // Terms formed in U (as the CPU kernels form them), accumulated in float64.
    const xla::XlaOp dy = To3d(ctx->Input(In::kDy), v, U);
    const xla::XlaOp sum_dy = SumPerChannel(xla::ConvertElementType(dy, xla::F64));  // 0 if empty
    const xla::XlaOp xc = CentredInput(ctx, v, In::kX, In::kMean, In::kMeanLo, U);
    const xla::XlaOp sum_dy_xc = SumPerChannel(xla::ConvertElementType(xla::Mul(dy, xc), xla::F64));
    ctx->SetOutput(
        In::kSums,
        xla::ConcatInDim(ctx->builder(),
                         {xla::Reshape(sum_dy, {1, C}), xla::Reshape(sum_dy_xc, {1, C})}, 0));
  }
};

class GradApplyXlaOp : public TfbnXlaOpKernel<GradApplyIo> {
 public:
  using TfbnXlaOpKernel::TfbnXlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &v));
    tensorflow::TensorShape global_shape;
    OP_REQUIRES_OK(ctx, InputShape(ctx, In::kGlobalSums, &global_shape));
    const int64_t global_rows = global_shape.dim_size(0);

    xla::XlaBuilder* b = ctx->builder();
    const xla::PrimitiveType T = ctx->input_xla_type(In::kX);
    const xla::PrimitiveType U = ctx->input_xla_type(In::kMean);
    const int64_t C = v.channels;
    const xla::XlaOp zeros_d = xla::Broadcast(xla::Zero(b, xla::F64), {C});
    const xla::XlaOp zeros_u = xla::Broadcast(xla::Zero(b, U), {C});

    const xla::XlaOp r = InverseStd(xla::ConvertElementType(ctx->Input(In::kVariance), xla::F64),
                                    attrs_.args.epsilon);
    const xla::XlaOp s = VectorOr(ctx, In::kScale, 1.0, xla::F64, C);
    const xla::XlaOp local = ctx->Input(In::kLocalSums);
    const xla::XlaOp global = ctx->Input(In::kGlobalSums);
    ctx->SetOutput(In::kDOffset, xla::ConvertElementType(Row(local, 0, C), U));
    ctx->SetOutput(In::kDScale, v.per_channel() == 0
                                    ? zeros_u
                                    : xla::ConvertElementType(xla::Mul(r, Row(local, 1, C)), U));

    // The fused formula with the global sums and count M (the merged weight sum):
    // dx = s*r*dy + w * (gb * (x - mean) + gc), w = 1 without weights.
    const xla::XlaOp m = ctx->Input(In::kCount);
    const xla::XlaOp some = xla::Gt(m, zeros_d);
    const xla::XlaOp dmu = global_rows == kGradSumRowsWithStats ? Row(global, 2, C) : zeros_d;
    const xla::XlaOp dvar = global_rows == kGradSumRowsWithStats ? Row(global, 3, C) : zeros_d;
    const xla::XlaOp sr = xla::Mul(s, r);
    const GradCoefficients g =
        TrainingGradCoefficients(sr, r, Row(global, 0, C), Row(global, 1, C), dmu, dvar, m);
    const xla::XlaOp gb = xla::Select(some, g.gb, zeros_d);
    const xla::XlaOp gc = xla::Select(some, g.gc, zeros_d);

    const xla::XlaOp dy = To3d(ctx->Input(In::kDy), v, U);
    const xla::XlaOp ga_dy = xla::Mul(PerChannel(xla::ConvertElementType(sr, U), v), dy);
    const xla::XlaOp xc = CentredInput(ctx, v, In::kX, In::kMean, In::kMeanLo, U);
    const xla::XlaOp gb_xc = xla::Mul(PerChannel(xla::ConvertElementType(gb, U), v), xc);
    const xla::XlaOp gc_u = PerChannel(xla::ConvertElementType(gc, U), v);
    xla::XlaOp dx;
    if (HasInput(ctx, In::kWeights)) {
      // Only the terms from the statistics' dependence on x carry the element's weight.
      const xla::XlaOp w =
          xla::BroadcastInDim(Weights2d(ctx, In::kWeights, v, U), v.dims(), {0, 2});
      dx = xla::Add(ga_dy, xla::Mul(w, xla::Add(gb_xc, gc_u)));
    } else {
      dx = xla::Add(xla::Add(ga_dy, gb_xc), gc_u);  // the CPU kernel's order
    }
    ctx->SetOutput(In::kDx, FromView(dx, v, T));
  }
};

TFBN_REGISTER_XLA_OP("TfbnBatchNormGradSums", GradSumsXlaOp);
TFBN_REGISTER_XLA_OP("TfbnBatchNormGradApply", GradApplyXlaOp);

}  // namespace
}  // namespace tfbn
