// XLA lowerings of the split op family's forward pieces: TfbnBatchNormStats (optionally
// weighted), TfbnBatchNormMergeStats, TfbnBatchNormApply. Restate PartialMoments,
// MergeMoments + FinalizeMoments and ApplyStatistics of cc/core in HLO; see xla_view.h.
#include "tensorflow/compiler/tf2xla/type_util.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tf/xla_registration.h"
#include "tf/xla_view.h"
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/constants.h"

namespace tfbn {
namespace {

using tensorflow::OpKernelConstruction;
using tensorflow::XlaOpKernelContext;

class StatsXlaOp : public TfbnXlaOpKernel<StatsIo> {
 public:
  using TfbnXlaOpKernel::TfbnXlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &v));
    xla::XlaBuilder* b = ctx->builder();
    const int64_t C = v.channels;
    const xla::XlaOp zeros = xla::Broadcast(xla::Zero(b, xla::F64), {C});
    xla::XlaOp count, mean, m2;
    if (v.per_channel() == 0) {  // an empty slice contributes nothing: 0, 0, 0
      count = mean = m2 = zeros;
    } else if (HasInput(ctx, In::kWeights)) {
      // Weighted: count = sum w, mean = sum w*x / count, M2 = sum w*(x - mean)^2; a slice
      // whose weights sum to zero contributes 0, 0, 0.
      const xla::XlaOp w2 = Weights2d(ctx, In::kWeights, v, xla::F64);
      const xla::XlaOp w3 = xla::BroadcastInDim(w2, v.dims(), {0, 2});
      const xla::XlaOp total = xla::Reduce(w2, xla::Zero(b, xla::F64),
                                           xla::CreateScalarAddComputation(xla::F64, b), {0, 1});
      const xla::XlaOp x3 = To3d(ctx->Input(In::kX), v, xla::F64);
      count = xla::Broadcast(total, {C});
      const xla::XlaOp some = xla::Gt(count, zeros);
      mean = xla::Select(some, xla::Div(SumPerChannel(xla::Mul(w3, x3)), count), zeros);
      const xla::XlaOp xc = xla::Sub(x3, PerChannel(mean, v));
      m2 = xla::Select(some, SumPerChannel(xla::Mul(w3, xla::Mul(xc, xc))), zeros);
    } else {
      const xla::XlaOp x3 = To3d(ctx->Input(In::kX), v, xla::F64);
      count = xla::Broadcast(Scalar(b, xla::F64, static_cast<double>(v.per_channel())), {C});
      mean = xla::Div(SumPerChannel(x3), count);
      const xla::XlaOp xc = xla::Sub(x3, PerChannel(mean, v));
      m2 = SumPerChannel(xla::Mul(xc, xc));
    }
    ctx->SetOutput(
        In::kPartial,
        xla::ConcatInDim(
            b, {xla::Reshape(count, {1, C}), xla::Reshape(mean, {1, C}), xla::Reshape(m2, {1, C})},
            0));
  }
};

class MergeStatsXlaOp : public TfbnXlaOpKernel<MergeStatsIo> {
 public:
  explicit MergeStatsXlaOp(OpKernelConstruction* ctx) : TfbnXlaOpKernel(ctx) {
    tensorflow::DataType u;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("U", &u));
    OP_REQUIRES_OK(ctx, tensorflow::DataTypeToPrimitiveType(u, &u_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    tensorflow::TensorShape shape;
    OP_REQUIRES_OK(ctx, InputShape(ctx, In::kPartials, &shape));
    const int rank = shape.dims();
    OP_REQUIRES_OK(
        ctx, CheckPartials(rank, rank >= 2 ? shape.dim_size(rank - 2) : -1, shape.DebugString()));
    const int64_t C = shape.dim_size(rank - 1);
    const int64_t parts = rank == 3 ? shape.dim_size(0) : shape.dim_size(0) / kPartialRows;
    xla::XlaBuilder* b = ctx->builder();
    const xla::XlaOp p = xla::Reshape(ctx->Input(In::kPartials), {parts, kPartialRows, C});
    auto row = [&](int64_t part, int64_t r) {
      return xla::Reshape(xla::Slice(p, {part, r, 0}, {part + 1, r + 1, C}, {1, 1, 1}), {C});
    };
    const xla::XlaOp zeros = xla::Broadcast(xla::Zero(b, xla::F64), {C});
    xla::XlaOp n = zeros, mean = zeros, m2 = zeros;
    // Chan's pairwise update in part order (parts is static: the loop unrolls), skipping
    // empty parts; the first non-empty part is taken as is.
    for (int64_t k = 0; k < parts; ++k) {
      const xla::XlaOp nb = row(k, 0), mb = row(k, 1), m2b = row(k, 2);
      const xla::XlaOp take = xla::Gt(nb, zeros);
      const xla::XlaOp first = xla::And(take, xla::Eq(n, zeros));
      const xla::XlaOp total = xla::Add(n, nb);
      const xla::XlaOp delta = xla::Sub(mb, mean);
      const xla::XlaOp merged_mean = xla::Add(mean, xla::Mul(delta, xla::Div(nb, total)));
      const xla::XlaOp merged_m2 = xla::Add(
          m2, xla::Add(m2b, xla::Mul(xla::Mul(delta, delta), xla::Div(xla::Mul(n, nb), total))));
      mean = xla::Select(take, xla::Select(first, mb, merged_mean), mean);
      m2 = xla::Select(take, xla::Select(first, m2b, merged_m2), m2);
      n = xla::Select(take, xla::Select(first, nb, total), n);
    }
    const xla::XlaOp some = xla::Gt(n, zeros);
    const xla::XlaOp nan = xla::Broadcast(xla::NanValue(b, xla::F64), {C});
    const xla::XlaOp mu = xla::Select(some, mean, nan);
    const xla::XlaOp hi = xla::ConvertElementType(mu, u_);
    ctx->SetOutput(In::kMean, hi);
    ctx->SetOutput(In::kVariance,
                   xla::ConvertElementType(xla::Select(some, xla::Div(m2, n), nan), u_));
    ctx->SetOutput(In::kMeanLo, xla::ConvertElementType(
                                    xla::Sub(mu, xla::ConvertElementType(hi, xla::F64)), u_));
    ctx->SetOutput(In::kCount, n);
  }

 private:
  xla::PrimitiveType u_ = xla::F32;
};

class ApplyXlaOp : public TfbnXlaOpKernel<ApplyIo> {
 public:
  using TfbnXlaOpKernel::TfbnXlaOpKernel;

  void Compile(XlaOpKernelContext* ctx) override {
    XlaView v;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &v));
    const xla::PrimitiveType T = ctx->input_xla_type(In::kX);
    const xla::PrimitiveType U = ctx->input_xla_type(In::kMean);
    const int64_t C = v.channels;
    const xla::XlaOp inv_std = InverseStd(
        xla::ConvertElementType(ctx->Input(In::kVariance), xla::F64), attrs_.args.epsilon);
    const xla::XlaOp a =
        xla::ConvertElementType(xla::Mul(inv_std, VectorOr(ctx, In::kScale, 1.0, xla::F64, C)), U);
    const xla::XlaOp x3 = To3d(ctx->Input(In::kX), v, U);
    const xla::XlaOp centred =
        Centred(x3, ctx->Input(In::kMean), VectorOr(ctx, In::kMeanLo, 0.0, U, C), v);
    const xla::XlaOp y = xla::Add(xla::Mul(centred, PerChannel(a, v)),
                                  PerChannel(VectorOr(ctx, In::kOffset, 0.0, U, C), v));
    ctx->SetOutput(In::kY, FromView(y, v, T));
  }
};

TFBN_REGISTER_XLA_OP("TfbnBatchNormStats", StatsXlaOp);
TFBN_REGISTER_XLA_OP("TfbnBatchNormMergeStats", MergeStatsXlaOp);
TFBN_REGISTER_XLA_OP("TfbnBatchNormApply", ApplyXlaOp);

}  // namespace
}  // namespace tfbn
