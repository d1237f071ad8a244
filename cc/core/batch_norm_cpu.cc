// CPU kernels for the core Batch Normalization math (see batch_norm.h).
#include "core/batch_norm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <Eigen/Core>  // Eigen::half, Eigen::bfloat16: the same types TensorFlow uses.

namespace tfbn {
namespace {

// Reductions are split into at most kMaxBlocks blocks of about kBlockElements elements
// each. The partition depends on the shape only (never on the thread count), which is
// what makes the statistics bitwise reproducible; kMaxBlocks bounds the workspace to
// 2 * kMaxBlocks * C doubles.
constexpr int64_t kBlockElements = int64_t{1} << 16;
constexpr int64_t kMaxBlocks = 64;
// Elementwise passes over planar layouts are cut into runs of at most this many elements
// so that a few huge planes still spread over all threads.
constexpr int64_t kRunElements = int64_t{1} << 15;

int64_t NumBlocks(const Layout& layout) {
  const int64_t wanted = (layout.size() + kBlockElements - 1) / kBlockElements;
  return std::clamp<int64_t>(wanted, 1, std::min(kMaxBlocks, layout.per_channel()));
}

// Block b of nb over [0, n): a split that depends on (n, nb) only.
inline int64_t BlockBegin(int64_t b, int64_t nb, int64_t n) {
  return static_cast<int64_t>((static_cast<__int128>(n) * b) / nb);
}

// Two per-channel double sums. The kernel provides
//   Row(r, s1, s2): add the C elements of row r (channels-last layouts, inner == 1);
//   Run(c, offset, len, s1, s2): add a contiguous run of channel c (planar layouts).
template <class Kernel>
void ReducePerChannel(const Layout& layout, const Kernel& kernel, double* out1, double* out2,
                      const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel();
  const int64_t nb = NumBlocks(layout);
  std::vector<double> partial(static_cast<size_t>(2 * nb * C), 0.0);  // [block][2][C]
  const int64_t block_cost = 4 * std::max<int64_t>(1, layout.size() / nb);
  if (layout.inner == 1) {
    parallel_for(nb, block_cost, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* s1 = &partial[2 * b * C];
        double* s2 = s1 + C;
        for (int64_t r = BlockBegin(b, nb, m), end = BlockBegin(b + 1, nb, m); r < end; ++r)
          kernel.Row(r, s1, s2);
      }
    });
  } else {
    const int64_t inner = layout.inner;
    parallel_for(nb * C, block_cost / C + 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / C, c = t % C;
        double s1 = 0.0, s2 = 0.0;
        for (int64_t j = BlockBegin(b, nb, m), end = BlockBegin(b + 1, nb, m); j < end;) {
          const int64_t o = j / inner, i = j % inner;
          const int64_t len = std::min(inner - i, end - j);
          kernel.Run(c, (o * C + c) * inner + i, len, s1, s2);
          j += len;
        }
        partial[2 * b * C + c] = s1;
        partial[(2 * b + 1) * C + c] = s2;
      }
    });
  }
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t b = 0; b < nb; ++b) {  // fixed merge order
      s1 += partial[2 * b * C + c];
      s2 += partial[(2 * b + 1) * C + c];
    }
    out1[c] = s1;
    out2[c] = s2;
  }
}

// Calls row(r) for each row of a channels-last layout, or run(c, offset, len) for
// contiguous runs of one channel in a planar layout, spread over threads.
template <class RowFn, class RunFn>
void ForEachElementBlock(const Layout& layout, int64_t cost_per_element,
                         const ParallelFor& parallel_for, const RowFn& row, const RunFn& run) {
  if (layout.size() == 0) return;
  const int64_t C = layout.channels, inner = layout.inner;
  if (inner == 1) {
    parallel_for(layout.outer, cost_per_element * C, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row(r);
    });
    return;
  }
  const int64_t run_len = std::min(inner, kRunElements);
  const int64_t runs_per_plane = (inner + run_len - 1) / run_len;
  parallel_for(layout.outer * C * runs_per_plane, cost_per_element * run_len,
               [&](int64_t t0, int64_t t1) {
                 for (int64_t t = t0; t < t1; ++t) {
                   const int64_t plane = t / runs_per_plane, k = t % runs_per_plane;
                   const int64_t begin = k * run_len;
                   run(plane % C, plane * inner + begin, std::min(run_len, inner - begin));
                 }
               });
}

// Sums in kLanes independent accumulators: a fixed order the compiler can vectorize.
constexpr int kLanes = 8;

template <typename T>
struct MomentsKernel {
  const T* x;
  int64_t C;
  const double* shift;  // per-channel shift: the sums are of d = x - shift
  void Row(int64_t r, double* s1, double* s2) const {
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(xr[c]) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
  void Run(int64_t c, int64_t offset, int64_t len, double& s1, double& s2) const {
    const T* xs = x + offset;
    const double k = shift[c];
    double a1[kLanes] = {}, a2[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const double d = static_cast<double>(xs[i + l]) - k;
        a1[l] += d;
        a2[l] += d * d;
      }
    for (; i < len; ++i) {
      const double d = static_cast<double>(xs[i]) - k;
      a1[0] += d;
      a2[0] += d * d;
    }
    for (int l = 0; l < kLanes; ++l) {
      s1 += a1[l];
      s2 += a2[l];
    }
  }
};

template <typename T>
struct GradSumsKernel {
  const T* dy;
  const T* x;
  int64_t C;
  const double* mean;
  void Row(int64_t r, double* s1, double* s2) const {
    const T* dyr = dy + r * C;
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const double g = static_cast<double>(dyr[c]);
      s1[c] += g;
      s2[c] += g * (static_cast<double>(xr[c]) - mean[c]);
    }
  }
  void Run(int64_t c, int64_t offset, int64_t len, double& s1, double& s2) const {
    const T* dys = dy + offset;
    const T* xs = x + offset;
    const double mu = mean[c];
    double a1[kLanes] = {}, a2[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const double g = static_cast<double>(dys[i + l]);
        a1[l] += g;
        a2[l] += g * (static_cast<double>(xs[i + l]) - mu);
      }
    for (; i < len; ++i) {
      const double g = static_cast<double>(dys[i]);
      a1[0] += g;
      a2[0] += g * (static_cast<double>(xs[i]) - mu);
    }
    for (int l = 0; l < kLanes; ++l) {
      s1 += a1[l];
      s2 += a2[l];
    }
  }
};

}  // namespace

const ParallelFor& SerialFor() {
  static const ParallelFor serial = [](int64_t n, int64_t, const RangeFn& fn) {
    if (n > 0) fn(0, n);
  };
  return serial;
}

template <typename T>
void ChannelMoments(const Layout& layout, const T* x, double* mean, double* m2,
                    const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel();
  if (m == 0) {
    std::fill(mean, mean + C, std::numeric_limits<double>::quiet_NaN());
    std::fill(m2, m2 + C, std::numeric_limits<double>::quiet_NaN());
    return;
  }
  // Shifting by one sample of each channel keeps sum(d^2) - sum(d)^2/m free of
  // cancellation when the mean is far from zero.
  std::vector<double> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(x[c * layout.inner]);
  std::vector<double> s1(static_cast<size_t>(C)), s2(static_cast<size_t>(C));
  ReducePerChannel(layout, MomentsKernel<T>{x, C, shift.data()}, s1.data(), s2.data(),
                   parallel_for);
  for (int64_t c = 0; c < C; ++c) {
    const double d = s1[c] / static_cast<double>(m);
    mean[c] = shift[c] + d;
    const double v = s2[c] - s1[c] * d;
    m2[c] = v < 0.0 ? 0.0 : v;  // rounding can dip below zero; NaN passes through
  }
}

template <typename T, typename U>
void ApplyAffine(const Layout& layout, const T* x, const U* hi, const U* lo, const U* a,
                 const U* b, T* y, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  ForEachElementBlock(
      layout, 2, parallel_for,
      [&](int64_t r) {
        const T* xr = x + r * C;
        T* yr = y + r * C;
        for (int64_t c = 0; c < C; ++c)
          yr[c] = static_cast<T>(((static_cast<U>(xr[c]) - hi[c]) - lo[c]) * a[c] + b[c]);
      },
      [&](int64_t c, int64_t offset, int64_t len) {
        const U h = hi[c], l = lo[c], aa = a[c], bb = b[c];
        const T* xs = x + offset;
        T* ys = y + offset;
        for (int64_t i = 0; i < len; ++i)
          ys[i] = static_cast<T>(((static_cast<U>(xs[i]) - h) - l) * aa + bb);
      });
}

template <typename T, typename U>
void GradSums(const Layout& layout, const T* dy, const T* x, const U* hi, const U* lo,
              double* sum_dy, double* sum_dy_xc, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  if (layout.per_channel() == 0) {
    std::fill(sum_dy, sum_dy + C, 0.0);
    std::fill(sum_dy_xc, sum_dy_xc + C, 0.0);
    return;
  }
  std::vector<double> mean(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c)
    mean[c] = static_cast<double>(hi[c]) + static_cast<double>(lo[c]);
  ReducePerChannel(layout, GradSumsKernel<T>{dy, x, C, mean.data()}, sum_dy, sum_dy_xc,
                   parallel_for);
}

template <typename T, typename U>
void ApplyGrad(const Layout& layout, const T* dy, const T* x, const U* hi, const U* lo,
               const U* ga, const U* gb, const U* gc, T* dx, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  if (gb == nullptr) {  // dx = ga * dy
    ForEachElementBlock(
        layout, 1, parallel_for,
        [&](int64_t r) {
          for (int64_t c = 0; c < C; ++c)
            dx[r * C + c] = static_cast<T>(ga[c] * static_cast<U>(dy[r * C + c]));
        },
        [&](int64_t c, int64_t offset, int64_t len) {
          const U a = ga[c];
          for (int64_t i = offset; i < offset + len; ++i)
            dx[i] = static_cast<T>(a * static_cast<U>(dy[i]));
        });
    return;
  }
  ForEachElementBlock(
      layout, 3, parallel_for,
      [&](int64_t r) {
        const T* dyr = dy + r * C;
        const T* xr = x + r * C;
        T* dxr = dx + r * C;
        for (int64_t c = 0; c < C; ++c)
          dxr[c] = static_cast<T>(ga[c] * static_cast<U>(dyr[c]) +
                                  gb[c] * ((static_cast<U>(xr[c]) - hi[c]) - lo[c]) + gc[c]);
      },
      [&](int64_t c, int64_t offset, int64_t len) {
        const U a = ga[c], bb = gb[c], cc = gc[c], h = hi[c], l = lo[c];
        for (int64_t i = offset; i < offset + len; ++i)
          dx[i] = static_cast<T>(a * static_cast<U>(dy[i]) +
                                 bb * ((static_cast<U>(x[i]) - h) - l) + cc);
      });
}

template <typename T, typename U>
void BatchNormForward(const Layout& layout, const T* x, const U* scale, const U* offset,
                      const U* mean, const U* variance, const ForwardArgs& args, T* y,
                      U* batch_mean, U* batch_variance, U* mean_residual,
                      const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(args.epsilon);
  std::vector<U> hi(C), lo(C), a(C), b(C);
  std::vector<double> mean_d, m2;
  if (args.training) {
    mean_d.resize(C);
    m2.resize(C);
    ChannelMoments(layout, x, mean_d.data(), m2.data(), parallel_for);
  }
  const double m = static_cast<double>(layout.per_channel());
  for (int64_t c = 0; c < C; ++c) {
    double var;
    if (args.training) {
      var = m2[c] / m;  // NaN for an empty batch
      hi[c] = static_cast<U>(mean_d[c]);
      lo[c] = static_cast<U>(mean_d[c] - static_cast<double>(hi[c]));
    } else {
      var = static_cast<double>(variance[c]);
      hi[c] = mean[c];
      lo[c] = U(0);
    }
    batch_mean[c] = hi[c];
    batch_variance[c] = args.training ? static_cast<U>(var) : variance[c];
    mean_residual[c] = lo[c];
    const double inv_std = 1.0 / std::sqrt(var + eps);
    a[c] = static_cast<U>(inv_std * (scale ? static_cast<double>(scale[c]) : 1.0));
    b[c] = offset ? offset[c] : U(0);
  }
  ApplyAffine(layout, x, hi.data(), lo.data(), a.data(), b.data(), y, parallel_for);
}

template <typename T, typename U>
void BatchNormBackward(const Layout& layout, const T* dy, const T* x, const U* scale,
                       const U* mean, const U* mean_residual, const U* variance,
                       const U* d_batch_mean, const U* d_batch_variance,
                       const ForwardArgs& args, T* dx, U* dscale, U* doffset,
                       const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(args.epsilon);
  const double m = static_cast<double>(layout.per_channel());
  std::vector<U> hi(C), lo(C), ga(C), gb(C), gc(C);
  for (int64_t c = 0; c < C; ++c) {
    hi[c] = mean[c];
    lo[c] = mean_residual ? mean_residual[c] : U(0);
  }
  std::vector<double> sum_dy(C), sum_dy_xc(C);
  GradSums(layout, dy, x, hi.data(), lo.data(), sum_dy.data(), sum_dy_xc.data(), parallel_for);
  for (int64_t c = 0; c < C; ++c) {
    const double r = 1.0 / std::sqrt(static_cast<double>(variance[c]) + eps);
    const double s = scale ? static_cast<double>(scale[c]) : 1.0;
    const bool empty = layout.per_channel() == 0;
    doffset[c] = static_cast<U>(sum_dy[c]);
    dscale[c] = empty ? U(0) : static_cast<U>(r * sum_dy_xc[c]);
    ga[c] = static_cast<U>(s * r);
    if (args.training && !empty) {
      // dx = s*r*(dy - mean(dy) - xhat*mean(dy*xhat)) + d_mean/m + 2*d_var*(x - mean)/m
      const double dmu = d_batch_mean ? static_cast<double>(d_batch_mean[c]) : 0.0;
      const double dvar = d_batch_variance ? static_cast<double>(d_batch_variance[c]) : 0.0;
      gb[c] = static_cast<U>(-s * r * r * r * sum_dy_xc[c] / m + 2.0 * dvar / m);
      gc[c] = static_cast<U>(-s * r * sum_dy[c] / m + dmu / m);
    }
  }
  const bool full = args.training;
  ApplyGrad(layout, dy, x, hi.data(), lo.data(), ga.data(), full ? gb.data() : nullptr,
            full ? gc.data() : nullptr, dx, parallel_for);
}

#define TFBN_INSTANTIATE(T, U)                                                              \
  template void ChannelMoments<T>(const Layout&, const T*, double*, double*,                \
                                  const ParallelFor&);                                      \
  template void ApplyAffine<T, U>(const Layout&, const T*, const U*, const U*, const U*,    \
                                  const U*, T*, const ParallelFor&);                        \
  template void GradSums<T, U>(const Layout&, const T*, const T*, const U*, const U*,       \
                               double*, double*, const ParallelFor&);                       \
  template void ApplyGrad<T, U>(const Layout&, const T*, const T*, const U*, const U*,      \
                                const U*, const U*, const U*, T*, const ParallelFor&);      \
  template void BatchNormForward<T, U>(const Layout&, const T*, const U*, const U*,         \
                                       const U*, const U*, const ForwardArgs&, T*, U*, U*,  \
                                       U*, const ParallelFor&);                             \
  template void BatchNormBackward<T, U>(const Layout&, const T*, const T*, const U*,        \
                                        const U*, const U*, const U*, const U*, const U*,   \
                                        const ForwardArgs&, T*, U*, U*, const ParallelFor&);

TFBN_INSTANTIATE(Eigen::half, float)
TFBN_INSTANTIATE(Eigen::bfloat16, float)
TFBN_INSTANTIATE(float, float)
TFBN_INSTANTIATE(double, double)
#undef TFBN_INSTANTIATE

}  // namespace tfbn
