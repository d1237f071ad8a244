// XLA lowering of TfbnBatchNormGrad (training and inference; the epilogue's activation
// gradient and dresidual). Restates BatchNormBackward of cc/core in HLO; see xla_view.h.
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

// Inputs appended by the epilogue (absent in older op versions).
constexpr int kOffset = 8, kResidual = 9;

class BatchNormGradXlaOp : public XlaOpKernel {
 public:
  explicit BatchNormGradXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadCommonAttrs(ctx, &axis_, &epsilon_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("is_training", &training_));
    OP_REQUIRES_OK(ctx, ReadEpilogueAttrs(ctx, &activation_, &has_residual_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, MakeView(ctx, 1, axis_, &v));
    OP_REQUIRES_OK(ctx, CheckGradInputs(ctx, v, "reserve"));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 6, "d_batch_mean", true, v));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 7, "d_batch_variance", true, v));
    if (ctx->num_inputs() > kOffset)
      OP_REQUIRES_OK(ctx, CheckVector(ctx, kOffset, "offset", true, v));
    if (has_residual_) OP_REQUIRES_OK(ctx, CheckLikeX(ctx, kResidual, "residual", v));

    xla::XlaBuilder* b = ctx->builder();
    const xla::PrimitiveType T = ctx->input_xla_type(1), U = ctx->input_xla_type(3);
    const int64_t C = v.channels;
    const bool empty = v.per_channel() == 0;
    auto f64 = [&](double value) { return Scalar(b, xla::F64, value); };

    const xla::XlaOp hi = ctx->Input(3);
    const xla::XlaOp lo = VectorOr(ctx, 5, 0.0, U, C);
    const xla::XlaOp r = InverseStd(xla::ConvertElementType(ctx->Input(4), xla::F64), epsilon_);
    const xla::XlaOp s = VectorOr(ctx, 2, 1.0, xla::F64, C);
    const xla::XlaOp x3 = To3d(ctx->Input(1), v, U);
    const xla::XlaOp xc = Centred(x3, hi, lo, v);
    xla::XlaOp dy3 = To3d(ctx->Input(0), v, U);

    const bool epilogue = has_residual_ || activation_ != Activation::kIdentity;
    if (epilogue) {
      // z is recomputed as the forward made it (no pre-activation tensor is kept), and
      // dz = dy * act'(z) takes dy's place in the BatchNorm backward.
      const xla::XlaOp a = xla::ConvertElementType(xla::Mul(r, s), U);
      xla::XlaOp z = xla::Add(xla::Mul(xc, PerChannel(a, v)),
                              PerChannel(VectorOr(ctx, kOffset, 0.0, U, C), v));
      if (has_residual_) z = xla::Add(z, To3d(ctx->Input(kResidual), v, U));
      dy3 = ActivationGrad(dy3, z, activation_);
    }
    if (ctx->num_outputs() > 3) {
      ctx->SetOutput(3, has_residual_ ? FromView(dy3, v, T)
                                      : xla::Broadcast(xla::Zero(b, T), {0}));
    }

    // Sums accumulated in float64 of terms formed in U, as the CPU kernels form them:
    // sum dy and sum dy * ((x - hi) - lo).
    const xla::XlaOp sum_dy = SumPerChannel(xla::ConvertElementType(dy3, xla::F64));
    const xla::XlaOp sum_dy_xc = SumPerChannel(xla::ConvertElementType(xla::Mul(dy3, xc), xla::F64));

    const xla::XlaOp zeros_u = xla::Broadcast(xla::Zero(b, U), {C});
    ctx->SetOutput(2, xla::ConvertElementType(sum_dy, U));
    ctx->SetOutput(1, empty ? zeros_u : xla::ConvertElementType(xla::Mul(r, sum_dy_xc), U));

    const xla::XlaOp sr = xla::Mul(s, r);
    const xla::XlaOp ga = xla::ConvertElementType(sr, U);
    xla::XlaOp dx = xla::Mul(PerChannel(ga, v), dy3);
    if (training_ && !empty) {
      // dx = s*r*(dy - mean(dy) - xhat*mean(dy*xhat)) + d_mean/m + 2*d_var*(x - mean)/m
      const xla::XlaOp m = f64(static_cast<double>(v.per_channel()));
      const xla::XlaOp dmu = VectorOr(ctx, 6, 0.0, xla::F64, C);
      const xla::XlaOp dvar = VectorOr(ctx, 7, 0.0, xla::F64, C);
      const GradCoefficients g = TrainingGradCoefficients(sr, r, sum_dy, sum_dy_xc, dmu, dvar, m);
      const xla::XlaOp gb = xla::ConvertElementType(g.gb, U);
      const xla::XlaOp gc = xla::ConvertElementType(g.gc, U);
      dx = xla::Add(xla::Add(dx, xla::Mul(PerChannel(gb, v), xc)), PerChannel(gc, v));
    }
    ctx->SetOutput(0, FromView(dx, v, T));
  }

 private:
  float epsilon_ = 1e-3f;
  int axis_ = -1;
  bool training_ = true;
  Activation activation_ = Activation::kIdentity;
  bool has_residual_ = false;
};

TFBN_REGISTER_XLA_OP("TfbnBatchNormGrad", BatchNormGradXlaOp);

}  // namespace
}  // namespace tfbn
