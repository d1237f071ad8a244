// The OpKernels of TfbnBatchNorm and TfbnBatchNormGrad, one body for every device: check
// the inputs, allocate the outputs, gather the tensors' data, then hand them to the
// device's Launcher, a policy with
//   static absl::Status Forward(OpKernelContext*, const Layout&, const ForwardData<T, U>&,
//                               const ForwardArgs&);
//   static absl::Status Backward(OpKernelContext*, const Layout&,
//                                const BackwardData<T, U>&, const ForwardArgs&);
//   static constexpr bool kDxMayTakeX;  // whether dx may take over x's buffer
//   // Whether, with an epilogue (an activation or a residual), y, dx and dresidual may
//   // take over the buffers of x, dy or the residual (without one: y over x, dx over dy).
//   static constexpr bool kEpilogueOutputsMayTakeInputs;
// (CpuLauncher in batch_norm_kernels.cc, GpuLauncher in batch_norm_kernels_gpu.cc).
#pragma once

#include <initializer_list>
#include <type_traits>
#include <vector>

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/large_outputs.h"
#include "tf/op_kernel_base.h"

namespace tfbn {

// Whether the launcher receives an epilogue: an activation, or a residual (the gradient
// passes none where dresidual is dy itself).
inline bool HasEpilogue(const ForwardArgs& args, bool residual_given) {
  return args.activation != Activation::kIdentity || residual_given;
}

// The forward's tensors as the core takes them (nullptr: not given).
template <typename T, typename U>
struct ForwardData {
  const T* x;
  const U *scale, *offset, *mean, *variance;
  const T* residual;
  T* y;
  U *batch_mean, *batch_variance, *mean_lo;
};

// The gradient's tensors as the core takes them (nullptr: not given, or not wanted).
template <typename T, typename U>
struct BackwardData {
  const T *dy, *x;
  const U *scale, *offset, *mean, *variance, *mean_lo;
  const T* residual;
  const U *d_batch_mean, *d_batch_variance;
  T *dx, *dresidual;
  U *dscale, *doffset;
};

template <typename Launcher, typename T, typename U>
class BatchNormOp : public TfbnOpKernel<BatchNormIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout));
    // y may take over x's or the residual's buffer: every element is read before it is
    // written.
    tensorflow::Tensor *y, *batch_mean, *batch_variance, *mean_lo;
    const tensorflow::TensorShape channels({layout.channels});
    std::vector<int> candidates;
    if (Launcher::kEpilogueOutputsMayTakeInputs || !HasEpilogue(attrs_.args, attrs_.has_residual)) {
      candidates.push_back(In::kX);
      if (attrs_.has_residual) candidates.push_back(In::kResidual);
    }
    OP_REQUIRES_OK(ctx,
                   ForwardOrAllocateLarge(ctx, candidates, In::kY, Get(ctx, In::kX).shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kBatchMean, channels, &batch_mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kBatchVariance, channels, &batch_variance));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kMeanLo, channels, &mean_lo));
    const ForwardData<T, U> data{Data<T>(ctx, In::kX),
                                 DataOrNull<U>(ctx, In::kScale),
                                 DataOrNull<U>(ctx, In::kOffset),
                                 DataOrNull<U>(ctx, In::kMean),
                                 DataOrNull<U>(ctx, In::kVariance),
                                 attrs_.has_residual ? Data<T>(ctx, In::kResidual) : nullptr,
                                 y->flat<T>().data(),
                                 batch_mean->flat<U>().data(),
                                 batch_variance->flat<U>().data(),
                                 mean_lo->flat<U>().data()};
    OP_REQUIRES_OK(ctx, Launcher::Forward(ctx, layout, data, attrs_.args));
  }
};

template <typename Launcher, typename T, typename U>
class BatchNormGradOp : public TfbnOpKernel<BatchNormGradIo> {
 public:
  using TfbnOpKernel::TfbnOpKernel;

  void Compute(tensorflow::OpKernelContext* ctx) override {
    const tensorflow::Tensor& dy = Get(ctx, In::kDy);
    const tensorflow::Tensor& x = Get(ctx, In::kX);
    Layout layout;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &layout));
    const bool has_residual = attrs_.has_residual;
    // With identity, dresidual is dy itself (dz = dy): the output shares dy's buffer, so dx
    // must not take it over.
    const bool dresidual_is_dy = has_residual && attrs_.args.activation == Activation::kIdentity;
    const bool residual_in = has_residual && !dresidual_is_dy;
    // Without the launcher's leave, an epilogue's outputs get buffers of their own.
    const bool may_take_inputs =
        Launcher::kEpilogueOutputsMayTakeInputs || !HasEpilogue(attrs_.args, residual_in);
    tensorflow::Tensor *dx, *dscale, *doffset, *dresidual = nullptr;
    // Outputs take over inputs no one else holds (a real network's dy, often x): each
    // element is read before it is written (dresidual by the sums pass over dy and the
    // residual, dx by the last pass over x, dy or dresidual).
    auto allocate_dx = [&](bool may_take_dy) {
      std::vector<int> candidates;
      if (may_take_dy) candidates.push_back(In::kDy);
      if (Launcher::kDxMayTakeX && may_take_inputs) candidates.push_back(In::kX);
      return ForwardOrAllocateLarge(ctx, candidates, In::kDx, x.shape(), &dx);
    };
    if (dresidual_is_dy) {
      OP_REQUIRES_OK(ctx, allocate_dx(false));
      ctx->set_output(In::kDResidual, dy);
    } else if (has_residual) {
      // float16/bfloat16: the last pass reads dy and the residual again (it recomputes dz
      // in float), so dresidual may not take over either of them.
      if (std::is_same_v<T, U> && may_take_inputs)
        OP_REQUIRES_OK(ctx, ForwardOrAllocateLarge(ctx, {In::kDy, In::kResidual}, In::kDResidual,
                                                   x.shape(), &dresidual));
      else
        OP_REQUIRES_OK(ctx, ForwardOrAllocateLarge(ctx, {}, In::kDResidual, x.shape(), &dresidual));
      OP_REQUIRES_OK(ctx, allocate_dx(may_take_inputs && dresidual->data() != dy.data()));
    } else {
      OP_REQUIRES_OK(ctx, allocate_dx(may_take_inputs));
      OP_REQUIRES_OK(
          ctx, ctx->allocate_output(In::kDResidual, tensorflow::TensorShape({0}), &dresidual));
    }
    const tensorflow::TensorShape channels({layout.channels});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kDScale, channels, &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(In::kDOffset, channels, &doffset));
    const BackwardData<T, U> data{dy.flat<T>().data(),
                                  x.flat<T>().data(),
                                  DataOrNull<U>(ctx, In::kScale),
                                  DataOrNull<U>(ctx, In::kOffset),
                                  Data<U>(ctx, In::kMean),
                                  Data<U>(ctx, In::kVariance),
                                  DataOrNull<U>(ctx, In::kMeanLo),
                                  residual_in ? Data<T>(ctx, In::kResidual) : nullptr,
                                  DataOrNull<U>(ctx, In::kDBatchMean),
                                  DataOrNull<U>(ctx, In::kDBatchVariance),
                                  dx->flat<T>().data(),
                                  residual_in ? dresidual->flat<T>().data() : nullptr,
                                  dscale->flat<U>().data(),
                                  doffset->flat<U>().data()};
    OP_REQUIRES_OK(ctx, Launcher::Backward(ctx, layout, data, attrs_.args));
  }
};

}  // namespace tfbn

// The (T, U) pairs the kernels do not take get, on DEVICE too, kernels whose constructor
// names the dtypes (an eager call, or a graph pinned to the device without soft placement,
// would otherwise get "no kernel registered").
#define TFBN_REGISTER_MISMATCHED_PAIR(DEVICE, T, U)                         \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNorm", DEVICE, T, U,                    \
                          ::tfbn::MismatchedDtypesOp<::tfbn::BatchNormIo>); \
  TFBN_REGISTER_KERNEL_TU("TfbnBatchNormGrad", DEVICE, T, U,                \
                          ::tfbn::MismatchedDtypesOp<::tfbn::BatchNormGradIo>);
#define TFBN_REGISTER_MISMATCHED_DTYPES(DEVICE)                         \
  TFBN_REGISTER_MISMATCHED_PAIR(DEVICE, Eigen::half, double)            \
  TFBN_REGISTER_MISMATCHED_PAIR(DEVICE, ::tensorflow::bfloat16, double) \
  TFBN_REGISTER_MISMATCHED_PAIR(DEVICE, float, double)                  \
  TFBN_REGISTER_MISMATCHED_PAIR(DEVICE, double, float)
