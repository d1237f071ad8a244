// Argument checks shared by the shape functions (graph construction), the kernels (run
// time) and the XLA lowerings (compile time), so all report the same message naming the
// argument and its values.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/batch_norm.h"
#include "tensorflow/core/framework/types.pb.h"

namespace tfbn {

inline absl::Status CheckEpsilon(float epsilon) {
  if (epsilon > 0.0f && std::isfinite(epsilon)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("tfbn: epsilon must be positive and finite, got epsilon = ", epsilon));
}

// axis in [-rank, rank) -> [0, rank).
inline absl::Status ResolveAxis(int axis, int rank, const std::string& shape, int* resolved) {
  if (rank < 2)
    return absl::InvalidArgumentError(
        absl::StrCat("tfbn: x must have rank >= 2 (batch and channel dimensions), got rank ", rank,
                     " with shape ", shape));
  if (axis < -rank || axis >= rank)
    return absl::InvalidArgumentError(absl::StrCat(
        "tfbn: axis = ", axis, " is out of range for x of rank ", rank, " (shape ", shape, ")"));
  *resolved = axis < 0 ? axis + rank : axis;
  return absl::OkStatus();
}

// Per-channel vectors (scale, offset, mean, ...) must be 1-D of length C; where
// allow_empty, length 0 also passes (the argument is unused or means zero).
inline absl::Status CheckChannelVector(const char* name, int rank, int64_t length, int64_t channels,
                                       bool allow_empty, int axis, const std::string& x_shape) {
  const bool ok = rank == 1 && (length == channels || (allow_empty && length == 0) || length < 0 ||
                                channels < 0);
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("tfbn: ", name, " must be a vector of length C = ", channels, " (x has shape ",
                   x_shape, ", channel axis ", axis, "), got ", rank == 1 ? "length " : "rank ",
                   rank == 1 ? length : rank));
}

// An input that must have x's shape (dy) does not.
inline absl::Status ShapeMismatch(const char* name, const std::string& shape,
                                  const std::string& x_shape) {
  return absl::InvalidArgumentError(
      absl::StrCat("tfbn: ", name, " has shape ", shape, " but x has shape ", x_shape));
}

// The epilogue's residual has x's shape where has_residual, else it is empty [0]; this is
// the message for one that is neither.
inline absl::Status ResidualShapeError(bool has_residual, const std::string& residual_shape,
                                       const std::string& x_shape) {
  if (!has_residual)
    return absl::InvalidArgumentError(
        absl::StrCat("tfbn: residual must be empty ([0]) where has_residual is false, got shape ",
                     residual_shape));
  return absl::InvalidArgumentError(absl::StrCat("tfbn: residual must have the shape of x ",
                                                 x_shape, ", got residual of shape ",
                                                 residual_shape));
}

// A [rows, C] float64 matrix of gradient sums, rows one of `allowed_rows`. rank, rows,
// cols and channels are -1 where unknown.
inline absl::Status CheckSumsMatrix(const char* name, int rank, int64_t rows, int64_t cols,
                                    std::initializer_list<int64_t> allowed_rows, int64_t channels,
                                    const std::string& shape) {
  bool rows_ok = rows < 0;
  for (int64_t want : allowed_rows) rows_ok = rows_ok || rows == want;
  const bool cols_ok = cols < 0 || channels < 0 || cols == channels;
  if (rank < 0 || (rank == 2 && rows_ok && cols_ok)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "tfbn: ", name, " must be a [", absl::StrJoin(allowed_rows, " or "), ", C = ",
      channels < 0 ? std::string("?") : absl::StrCat(channels), "] matrix, got shape ", shape));
}

// The merge's partials: [parts, kPartialRows, C] or [kPartialRows * parts, C]. rank is -1
// where unknown; rows (dimension rank - 2) -1 where unknown.
inline absl::Status CheckPartials(int rank, int64_t rows, const std::string& shape) {
  if (rank < 0) return absl::OkStatus();
  const bool ok = (rank == 3 && (rows < 0 || rows == kPartialRows)) ||
                  (rank == 2 && (rows < 0 || rows % kPartialRows == 0));
  if (!ok)
    return absl::InvalidArgumentError(
        absl::StrCat("tfbn: partials must be [parts, ", kPartialRows, ", C] or [", kPartialRows,
                     " * parts, C] (rows count, mean, M2), got shape ", shape));
  return absl::OkStatus();
}

inline const char* DtypeName(tensorflow::DataType t) {
  switch (t) {
    case tensorflow::DT_HALF:
      return "float16";
    case tensorflow::DT_BFLOAT16:
      return "bfloat16";
    case tensorflow::DT_FLOAT:
      return "float32";
    case tensorflow::DT_DOUBLE:
      return "float64";
    default:
      return "unsupported";
  }
}

// Statistics and parameters are float32 for half/bfloat16/float32 x, float64 for float64 x.
inline absl::Status CheckParamDtype(tensorflow::DataType t, tensorflow::DataType u) {
  const tensorflow::DataType want =
      t == tensorflow::DT_DOUBLE ? tensorflow::DT_DOUBLE : tensorflow::DT_FLOAT;
  if (u == want) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tfbn: scale, offset, mean and variance must be ",
                                                 DtypeName(want), " for x of dtype ", DtypeName(t),
                                                 ", got ", DtypeName(u)));
}

}  // namespace tfbn
