// XLA lowering of TfbnBatchNormGrad (training and inference; the epilogue's activation
// gradient and dresidual). Restates BatchNormBackward of cc/core in HLO; see xla_view.h.
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tf/xla_registration.h"
#include "tf/xla_view.h"
#include "xla/hlo/builder/lib/constants.h"

namespace tfbn {
namespace {

using tensorflow::XlaOpKernelContext;

class BatchNormGradXlaOp : public TfbnXlaOpKernel<BatchNormGradIo> {
 public:
  using TfbnXlaOpKernel::TfbnXlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    const bool training = attrs_.args.training;
    const bool has_residual = attrs_.has_residual;
    const Activation activation = attrs_.args.activation;
    XlaView v;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &v));

    xla::XlaBuilder* b = ctx->builder();
    const xla::PrimitiveType T = ctx->input_xla_type(In::kX);
    const xla::PrimitiveType U = ctx->input_xla_type(In::kMean);
    const int64_t C = v.channels;
    const bool empty = v.per_channel() == 0;
    auto f64 = [&](double value) { return Scalar(b, xla::F64, value); };

    const xla::XlaOp hi = ctx->Input(In::kMean);
    const xla::XlaOp lo = VectorOr(ctx, In::kMeanLo, 0.0, U, C);
    const xla::XlaOp r = InverseStd(xla::ConvertElementType(ctx->Input(In::kVariance), xla::F64),
                                    attrs_.args.epsilon);
    const xla::XlaOp s = VectorOr(ctx, In::kScale, 1.0, xla::F64, C);
    const xla::XlaOp x3 = To3d(ctx->Input(In::kX), v, U);
    const xla::XlaOp xc = Centred(x3, hi, lo, v);
    xla::XlaOp dy3 = To3d(ctx->Input(In::kDy), v, U);

    const bool epilogue = has_residual || activation != Activation::kIdentity;
    if (epilogue) {
      // z is recomputed as the forward made it (no pre-activation tensor is kept), and
      // dz = dy * act'(z) takes dy's place in the BatchNorm backward.
      const xla::XlaOp a = xla::ConvertElementType(xla::Mul(r, s), U);
      xla::XlaOp z = xla::Add(xla::Mul(xc, PerChannel(a, v)),
                              PerChannel(VectorOr(ctx, In::kOffset, 0.0, U, C), v));
      if (has_residual) z = xla::Add(z, To3d(ctx->Input(In::kResidual), v, U));
      dy3 = ActivationGrad(dy3, z, activation);
    }
    ctx->SetOutput(In::kDResidual,
                   has_residual ? FromView(dy3, v, T) : xla::Broadcast(xla::Zero(b, T), {0}));

    // Sums accumulated in float64 of terms formed in U, as the CPU kernels form them:
    // sum dy and sum dy * ((x - hi) - lo).
    const xla::XlaOp sum_dy = SumPerChannel(xla::ConvertElementType(dy3, xla::F64));
    const xla::XlaOp sum_dy_xc =
        SumPerChannel(xla::ConvertElementType(xla::Mul(dy3, xc), xla::F64));

    const xla::XlaOp zeros_u = xla::Broadcast(xla::Zero(b, U), {C});
    ctx->SetOutput(In::kDOffset, xla::ConvertElementType(sum_dy, U));
    ctx->SetOutput(In::kDScale,
                   empty ? zeros_u : xla::ConvertElementType(xla::Mul(r, sum_dy_xc), U));

    const xla::XlaOp sr = xla::Mul(s, r);
    const xla::XlaOp ga = xla::ConvertElementType(sr, U);
    xla::XlaOp dx = xla::Mul(PerChannel(ga, v), dy3);
    if (training && !empty) {
      // dx = s*r*(dy - mean(dy) - xhat*mean(dy*xhat)) + d_mean/m + 2*d_var*(x - mean)/m
      const xla::XlaOp m = f64(static_cast<double>(v.per_channel()));
      const xla::XlaOp dmu = VectorOr(ctx, In::kDBatchMean, 0.0, xla::F64, C);
      const xla::XlaOp dvar = VectorOr(ctx, In::kDBatchVariance, 0.0, xla::F64, C);
      const GradCoefficients g = TrainingGradCoefficients(sr, r, sum_dy, sum_dy_xc, dmu, dvar, m);
      const xla::XlaOp gb = xla::ConvertElementType(g.gb, U);
      const xla::XlaOp gc = xla::ConvertElementType(g.gc, U);
      dx = xla::Add(xla::Add(dx, xla::Mul(PerChannel(gb, v), xc)), PerChannel(gc, v));
    }
    ctx->SetOutput(In::kDx, FromView(dx, v, T));
  }
};

TFBN_REGISTER_XLA_OP("TfbnBatchNormGrad", BatchNormGradXlaOp);

}  // namespace
}  // namespace tfbn
