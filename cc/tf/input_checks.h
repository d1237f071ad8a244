// Runs an op's input checks (op_signatures.h) where every shape is known: in the OpKernels
// (op_kernel_base.h) and the XLA lowerings (xla_view.h). The shape functions run the same
// list on partly known shapes (shape_fns.h).
#pragma once

#include <vector>

#include "tensorflow/core/framework/tensor_shape.h"
#include "tf/op_signatures.h"
#include "tf/validation.h"
#include "tf/weights.h"

namespace tfbn {

// shape_of(input) gives an input's TensorShape. Checks dy (gradient ops) against x, x's
// rank and axis, then every input of Io::Checks; *axis receives the resolved axis.
template <typename Io, typename ShapeOf>
absl::Status CheckInputs(const OpAttrs& attrs, const ShapeOf& shape_of, int* axis) {
  const tensorflow::TensorShape x = shape_of(Io::kX);
  const std::string x_text = x.DebugString();
  if constexpr (Io::kHasDy) {
    const tensorflow::TensorShape dy = shape_of(Io::kDy);
    if (dy != x) return ShapeMismatch(Io::kInputs[Io::kDy], dy.DebugString(), x_text);
  }
  TF_RETURN_IF_ERROR(ResolveAxis(attrs.axis, x.dims(), x_text, axis));
  const int64_t channels = x.dim_size(*axis);
  for (const InputCheck& check : Io::Checks(attrs)) {
    const tensorflow::TensorShape s = shape_of(check.input);
    const char* name = Io::kInputs[check.input];
    const bool is_matrix = s.dims() == 2;
    switch (check.kind) {
      case InputCheck::kVector:
      case InputCheck::kVectorOrEmpty:
        TF_RETURN_IF_ERROR(CheckChannelVector(name, s.dims(), s.dims() == 1 ? s.dim_size(0) : -1,
                                              channels, check.kind == InputCheck::kVectorOrEmpty,
                                              *axis, x_text));
        break;
      case InputCheck::kResidual:
        if (attrs.has_residual ? s != x : !(s.dims() == 1 && s.dim_size(0) == 0))
          return ResidualShapeError(attrs.has_residual, s.DebugString(), x_text);
        break;
      case InputCheck::kSums:
      case InputCheck::kGlobalSums:
        TF_RETURN_IF_ERROR(CheckSumsMatrix(
            name, s.dims(), is_matrix ? s.dim_size(0) : -1, is_matrix ? s.dim_size(1) : -1,
            check.kind == InputCheck::kSums
                ? std::initializer_list<int64_t>{kGradSumRows}
                : std::initializer_list<int64_t>{kGradSumRows, kGradSumRowsWithStats},
            channels, s.DebugString()));
        break;
      case InputCheck::kWeights: {
        const auto x_dims = x.dim_sizes();
        const auto w_dims = s.dim_sizes();
        bool weighted;
        TF_RETURN_IF_ERROR(CheckWeightsShape({x_dims.begin(), x_dims.end()}, *axis, s.dims(),
                                             {w_dims.begin(), w_dims.end()}, &weighted));
        break;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace tfbn
