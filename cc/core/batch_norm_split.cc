// The split op family (see batch_norm.h): statistics, merge, apply, and the gradient's
// sums and apply, on the same kernels as the fused op. Synchronized BatchNorm puts one
// collective between the statistics and the apply step in each direction.
#include <cmath>
#include <limits>
#include <vector>

#include "core/batch_norm.h"
#include "core/batch_norm_math.h"
#include "core/instantiate.h"
#include "core/split_coefficients.h"

namespace tfbn {

template <typename T>
void PartialMoments(const Layout& layout, const T* x, double* partial,
                    const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  double* count = partial;
  double* mean = partial + C;
  double* m2 = partial + 2 * C;
  const double m = static_cast<double>(layout.per_channel());
  if (layout.per_channel() == 0) {  // an empty slice contributes nothing
    for (int64_t c = 0; c < C; ++c) count[c] = mean[c] = m2[c] = 0.0;
    return;
  }
  ChannelMoments(layout, x, mean, m2, parallel_for);
  for (int64_t c = 0; c < C; ++c) count[c] = m;
}

void MergeMoments(int64_t parts, int64_t channels, const double* partials, double* merged) {
  const int64_t C = channels;
  for (int64_t c = 0; c < C; ++c) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int64_t p = 0; p < parts; ++p) {  // fixed order: the same bits on every replica
      const double* part = partials + p * kPartialRows * C;
      const double nb = part[c], mb = part[C + c], m2b = part[2 * C + c];
      if (!(nb > 0.0)) continue;
      if (n == 0.0) {  // the first non-empty part is taken as is (one part: exact)
        n = nb, mean = mb, m2 = m2b;
        continue;
      }
      // Chan et al.: merging (n, mean, M2) pairs never subtracts large sums.
      const double total = n + nb;
      const double delta = mb - mean;
      mean += delta * (nb / total);
      m2 += m2b + delta * delta * (n * nb / total);
      n = total;
    }
    merged[c] = n;
    merged[C + c] = mean;
    merged[2 * C + c] = m2;
  }
}

template <typename U>
void FinalizeMoments(int64_t channels, const double* merged, U* mean, U* mean_lo, U* variance) {
  const int64_t C = channels;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  for (int64_t c = 0; c < C; ++c) {
    const double n = merged[c];
    const double mu = n > 0.0 ? merged[C + c] : kNaN;
    const MeanParts<U> parts = SplitMean<U>(mu);
    mean[c] = parts.hi;
    mean_lo[c] = parts.lo;
    variance[c] = static_cast<U>(n > 0.0 ? merged[2 * C + c] / n : kNaN);
  }
}

template <typename T, typename U>
void ApplyStatistics(const Layout& layout, const T* x, const U* scale, const U* offset,
                     const U* mean, const U* mean_lo, const U* variance, float epsilon, T* y,
                     const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(epsilon);
  std::vector<U> lo(C), a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {  // the fused op's coefficients, computed the same way
    lo[c] = mean_lo ? mean_lo[c] : U(0);
    const double inv_std = InverseStd(static_cast<double>(variance[c]), eps);
    a[c] = static_cast<U>(inv_std * (scale ? static_cast<double>(scale[c]) : 1.0));
    b[c] = offset ? offset[c] : U(0);
  }
  ApplyAffine(layout, x, mean, lo.data(), a.data(), b.data(), y, parallel_for);
}

template <typename T, typename U>
void ApplyGradWithSums(const Layout& layout, const T* dy, const T* x, const U* scale, const U* mean,
                       const U* mean_lo, const U* variance, const double* local_sums,
                       const double* global_sums, int64_t global_rows, const double* count,
                       float epsilon, T* dx, U* dscale, U* doffset,
                       const ParallelFor& parallel_for) {
  // The fused op's coefficients with the global sums and count.
  const auto k =
      SplitGradCoefficientsFromSums(layout, scale, mean_lo, variance, local_sums, global_sums,
                                    global_rows, count, 1.0, epsilon, dscale, doffset);
  ApplyGrad(layout, dy, x, mean, k.lo.data(), k.ga.data(), k.gb.data(), k.gc.data(), dx,
            parallel_for);
}

#define TFBN_INSTANTIATE_SPLIT(T, U)      \
  TFBN_INSTANTIATE(PartialMoments<T>)     \
  TFBN_INSTANTIATE(ApplyStatistics<T, U>) \
  TFBN_INSTANTIATE(ApplyGradWithSums<T, U>)
TFBN_FOR_EACH_TYPE(TFBN_INSTANTIATE_SPLIT)
#undef TFBN_INSTANTIATE_SPLIT

TFBN_INSTANTIATE(FinalizeMoments<float>)
TFBN_INSTANTIATE(FinalizeMoments<double>)

}  // namespace tfbn
