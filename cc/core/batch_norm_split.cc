// The split op family (see batch_norm.h): statistics, merge, apply, and the gradient's
// sums and apply, on the same kernels as the fused op. Synchronized BatchNorm puts one
// collective between the statistics and the apply step in each direction.
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "core/batch_norm.h"

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
void FinalizeMoments(int64_t channels, const double* merged, U* mean, U* mean_residual,
                     U* variance) {
  const int64_t C = channels;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  for (int64_t c = 0; c < C; ++c) {
    const double n = merged[c];
    const double mu = n > 0.0 ? merged[C + c] : kNaN;
    mean[c] = static_cast<U>(mu);
    mean_residual[c] = static_cast<U>(mu - static_cast<double>(mean[c]));
    variance[c] = static_cast<U>(n > 0.0 ? merged[2 * C + c] / n : kNaN);
  }
}

template <typename T, typename U>
void ApplyStatistics(const Layout& layout, const T* x, const U* scale, const U* offset,
                     const U* mean, const U* mean_residual, const U* variance, float epsilon,
                     T* y, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(epsilon);
  std::vector<U> lo(C), a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {  // the fused op's coefficients, computed the same way
    lo[c] = mean_residual ? mean_residual[c] : U(0);
    const double inv_std = 1.0 / std::sqrt(static_cast<double>(variance[c]) + eps);
    a[c] = static_cast<U>(inv_std * (scale ? static_cast<double>(scale[c]) : 1.0));
    b[c] = offset ? offset[c] : U(0);
  }
  ApplyAffine(layout, x, mean, lo.data(), a.data(), b.data(), y, parallel_for);
}

template <typename T, typename U>
void ApplyGradWithSums(const Layout& layout, const T* dy, const T* x, const U* scale,
                       const U* mean, const U* mean_residual, const U* variance,
                       const double* local_sums, const double* global_sums,
                       int64_t global_rows, const double* count, float epsilon, T* dx,
                       U* dscale, U* doffset, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(epsilon);
  const bool empty = layout.per_channel() == 0;
  std::vector<U> lo(C), ga(C), gb(C), gc(C);
  for (int64_t c = 0; c < C; ++c) {
    lo[c] = mean_residual ? mean_residual[c] : U(0);
    const double r = 1.0 / std::sqrt(static_cast<double>(variance[c]) + eps);
    const double s = scale ? static_cast<double>(scale[c]) : 1.0;
    doffset[c] = static_cast<U>(local_sums[c]);
    dscale[c] = empty ? U(0) : static_cast<U>(r * local_sums[C + c]);
    // The fused op's formula with the global sums and count:
    // dx = s*r*(dy - Σdy/M - xhat*Σ(dy*xhat)/M) + d_mean/M + 2*d_var*(x - mean)/M
    const double m = count[c];
    const double sum_dy = global_sums[c], sum_dy_xc = global_sums[C + c];
    const double dmu = global_rows == 4 ? global_sums[2 * C + c] : 0.0;
    const double dvar = global_rows == 4 ? global_sums[3 * C + c] : 0.0;
    ga[c] = static_cast<U>(s * r);
    gb[c] = m > 0.0 ? static_cast<U>(-s * r * r * r * sum_dy_xc / m + 2.0 * dvar / m) : U(0);
    gc[c] = m > 0.0 ? static_cast<U>(-s * r * sum_dy / m + dmu / m) : U(0);
  }
  ApplyGrad(layout, dy, x, mean, lo.data(), ga.data(), gb.data(), gc.data(), dx,
            parallel_for);
}

#define TFBN_INSTANTIATE_SPLIT(T, U)                                                        \
  template void PartialMoments<T>(const Layout&, const T*, double*, const ParallelFor&);    \
  template void ApplyStatistics<T, U>(const Layout&, const T*, const U*, const U*,          \
                                      const U*, const U*, const U*, float, T*,              \
                                      const ParallelFor&);                                  \
  template void ApplyGradWithSums<T, U>(const Layout&, const T*, const T*, const U*,        \
                                        const U*, const U*, const U*, const double*,        \
                                        const double*, int64_t, const double*, float, T*,   \
                                        U*, U*, const ParallelFor&);

TFBN_INSTANTIATE_SPLIT(Eigen::half, float)
TFBN_INSTANTIATE_SPLIT(Eigen::bfloat16, float)
TFBN_INSTANTIATE_SPLIT(float, float)
TFBN_INSTANTIATE_SPLIT(double, double)
#undef TFBN_INSTANTIATE_SPLIT

template void FinalizeMoments<float>(int64_t, const double*, float*, float*, float*);
template void FinalizeMoments<double>(int64_t, const double*, double*, double*, double*);

}  // namespace tfbn
