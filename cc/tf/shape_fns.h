// What the shape functions of every tfbn op share (ops.cc, split_ops.cc): the attribute
// checks and the op's input checks (op_signatures.h), with the messages of validation.h
// that the kernels and the XLA lowerings report too.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <vector>

#include "tensorflow/core/framework/shape_inference.h"
#include "tf/op_attrs.h"
#include "tf/op_signatures.h"
#include "tf/validation.h"
#include "tf/weights.h"

namespace tfbn {

// Op Io's attributes and input checks (op_signatures.h), run on the shapes known while
// the graph is built; C is merged from every input that has it.
template <typename Io>
class ShapeChecker {
 public:
  using Input = typename Io::Input;
  using InferenceContext = tensorflow::shape_inference::InferenceContext;
  using ShapeHandle = tensorflow::shape_inference::ShapeHandle;
  using DimensionHandle = tensorflow::shape_inference::DimensionHandle;

  explicit ShapeChecker(InferenceContext* c) : c_(c) {}

  // Reads and checks the attributes, then dy against x (gradient ops), x's rank and axis,
  // and every input of Io::Checks.
  absl::Status Run() {
    TF_RETURN_IF_ERROR(ReadOpAttrs(c_, &attrs_));
    if constexpr (Io::kHasDy)
      TF_RETURN_IF_ERROR(SetDyAndX(Io::kDy, Io::kX));
    else
      TF_RETURN_IF_ERROR(SetXShape(c_->input(Io::kX)));
    for (const InputCheck& check : Io::Checks(attrs_)) {
      const Input index = static_cast<Input>(check.input);
      switch (check.kind) {
        case InputCheck::kVector:
        case InputCheck::kVectorOrEmpty:
          TF_RETURN_IF_ERROR(Vector(index, check.kind == InputCheck::kVectorOrEmpty));
          break;
        case InputCheck::kResidual:
          TF_RETURN_IF_ERROR(Residual(index));
          break;
        case InputCheck::kSums:
          TF_RETURN_IF_ERROR(SumsMatrix(index, {kGradSumRows}));
          break;
        case InputCheck::kGlobalSums:
          TF_RETURN_IF_ERROR(SumsMatrix(index, {kGradSumRows, kGradSumRowsWithStats}));
          break;
        case InputCheck::kWeights:
          TF_RETURN_IF_ERROR(Weights(index));
          break;
      }
    }
    return absl::OkStatus();
  }

  // Sets every output's shape (Io::kOutputShapes).
  void SetOutputs() {
    int index = 0;
    for (OutputShape shape : Io::kOutputShapes) c_->set_output(index++, Shape(shape));
  }

 private:
  ShapeHandle Shape(OutputShape shape) const {
    switch (shape) {
      case OutputShape::kLikeX:
        return x_;
      case OutputShape::kChannelVector:
        return c_->Vector(channels_);
      case OutputShape::kPartials:
        return c_->Matrix(kPartialRows, channels_);
      case OutputShape::kSums:
        return c_->Matrix(kGradSumRows, channels_);
      case OutputShape::kLikeXIfResidual:
        return attrs_.has_residual ? x_ : c_->Vector(0);
    }
    return c_->UnknownShape();
  }

  // The gradient ops: dy and x have one shape, which is x's.
  absl::Status SetDyAndX(Input dy, Input x) {
    ShapeHandle merged;
    if (!c_->Merge(c_->input(dy), c_->input(x), &merged).ok())
      return ShapeMismatch(Io::kInputs[dy], c_->DebugString(c_->input(dy)),
                           c_->DebugString(c_->input(x)));
    return SetXShape(merged);
  }

  // A per-channel vector of length C (or empty, where allow_empty); merges its length
  // into C.
  absl::Status Vector(Input index, bool allow_empty) {
    ShapeHandle v = c_->input(index);
    if (!c_->RankKnown(v)) return absl::OkStatus();
    const int rank = c_->Rank(v);
    const int64_t length = rank == 1 ? c_->Value(c_->Dim(v, 0)) : -1;
    TF_RETURN_IF_ERROR(CheckChannelVector(Io::kInputs[index], rank, length, c_->Value(channels_),
                                          allow_empty, axis_, c_->DebugString(x_)));
    if (allow_empty && length == 0) return absl::OkStatus();
    return c_->Merge(channels_, c_->Dim(v, 0), &channels_);
  }

  // The epilogue's residual: x's shape where has_residual, else empty [0].
  absl::Status Residual(Input index) {
    const bool has_residual = attrs_.has_residual;
    ShapeHandle residual = c_->input(index);
    ShapeHandle merged;
    const bool ok = has_residual
                        ? c_->Merge(x_, residual, &merged).ok()
                        : !c_->RankKnown(residual) ||
                              (c_->Rank(residual) == 1 && c_->Value(c_->Dim(residual, 0)) <= 0);
    if (ok) return absl::OkStatus();
    return ResidualShapeError(has_residual, c_->DebugString(residual), c_->DebugString(x_));
  }

  // A [rows, C] float64 matrix of gradient sums; merges its C.
  absl::Status SumsMatrix(Input index, std::initializer_list<int64_t> allowed_rows) {
    ShapeHandle m = c_->input(index);
    const int rank = c_->RankKnown(m) ? c_->Rank(m) : -1;
    const int64_t rows = rank == 2 ? c_->Value(c_->Dim(m, 0)) : -1;
    const int64_t cols = rank == 2 ? c_->Value(c_->Dim(m, 1)) : -1;
    TF_RETURN_IF_ERROR(CheckSumsMatrix(Io::kInputs[index], rank, rows, cols, allowed_rows,
                                       c_->Value(channels_), c_->DebugString(m)));
    if (rank != 2) return absl::OkStatus();
    return c_->Merge(channels_, c_->Dim(m, 1), &channels_);
  }

  // The weights (weights.h), checked where x's rank is known.
  absl::Status Weights(Input index) {
    ShapeHandle w = c_->input(index);
    if (!c_->RankKnown(x_)) return absl::OkStatus();
    std::vector<int64_t> x_dims, w_dims;
    for (int d = 0; d < c_->Rank(x_); ++d) x_dims.push_back(c_->Value(c_->Dim(x_, d)));
    const int w_rank = c_->RankKnown(w) ? c_->Rank(w) : -1;
    for (int d = 0; d < w_rank; ++d) w_dims.push_back(c_->Value(c_->Dim(w, d)));
    bool weighted;
    return CheckWeightsShape(x_dims, axis_, w_rank, w_dims, &weighted);
  }

  absl::Status SetXShape(ShapeHandle x) {
    x_ = x;
    TF_RETURN_IF_ERROR(c_->GetAttr("axis", &axis_));
    channels_ = c_->UnknownDim();
    if (!c_->RankKnown(x)) return absl::OkStatus();
    TF_RETURN_IF_ERROR(ResolveAxis(axis_, c_->Rank(x), c_->DebugString(x), &axis_));
    channels_ = c_->Dim(x, axis_);
    return absl::OkStatus();
  }

  InferenceContext* c_;
  OpAttrs attrs_;
  ShapeHandle x_;
  DimensionHandle channels_;
  int axis_ = -1;
};

// The shape function of every op with an x: its checks, then its outputs' shapes.
template <typename Io>
absl::Status ShapeFn(tensorflow::shape_inference::InferenceContext* c) {
  static_assert(std::size(Io::kOutputShapes) == std::size(Io::kOutputs));
  ShapeChecker<Io> check(c);
  TF_RETURN_IF_ERROR(check.Run());
  check.SetOutputs();
  return absl::OkStatus();
}

}  // namespace tfbn
