// The `weights` input of TfbnBatchNormStats / TfbnBatchNormGradApply: empty [0] (every
// element weighs 1) or x's shape without the channel axis (one weight per position,
// shared by all channels; for axis = -1 that is Keras' mask shape). One check for the
// shape functions and the kernels, so both report the same message.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tfbn {

// Dimensions are -1 where unknown; weights_rank is -1 where unknown. *weighted says
// whether the weights are used (false for the empty [0] form).
inline absl::Status CheckWeightsShape(const std::vector<int64_t>& x_dims, int axis,
                                      int weights_rank, const std::vector<int64_t>& weights_dims,
                                      bool* weighted) {
  *weighted = true;
  if (weights_rank < 0) return absl::OkStatus();
  std::vector<int64_t> want;
  for (int d = 0; d < static_cast<int>(x_dims.size()); ++d)
    if (d != axis) want.push_back(x_dims[d]);
  if (weights_rank == 1 && weights_dims[0] == 0) {
    *weighted = false;  // the empty form (where x has no position it means the same)
    return absl::OkStatus();
  }
  bool match = weights_rank == static_cast<int>(want.size());
  for (int d = 0; match && d < weights_rank; ++d)
    match = weights_dims[d] < 0 || want[d] < 0 || weights_dims[d] == want[d];
  // A vector of unknown length may still turn out empty when the op runs.
  if (match || (weights_rank == 1 && weights_dims[0] < 0)) return absl::OkStatus();
  auto dims = [](const std::vector<int64_t>& v) {
    std::vector<std::string> s;
    for (int64_t d : v) s.push_back(d < 0 ? "?" : absl::StrCat(d));
    return absl::StrCat("[", absl::StrJoin(s, ","), "]");
  };
  return absl::InvalidArgumentError(absl::StrCat(
      "tfbn: weights must have shape ", dims(want), " (x's shape ", dims(x_dims),
      " without the channel axis ", axis, ") or be empty [0], got shape ", dims(weights_dims)));
}

}  // namespace tfbn
