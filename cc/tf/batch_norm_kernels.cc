// CPU OpKernels for TfbnBatchNorm and TfbnBatchNormGrad: validate, allocate, call core.
#define EIGEN_USE_THREADS

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/batch_norm_op_base.h"
#include "tf/cpu_parallel.h"

namespace tfbn {
namespace {

using tensorflow::DataTypeToEnum;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

template <typename T, typename U>
class BatchNormOp : public BatchNormOpBase {
 public:
  using BatchNormOpBase::BatchNormOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Layout layout;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, &layout));
    ForwardOutputs out;
    OP_REQUIRES_OK(ctx, AllocateForward(ctx, layout, &out));
    BatchNormForwardEpilogue<T, U>(
        layout, x.flat<T>().data(), DataOrNull<U>(ctx->input(1)), DataOrNull<U>(ctx->input(2)),
        DataOrNull<U>(ctx->input(3)), DataOrNull<U>(ctx->input(4)),
        has_residual_ ? ctx->input(5).flat<T>().data() : nullptr, args_,
        out.y->flat<T>().data(), out.batch_mean->flat<U>().data(),
        out.batch_variance->flat<U>().data(), out.reserve->flat<U>().data(),
        IntraOpParallelFor(ctx));
  }
};

template <typename T, typename U>
class BatchNormGradOp : public BatchNormOpBase {
 public:
  using BatchNormOpBase::BatchNormOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    Layout layout;
    OP_REQUIRES_OK(ctx, PrepareBackward(ctx, &layout));
    Tensor *dx, *dscale, *doffset, *dresidual = nullptr;
    const TensorShape channels({layout.channels});
    // With identity, dresidual is dy itself (dz = dy): the output shares dy's buffer, so dx
    // must not take it over.
    const bool alias_dy = has_residual_ && args_.activation == Activation::kIdentity;
    // Outputs take over inputs no one else holds (a real network's dy, often x): each
    // element is read before it is written (dresidual by the sums pass over dy and the
    // residual, dx by the last pass over x, dy or dresidual).
    if (alias_dy) {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, x.shape(), &dx));
      ctx->set_output(3, dy);
    } else if (has_residual_) {
      // float16/bfloat16: the last pass reads dy and the residual again (it recomputes dz
      // in float), so dresidual may not take over either of them.
      constexpr bool kReadStoredDz = std::is_same_v<T, U>;
      if (kReadStoredDz)
        OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0, 9}, 3, x.shape(),
                                                                  &dresidual));
      else
        OP_REQUIRES_OK(ctx, ctx->allocate_output(3, x.shape(), &dresidual));
      const bool took_dy = dresidual->data() == dy.data();
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                              took_dy ? std::initializer_list<int>{1}
                                      : std::initializer_list<int>{0, 1},
                              0, x.shape(), &dx));
    } else {
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0, 1}, 0, x.shape(), &dx));
      OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({0}), &dresidual));
    }
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, channels, &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, channels, &doffset));
    const bool residual_in = has_residual_ && !alias_dy;
    BatchNormBackwardEpilogue<T, U>(
        layout, dy.flat<T>().data(), x.flat<T>().data(), DataOrNull<U>(ctx->input(2)),
        DataOrNull<U>(ctx->input(8)), residual_in ? ctx->input(9).flat<T>().data() : nullptr,
        ctx->input(3).flat<U>().data(), DataOrNull<U>(ctx->input(5)),
        ctx->input(4).flat<U>().data(), DataOrNull<U>(ctx->input(6)),
        DataOrNull<U>(ctx->input(7)), args_, dx->flat<T>().data(),
        residual_in ? dresidual->flat<T>().data() : nullptr, dscale->flat<U>().data(),
        doffset->flat<U>().data(), IntraOpParallelFor(ctx));
  }
};

#define TFBN_REGISTER_CPU(T, U)                                                  \
  REGISTER_KERNEL_BUILDER(Name("TfbnBatchNorm")                                  \
                              .Device(tensorflow::DEVICE_CPU)                    \
                              .TypeConstraint<T>("T")                            \
                              .TypeConstraint<U>("U"),                           \
                          BatchNormOp<T, U>);                                    \
  REGISTER_KERNEL_BUILDER(Name("TfbnBatchNormGrad")                              \
                              .Device(tensorflow::DEVICE_CPU)                    \
                              .TypeConstraint<T>("T")                            \
                              .TypeConstraint<U>("U"),                           \
                          BatchNormGradOp<T, U>);

TFBN_REGISTER_CPU(Eigen::half, float)
TFBN_REGISTER_CPU(tensorflow::bfloat16, float)
TFBN_REGISTER_CPU(float, float)
TFBN_REGISTER_CPU(double, double)
#undef TFBN_REGISTER_CPU

// The remaining (T, U) pairs are registered only so that eager calls get the
// constructor's message naming the dtypes instead of "no kernel registered".
class MismatchedDtypesOp : public BatchNormOpBase {
 public:
  using BatchNormOpBase::BatchNormOpBase;  // its constructor fails with the message
  void Compute(OpKernelContext*) override {}
};

#define TFBN_REGISTER_MISMATCH(T, U)                                                     \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("TfbnBatchNorm").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T")        \
          .TypeConstraint<U>("U"),                                                       \
      MismatchedDtypesOp);                                                               \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("TfbnBatchNormGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T")    \
          .TypeConstraint<U>("U"),                                                       \
      MismatchedDtypesOp);

TFBN_REGISTER_MISMATCH(Eigen::half, double)
TFBN_REGISTER_MISMATCH(tensorflow::bfloat16, double)
TFBN_REGISTER_MISMATCH(float, double)
TFBN_REGISTER_MISMATCH(double, float)
#undef TFBN_REGISTER_MISMATCH

}  // namespace
}  // namespace tfbn
