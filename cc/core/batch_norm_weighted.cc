// Weighted pieces of the split op family (see batch_norm.h): partial statistics with one
// weight per (outer, inner) position, shared by all channels (a Keras mask), and the
// gradient's apply step that goes with them. Plain loops the compiler vectorizes; sums
// in double; the block partition depends on the shape only and blocks are added in block
// order, so results are bitwise identical for any number of threads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "core/batch_norm.h"

namespace tfbn {
namespace {

// Reduction blocks of about kBlockElements elements, at most kMaxBlocks of them.
constexpr int64_t kBlockElements = int64_t{1} << 16;
constexpr int64_t kMaxBlocks = 64;
// Elementwise passes: pieces of about this many elements for the threads.
constexpr int64_t kPieceElements = int64_t{1} << 14;
// Planar sums: independent accumulators along a run of inner elements (vector lanes).
constexpr int kLanes = 8;
// A shift sample further than this many standard deviations from the weighted mean
// costs precision in S2 - S1^2 / W: a second pass then shifts by the mean found.
constexpr double kFarShift = 8.0;

inline int64_t BlockBegin(int64_t b, int64_t nb, int64_t n) {
  return static_cast<int64_t>((static_cast<__int128>(n) * b) / nb);
}

int64_t NumBlocks(const Layout& layout) {
  const int64_t work = layout.inner == 1 ? layout.size() : layout.per_channel();
  const int64_t wanted = (work + kBlockElements - 1) / kBlockElements;
  return std::clamp<int64_t>(wanted, 1, std::min(kMaxBlocks, layout.per_channel()));
}

template <typename T>
inline double D(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
inline double D<double>(double v) {
  return v;
}

// Channels-last rows [r0, r1): s0 += w, s1[c] += w * d, s2[c] += w * d * d, d = x - K.
// Rows of weight 0 are skipped, so masked values (even NaN) never reach the sums.
template <typename T>
void WeightedRows(const T* x, const float* w, int64_t C, int64_t r0, int64_t r1,
                  const double* __restrict shift, double* s0, double* __restrict s1,
                  double* __restrict s2) {
  for (int64_t r = r0; r < r1; ++r) {
    const double wr = w[r];
    if (wr == 0.0) continue;
    *s0 += wr;
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const double d = D(xr[c]) - shift[c];
      const double wd = wr * d;
      s1[c] += wd;
      s2[c] += wd * d;
    }
  }
}

// Planar: channel c over its per-channel indices [j0, j1) (j = o * inner + i), lane sums.
template <typename T>
void WeightedPlanar(const T* x, const float* w, int64_t C, int64_t inner, int64_t c,
                    int64_t j0, int64_t j1, double shift, double* s0, double* s1,
                    double* s2) {
  double a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {};
  int64_t j = j0;
  while (j < j1) {
    const int64_t o = j / inner, i0 = j - o * inner;
    const int64_t n = std::min(j1 - j, inner - i0);
    const T* xp = x + (o * C + c) * inner + i0;
    const float* wp = w + j;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const double wi = wp[i + l];
        const double d = wi != 0.0 ? D(xp[i + l]) - shift : 0.0;
        const double wd = wi * d;
        a0[l] += wi;
        a1[l] += wd;
        a2[l] += wd * d;
      }
    for (int l = 0; i < n; ++i, ++l) {
      const double wi = wp[i];
      const double d = wi != 0.0 ? D(xp[i]) - shift : 0.0;
      a0[l] += wi;
      a1[l] += wi * d;
      a2[l] += wi * d * d;
    }
    j += n;
  }
  for (int l = 0; l < kLanes; ++l) {
    *s0 += a0[l];
    *s1 += a1[l];
    *s2 += a2[l];
  }
}

// Per-channel W = sum w, S1 = sum w * (x - K), S2 = sum w * (x - K)^2 over the fixed
// block partition, blocks added in order. W is the same for every channel (one weight per
// position); planar blocks compute it per channel, identically.
template <typename T>
void WeightedSums(const Layout& layout, const T* x, const float* w, const double* shift,
                  double* s0, double* s1, double* s2, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel(), inner = layout.inner;
  const int64_t nb = NumBlocks(layout);
  std::vector<double> part(static_cast<size_t>(nb * (3 * C + 1)), 0.0);  // [b][s0 | C | C | C]
  auto block = [&](int64_t b) { return &part[b * (3 * C + 1)]; };
  const int64_t cost = 6 * std::max<int64_t>(1, layout.size() / nb);
  if (inner == 1) {
    parallel_for(nb, cost, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* p = block(b);
        WeightedRows(x, w, C, BlockBegin(b, nb, m), BlockBegin(b + 1, nb, m), shift, p,
                     p + 1, p + 1 + C);
      }
    });
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < C; ++c) block(b)[1 + 2 * C + c] = block(b)[0];
  } else {
    parallel_for(nb * C, cost / C + 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / C, c = t % C;
        double* p = block(b);
        WeightedPlanar(x, w, C, inner, c, BlockBegin(b, nb, m), BlockBegin(b + 1, nb, m),
                       shift[c], p + 1 + 2 * C + c, p + 1 + c, p + 1 + C + c);
      }
    });
  }
  std::fill(s0, s0 + C, 0.0);
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);
  for (int64_t b = 0; b < nb; ++b) {
    const double* p = block(b);
    for (int64_t c = 0; c < C; ++c) {
      s0[c] += p[1 + 2 * C + c];
      s1[c] += p[1 + c];
      s2[c] += p[1 + C + c];
    }
  }
}

// Elementwise pieces: channels-last pieces are runs of rows, planar ones runs of
// (outer, channel) planes of `inner` elements; fn(first, last) over that unit.
template <class Fn>
void ForEachUnit(const Layout& layout, const ParallelFor& parallel_for, const Fn& fn) {
  const int64_t unit = layout.inner == 1 ? layout.channels : layout.inner;
  const int64_t units = layout.inner == 1 ? layout.outer : layout.outer * layout.channels;
  if (unit == 0 || units == 0) return;
  const int64_t per_piece = std::max<int64_t>(1, kPieceElements / unit);
  const int64_t pieces = (units + per_piece - 1) / per_piece;
  parallel_for(pieces, 4 * per_piece * unit, [&](int64_t p0, int64_t p1) {
    fn(p0 * per_piece, std::min(units, p1 * per_piece));
  });
}

}  // namespace

template <typename T>
void WeightedPartialMoments(const Layout& layout, const T* x, const float* weights,
                            double* partial, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel(), inner = layout.inner;
  double* count = partial;
  double* mean = partial + C;
  double* m2 = partial + 2 * C;
  std::fill(partial, partial + kPartialRows * C, 0.0);
  // The first position with weight: its sample of each channel is the first shift.
  const int64_t first = std::find_if(weights, weights + m, [](float v) { return v != 0.0f; }) -
                        weights;
  if (C == 0 || first == m) return;  // no weight: contributes nothing to a merge
  const int64_t o = first / inner, i = first - o * inner;
  std::vector<double> shift(static_cast<size_t>(C)), s0(C), s1(C), s2(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = D(x[(o * C + c) * inner + i]);
  for (int pass = 0; pass < 2; ++pass) {
    WeightedSums(layout, x, weights, shift.data(), s0.data(), s1.data(), s2.data(),
                 parallel_for);
    bool far = false;
    for (int64_t c = 0; c < C; ++c) {
      const double d = s1[c] / s0[c];
      count[c] = s0[c];
      mean[c] = shift[c] + d;
      const double v = s2[c] - s1[c] * d;
      m2[c] = v < 0.0 ? 0.0 : v;  // rounding can dip below zero; NaN passes through
      if (d * d > kFarShift * kFarShift * (m2[c] / s0[c]) && std::isfinite(mean[c])) {
        far = true;
        shift[c] = mean[c];
      }
    }
    if (!far) break;
  }
}

template <typename T, typename U>
void WeightedApplyGradWithSums(const Layout& layout, const T* dy, const T* x, const U* scale,
                               const U* mean, const U* mean_residual, const U* variance,
                               const double* local_sums, const double* global_sums,
                               int64_t global_rows, const double* count, const float* weights,
                               float epsilon, T* dx, U* dscale, U* doffset,
                               const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, inner = layout.inner;
  const double eps = static_cast<double>(epsilon);
  const bool empty = layout.per_channel() == 0;
  std::vector<U> hi(C), lo(C), ga(C), gb(C), gc(C);
  for (int64_t c = 0; c < C; ++c) {
    hi[c] = mean[c];
    lo[c] = mean_residual ? mean_residual[c] : U(0);
    const double r = 1.0 / std::sqrt(static_cast<double>(variance[c]) + eps);
    const double s = scale ? static_cast<double>(scale[c]) : 1.0;
    doffset[c] = static_cast<U>(local_sums[c]);
    dscale[c] = empty ? U(0) : static_cast<U>(r * local_sums[C + c]);
    // The statistics depend on x through the weighted sums, so every term that comes from
    // them is scaled by the element's weight w (applied per element below), and the
    // weight sum W replaces the count:
    // dx = s*r*dy + w * (-s*r*S1/W - s*r*xhat*S2/W + d_mean/W + 2*d_var*(x - mean)/W)
    const double W = count[c];
    const double sum_dy = global_sums[c], sum_dy_xc = global_sums[C + c];
    const double dmu = global_rows == 4 ? global_sums[2 * C + c] : 0.0;
    const double dvar = global_rows == 4 ? global_sums[3 * C + c] : 0.0;
    ga[c] = static_cast<U>(s * r);
    gb[c] = W > 0.0 ? static_cast<U>(-s * r * r * r * sum_dy_xc / W + 2.0 * dvar / W) : U(0);
    gc[c] = W > 0.0 ? static_cast<U>(-s * r * sum_dy / W + dmu / W) : U(0);
  }
  // dx may be dy itself: each element is read before it is written.
  auto at = [](const T* p, int64_t k) { return static_cast<U>(p[k]); };
  if (inner == 1) {
    ForEachUnit(layout, parallel_for, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const U w = static_cast<U>(weights[r]);
        const int64_t base = r * C;
        for (int64_t c = 0; c < C; ++c) {
          const U xc = (at(x, base + c) - hi[c]) - lo[c];
          dx[base + c] = static_cast<T>(ga[c] * at(dy, base + c) + w * (gb[c] * xc + gc[c]));
        }
      }
    });
  } else {
    ForEachUnit(layout, parallel_for, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t o = p / C, c = p - o * C;
        const U a = ga[c], b = gb[c], g = gc[c], h = hi[c], l = lo[c];
        const float* wp = weights + o * inner;
        const int64_t base = p * inner;
        for (int64_t i = 0; i < inner; ++i) {
          const U xc = (at(x, base + i) - h) - l;
          dx[base + i] =
              static_cast<T>(a * at(dy, base + i) + static_cast<U>(wp[i]) * (b * xc + g));
        }
      }
    });
  }
}

#define TFBN_INSTANTIATE_WEIGHTED(T, U)                                                     \
  template void WeightedPartialMoments<T>(const Layout&, const T*, const float*, double*,   \
                                          const ParallelFor&);                              \
  template void WeightedApplyGradWithSums<T, U>(                                            \
      const Layout&, const T*, const T*, const U*, const U*, const U*, const U*,            \
      const double*, const double*, int64_t, const double*, const float*, float, T*, U*,   \
      U*, const ParallelFor&);

TFBN_INSTANTIATE_WEIGHTED(Eigen::half, float)
TFBN_INSTANTIATE_WEIGHTED(Eigen::bfloat16, float)
TFBN_INSTANTIATE_WEIGHTED(float, float)
TFBN_INSTANTIATE_WEIGHTED(double, double)
#undef TFBN_INSTANTIATE_WEIGHTED

}  // namespace tfbn
