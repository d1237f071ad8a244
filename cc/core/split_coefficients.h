// The per-channel coefficients of the split gradient's apply step, shared by
// ApplyGradWithSums (batch_norm_split.cc) and its weighted form (batch_norm_weighted.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "core/batch_norm.h"
#include "core/batch_norm_math.h"

namespace tfbn {

// dx = ga * dy + gb * ((x - hi) - lo) + gc, with the mean's low part lo.
template <typename U>
struct SplitGradCoefficients {
  std::vector<U> lo, ga, gb, gc;
};

// Writes this slice's dscale and doffset (from local_sums [2][C]) and returns ga, gb, gc
// from the sums over every slice (global_sums [global_rows][C], rows 2 and 3 the gradients
// reaching the batch mean and variance) and count[c] * count_scale elements (or weight) per
// channel; gb = gc = 0 where that is 0.
template <typename U>
SplitGradCoefficients<U> SplitGradCoefficientsFromSums(
    const Layout& layout, const U* scale, const U* mean_lo, const U* variance,
    const double* local_sums, const double* global_sums, int64_t global_rows, const double* count,
    double count_scale, float epsilon, U* dscale, U* doffset) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(epsilon);
  const bool empty = layout.per_channel() == 0;
  SplitGradCoefficients<U> k{std::vector<U>(C), std::vector<U>(C), std::vector<U>(C),
                             std::vector<U>(C)};
  for (int64_t c = 0; c < C; ++c) {
    k.lo[c] = mean_lo ? mean_lo[c] : U(0);
    const double r = InverseStd(static_cast<double>(variance[c]), eps);
    const double s = scale ? static_cast<double>(scale[c]) : 1.0;
    doffset[c] = static_cast<U>(local_sums[c]);
    dscale[c] = empty ? U(0) : static_cast<U>(r * local_sums[C + c]);
    const double m = count[c] * count_scale;
    const double dmu = global_rows == 4 ? global_sums[2 * C + c] : 0.0;
    const double dvar = global_rows == 4 ? global_sums[3 * C + c] : 0.0;
    const auto g = TrainingGradCoefficients(s, r, global_sums[c], global_sums[C + c], dmu, dvar, m);
    k.ga[c] = static_cast<U>(g.ga);
    k.gb[c] = m > 0.0 ? static_cast<U>(g.gb) : U(0);
    k.gc[c] = m > 0.0 ? static_cast<U>(g.gc) : U(0);
  }
  return k;
}

}  // namespace tfbn
