// XLA lowering of TfbnBatchNorm (training and inference; optional residual + activation
// epilogue). Restates BatchNormForward of cc/core in HLO; see xla_view.h for why.
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tf/xla_registration.h"
#include "tf/xla_view.h"
#include "xla/hlo/builder/lib/constants.h"

namespace tfbn {
namespace {

using tensorflow::XlaOpKernelContext;

class BatchNormXlaOp : public TfbnXlaOpKernel<BatchNormIo> {
 public:
  using TfbnXlaOpKernel::TfbnXlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    const bool training = attrs_.args.training;
    XlaView v;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &v));

    xla::XlaBuilder* b = ctx->builder();
    const xla::PrimitiveType T = ctx->input_xla_type(In::kX);
    const xla::PrimitiveType U = ctx->input_xla_type(In::kScale);
    const int64_t C = v.channels;
    const xla::XlaOp x = ctx->Input(In::kX);

    xla::XlaOp hi, lo, var_d, batch_variance;  // var_d: the variance in float64
    if (training) {
      xla::XlaOp mean_d;
      if (v.per_channel() == 0) {  // an empty batch: NaN statistics, as the CPU kernel
        mean_d = var_d = xla::Broadcast(xla::NanValue(b, xla::F64), {C});
      } else {
        // Two passes in float64: the mean, then the mean of squared deviations from it.
        const xla::XlaOp x3 = To3d(x, v, xla::F64);
        const xla::XlaOp m = Scalar(b, xla::F64, static_cast<double>(v.per_channel()));
        mean_d = xla::Div(SumPerChannel(x3), m);
        const xla::XlaOp xc = xla::Sub(x3, PerChannel(mean_d, v));
        var_d = xla::Div(SumPerChannel(xla::Mul(xc, xc)), m);
      }
      hi = xla::ConvertElementType(mean_d, U);  // mean = hi + lo, each in U
      lo = xla::ConvertElementType(xla::Sub(mean_d, xla::ConvertElementType(hi, xla::F64)), U);
      batch_variance = xla::ConvertElementType(var_d, U);
    } else {
      hi = ctx->Input(In::kMean);
      lo = xla::Broadcast(xla::Zero(b, U), {C});
      batch_variance = ctx->Input(In::kVariance);
      var_d = xla::ConvertElementType(batch_variance, xla::F64);
    }
    // a = rsqrt(var + eps) * scale, computed in float64 and rounded once (as the CPU kernel).
    const xla::XlaOp inv_std = InverseStd(var_d, attrs_.args.epsilon);
    const xla::XlaOp a =
        xla::ConvertElementType(xla::Mul(inv_std, VectorOr(ctx, In::kScale, 1.0, xla::F64, C)), U);
    const xla::XlaOp offset = VectorOr(ctx, In::kOffset, 0.0, U, C);

    const xla::XlaOp x3 = To3d(x, v, U);
    xla::XlaOp z =
        xla::Add(xla::Mul(Centred(x3, hi, lo, v), PerChannel(a, v)), PerChannel(offset, v));
    if (attrs_.has_residual) z = xla::Add(z, To3d(ctx->Input(In::kResidual), v, U));
    ctx->SetOutput(In::kY, FromView(Activate(z, attrs_.args.activation), v, T));
    ctx->SetOutput(In::kBatchMean, hi);
    ctx->SetOutput(In::kBatchVariance, batch_variance);
    ctx->SetOutput(In::kMeanLo, lo);
  }
};

// No device or type constraint: every XLA backend (CPU_XLA_JIT, GPU_XLA_JIT) gets it, for
// the T/U pairs the op definition allows.
TFBN_REGISTER_XLA_OP("TfbnBatchNorm", BatchNormXlaOp);

}  // namespace
}  // namespace tfbn
