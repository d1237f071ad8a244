// XLA lowering of TfbnBatchNorm (training and inference; optional residual + activation
// epilogue). Restates BatchNormForward of cc/core in HLO; see xla_view.h for why.
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

class BatchNormXlaOp : public XlaOpKernel {
 public:
  explicit BatchNormXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadCommonAttrs(ctx, &axis_, &epsilon_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("is_training", &training_));
    if (ctx->HasAttr("has_scale")) OP_REQUIRES_OK(ctx, ctx->GetAttr("has_scale", &has_scale_));
    if (ctx->HasAttr("has_offset"))
      OP_REQUIRES_OK(ctx, ctx->GetAttr("has_offset", &has_offset_));
    OP_REQUIRES_OK(ctx, ReadEpilogueAttrs(ctx, &activation_, &has_residual_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, MakeView(ctx, 0, axis_, &v));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 1, "scale", !has_scale_, v));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 2, "offset", !has_offset_, v));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 3, "mean", training_, v));
    OP_REQUIRES_OK(ctx, CheckVector(ctx, 4, "variance", training_, v));
    if (has_residual_) OP_REQUIRES_OK(ctx, CheckLikeX(ctx, 5, "residual", v));

    xla::XlaBuilder* b = ctx->builder();
    const xla::PrimitiveType T = ctx->input_xla_type(0), U = ctx->input_xla_type(1);
    const int64_t C = v.channels;
    const xla::XlaOp x = ctx->Input(0);

    xla::XlaOp hi, lo, var_d, batch_variance;  // var_d: the variance in float64
    if (training_) {
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
      hi = ctx->Input(3);
      lo = xla::Broadcast(xla::Zero(b, U), {C});
      batch_variance = ctx->Input(4);
      var_d = xla::ConvertElementType(batch_variance, xla::F64);
    }
    // a = rsqrt(var + eps) * scale, computed in float64 and rounded once (as the CPU kernel).
    const xla::XlaOp inv_std = InverseStd(var_d, epsilon_);
    const xla::XlaOp a =
        xla::ConvertElementType(xla::Mul(inv_std, VectorOr(ctx, 1, 1.0, xla::F64, C)), U);
    const xla::XlaOp offset = VectorOr(ctx, 2, 0.0, U, C);

    const xla::XlaOp x3 = To3d(x, v, U);
    xla::XlaOp z = xla::Add(
        xla::Mul(Centred(x3, hi, lo, v), PerChannel(a, v)),
        PerChannel(offset, v));
    if (has_residual_) z = xla::Add(z, To3d(ctx->Input(5), v, U));
    ctx->SetOutput(0, FromView(Activate(z, activation_), v, T));
    ctx->SetOutput(1, hi);
    ctx->SetOutput(2, batch_variance);
    ctx->SetOutput(3, lo);
  }

 private:
  float epsilon_ = 1e-3f;
  int axis_ = -1;
  bool training_ = true;
  bool has_scale_ = false;
  bool has_offset_ = false;
  Activation activation_ = Activation::kIdentity;
  bool has_residual_ = false;
};

// No device or type constraint: every XLA backend (CPU_XLA_JIT, GPU_XLA_JIT) gets it, for
// the T/U pairs the op definition allows.
TFBN_REGISTER_XLA_OP("TfbnBatchNorm", BatchNormXlaOp);

}  // namespace
}  // namespace tfbn
