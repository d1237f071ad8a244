// Argument checks shared by the shape functions (graph construction) and the kernels
// (run time), so both report the same message naming the argument and its values.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
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
    return absl::InvalidArgumentError(absl::StrCat(
        "tfbn: x must have rank >= 2 (batch and channel dimensions), got rank ", rank,
        " with shape ", shape));
  if (axis < -rank || axis >= rank)
    return absl::InvalidArgumentError(absl::StrCat("tfbn: axis = ", axis,
                                                   " is out of range for x of rank ", rank,
                                                   " (shape ", shape, ")"));
  *resolved = axis < 0 ? axis + rank : axis;
  return absl::OkStatus();
}

// Per-channel vectors (scale, offset, mean, ...) must be 1-D of length C; where
// allow_empty, length 0 also passes (the argument is unused or means zero).
inline absl::Status CheckChannelVector(const char* name, int rank, int64_t length,
                                       int64_t channels, bool allow_empty, int axis,
                                       const std::string& x_shape) {
  const bool ok = rank == 1 && (length == channels || (allow_empty && length == 0) ||
                                length < 0 || channels < 0);
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "tfbn: ", name, " must be a vector of length C = ", channels, " (x has shape ", x_shape,
      ", channel axis ", axis, "), got ", rank == 1 ? "length " : "rank ",
      rank == 1 ? length : rank));
}

inline const char* DtypeName(tensorflow::DataType t) {
  switch (t) {
    case tensorflow::DT_HALF: return "float16";
    case tensorflow::DT_BFLOAT16: return "bfloat16";
    case tensorflow::DT_FLOAT: return "float32";
    case tensorflow::DT_DOUBLE: return "float64";
    default: return "unsupported";
  }
}

// Statistics and parameters are float32 for half/bfloat16/float32 x, float64 for float64 x.
inline absl::Status CheckParamDtype(tensorflow::DataType t, tensorflow::DataType u) {
  const tensorflow::DataType want =
      t == tensorflow::DT_DOUBLE ? tensorflow::DT_DOUBLE : tensorflow::DT_FLOAT;
  if (u == want) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "tfbn: scale, offset, mean and variance must be ", DtypeName(want), " for x of dtype ",
      DtypeName(t), ", got ", DtypeName(u)));
}

}  // namespace tfbn
