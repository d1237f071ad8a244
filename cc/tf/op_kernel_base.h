// The base of every tfbn OpKernel, fused and split, CPU and GPU: attributes, named inputs,
// the op's input checks (input_checks.h) and the [outer, C, inner] view of x.
#pragma once

#include <cstdint>
#include <limits>

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tf/input_checks.h"
#include "tf/op_attrs.h"
#include "tf/op_signatures.h"

namespace tfbn {

inline Layout MakeLayout(const tensorflow::TensorShape& shape, int axis) {
  Layout layout{1, shape.dim_size(axis), 1};
  for (int d = 0; d < axis; ++d) layout.outer *= shape.dim_size(d);
  for (int d = axis + 1; d < shape.dims(); ++d) layout.inner *= shape.dim_size(d);
  return layout;
}

// An empty per-channel tensor stands for "not given" (nullptr) in the core API.
template <typename U>
const U* DataOrNull(const tensorflow::Tensor& t) {
  return t.NumElements() == 0 ? nullptr : t.flat<U>().data();
}

// Io names the op's inputs and outputs (op_signatures.h).
template <typename Io>
class TfbnOpKernel : public WithOpAttrs<tensorflow::OpKernel, Io> {
 public:
  using Input = typename Io::Input;
  using WithOpAttrs<tensorflow::OpKernel, Io>::WithOpAttrs;

 protected:
  static const tensorflow::Tensor& Get(tensorflow::OpKernelContext* ctx, Input index) {
    return ctx->input(index);
  }
  template <typename V>
  static const V* Data(tensorflow::OpKernelContext* ctx, Input index) {
    return ctx->input(index).template flat<V>().data();
  }
  template <typename V>
  static const V* DataOrNull(tensorflow::OpKernelContext* ctx, Input index) {
    return tfbn::DataOrNull<V>(ctx->input(index));
  }

  // Runs the op's input checks (input_checks.h); returns x's layout.
  absl::Status Prepare(tensorflow::OpKernelContext* ctx, Layout* layout) const {
    int axis;
    TF_RETURN_IF_ERROR(CheckInputs<Io>(
        this->attrs_, [ctx](int index) { return ctx->input(index).shape(); }, &axis));
    *layout = MakeLayout(ctx->input(Io::kX).shape(), axis);
    return absl::OkStatus();
  }

  // Prepare for the ops with weights, for weights the host must not read (device memory):
  // *weights is nullptr for their empty form (every element weighs 1), else their data,
  // shape checked only.
  absl::Status PrepareUnreadWeights(tensorflow::OpKernelContext* ctx, Layout* layout,
                                    const float** weights) const {
    TF_RETURN_IF_ERROR(Prepare(ctx, layout));
    const tensorflow::Tensor& w = ctx->input(Io::kWeights);
    const bool empty = w.dims() == 1 && w.dim_size(0) == 0;
    *weights = empty ? nullptr : w.template flat<float>().data();
    return absl::OkStatus();
  }

  // Prepare for the ops with weights in host memory: as PrepareUnreadWeights, and the
  // weights are checked finite and non-negative.
  absl::Status Prepare(tensorflow::OpKernelContext* ctx, Layout* layout,
                       const float** weights) const {
    TF_RETURN_IF_ERROR(PrepareUnreadWeights(ctx, layout, weights));
    if (*weights == nullptr) return absl::OkStatus();
    const auto v = ctx->input(Io::kWeights).template flat<float>();
    for (int64_t k = 0; k < v.size(); ++k)  // one value per position: cheap next to x
      if (!(v(k) >= 0.0f && v(k) <= std::numeric_limits<float>::max()))
        return absl::InvalidArgumentError(
            absl::StrCat("tfbn: weights must be finite and non-negative, got weights[", k,
                         "] = ", v(k), " (flat index)"));
    *weights = v.data();
    return absl::OkStatus();
  }

  // The weighted ops' Prepare for a device: checked on the host where they live there,
  // passed on unread where the host must not read them (device memory; docs/gpu.md).
  template <bool kWeightsOnHost>
  absl::Status PrepareWeights(tensorflow::OpKernelContext* ctx, Layout* layout,
                              const float** weights) const {
    if constexpr (kWeightsOnHost) {
      return Prepare(ctx, layout, weights);
    } else {
      return PrepareUnreadWeights(ctx, layout, weights);
    }
  }
};

// Registered for the (T, U) pairs the kernels do not take, so that an eager call gets the
// constructor's message naming the dtypes instead of "no kernel registered".
template <typename Io>
class MismatchedDtypesOp : public TfbnOpKernel<Io> {
 public:
  using TfbnOpKernel<Io>::TfbnOpKernel;  // its constructor fails with the message
  void Compute(tensorflow::OpKernelContext*) override {}
};

}  // namespace tfbn

// Registers the kernel class given last (commas allowed) for op OP on DEVICE, for type
// attributes T and U.
#define TFBN_REGISTER_KERNEL_TU(OP, DEVICE, T, U, ...)                                     \
  REGISTER_KERNEL_BUILDER(                                                                 \
      Name(OP).Device(::tensorflow::DEVICE).TypeConstraint<T>("T").TypeConstraint<U>("U"), \
      __VA_ARGS__)
