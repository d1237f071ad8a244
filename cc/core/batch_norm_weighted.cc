// Weighted pieces of the split op family (see batch_norm.h): partial statistics with one
// weight per (outer, inner) position, shared by all channels (a Keras mask), and the
// gradient's apply step that goes with them. Plain loops the compiler vectorizes; sums of
// values shifted by a sample, in the compute type over short stretches, then in double;
// the block partition depends on the shape only and blocks are added in block order, so
// results are bitwise identical for any number of threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "core/batch_norm.h"
#include "core/partition.h"

namespace tfbn {
namespace {

using partition::BlockBegin;
using partition::kPieceElements;

// Sums are taken in the compute type V over short stretches (kFlushRows rows, or
// kFlushElements elements spread over kLanes lanes), then added into double, as the fused
// kernels do: float arithmetic at float speed, double where sums grow.
constexpr int64_t kSeg = 512;  // channels (or elements) per stack buffer
constexpr int64_t kFlushRows = 16;
constexpr int64_t kFlushElements = 512;
constexpr int kLanes = 16;
// A shift sample further than this many standard deviations from the weighted mean
// costs precision in S2 - S1^2 / W: a second pass then shifts by the mean found.
constexpr double kFarShift = 8.0;

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked when the
// library loads. Without FMA contraction (-ffp-contract=off) and with a fixed lane order
// every version gives the same bits.
// (A build may define TFBN_CLONES itself, e.g. empty to compile one instruction set.)
#if defined(TFBN_CLONES)
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TFBN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TFBN_CLONES
#endif

// Partials per block: weight sum, mean and M2, a double each per channel.
int64_t NumBlocks(const Layout& layout) { return partition::NumBlocks(layout, 24); }

// The compute type: double for double data, float otherwise.
template <typename T>
using V = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A power of two that brings the largest of w[0, n) into [1, 4) (1 where all are 0). The
// kernels multiply the weights by it (exactly) and take it out again in double, so weights
// of any finite size keep the float products with the data, and the gradient's
// coefficients (which divide by the weight sum), in float's normal range.
template <typename U>
U WeightScale(const float* w, int64_t n) {
  float wmax = 0.0f;
  for (int64_t j = 0; j < n; ++j) wmax = std::max(wmax, w[j]);
  const int e = wmax > 0.0f ? std::clamp(std::ilogb(wmax), -126, 126) : 0;
  return std::ldexp(U(1), -e);
}

// n values of p as V: p itself where T is V, else converted into buf.
template <typename T>
inline const V<T>* In(const T* p, int64_t n, V<T>* buf) {
  if constexpr (std::is_same_v<T, V<T>>) {
    return p;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<V<T>>(p[k]);
    return buf;
  }
}

// kLanes values as one GCC vector: the compiler maps it onto the instruction set's
// registers, always in lane order.
template <typename U>
using Lanes __attribute__((vector_size(kLanes * sizeof(U)))) = U;
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));

template <typename U>
inline Lanes<U> LoadLanes(const U* p) {
  Lanes<U> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename U>
inline void StoreLanes(U* p, const Lanes<U>& v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename U>
inline Lanes<U> LoadWeights(const float* p) {
  FloatLanes v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (std::is_same_v<U, float>) {
    return v;
  } else {
    return __builtin_convertvector(v, Lanes<U>);
  }
}

// Channels-last rows [r0, r1): s1[c] += w * d, s2[c] += w * d * d with d = x - shift.
// Rows of weight 0 are skipped, so masked values (even NaN) never reach the sums.
template <typename T>
TFBN_CLONES void WeightedRows(const T* x, const float* w, V<T> wscale, int64_t C, int64_t r0,
                              int64_t r1, const V<T>* shift, double* s1, double* s2) {
  using U = V<T>;
  alignas(64) U buf[kSeg], a1[kSeg], a2[kSeg];
  for (int64_t c0 = 0; c0 < C; c0 += kSeg) {
    const int64_t n = std::min(kSeg, C - c0);
    const U* __restrict sh = shift + c0;
    for (int64_t rb = r0; rb < r1; rb += kFlushRows) {
      for (int64_t c = 0; c < n; ++c) a1[c] = a2[c] = U(0);
      for (int64_t r = rb, re = std::min(rb + kFlushRows, r1); r < re; ++r) {
        const U wr = static_cast<U>(w[r]) * wscale;
        if (wr == U(0)) continue;
        const U* __restrict xr = In(x + r * C + c0, n, buf);
        for (int64_t c = 0; c < n; ++c) {
          const U d = xr[c] - sh[c];
          const U wd = wr * d;
          a1[c] += wd;
          a2[c] += wd * d;
        }
      }
      for (int64_t c = 0; c < n; ++c) {
        s1[c0 + c] += static_cast<double>(a1[c]);
        s2[c0 + c] += static_cast<double>(a2[c]);
      }
    }
  }
}

// Planar: channel c over its per-channel indices [j0, j1) (j = o * inner + i). Lane l
// takes elements l, l + kLanes, ... of each contiguous piece; a tail goes to lanes 0, 1...
template <typename T>
TFBN_CLONES void WeightedPlanar(const T* x, const float* w, V<T> wscale, int64_t C,
                                int64_t inner, int64_t c, int64_t j0, int64_t j1, V<T> shift,
                                double* s1, double* s2) {
  using U = V<T>;
  alignas(64) U buf[kFlushElements];
  U a1[kLanes] = {}, a2[kLanes] = {};
  double t1[kLanes] = {}, t2[kLanes] = {};
  auto flush = [&] {
    for (int l = 0; l < kLanes; ++l) {
      t1[l] += static_cast<double>(a1[l]);
      t2[l] += static_cast<double>(a2[l]);
      a1[l] = a2[l] = U(0);
    }
  };
  int64_t pending = 0;
  for (int64_t j = j0; j < j1;) {
    const int64_t o = j / inner, i = j - o * inner;
    const int64_t len = std::min(inner - i, j1 - j);
    const T* xp = x + (o * C + c) * inner + i;
    const float* wp = w + j;
    for (int64_t k = 0; k < len; k += kFlushElements) {
      const int64_t n = std::min(kFlushElements, len - k);
      const U* __restrict xs = In(xp + k, n, buf);
      const float* __restrict ws = wp + k;
      int64_t e = 0;
      if (e + kLanes <= n) {
        Lanes<U> v1 = LoadLanes<U>(a1), v2 = LoadLanes<U>(a2);
        const Lanes<U> zero = {}, sh = zero + shift, sc = zero + wscale;
        for (; e + kLanes <= n; e += kLanes) {
          const Lanes<U> wi = LoadWeights<U>(ws + e) * sc;
          // A select, not a branch: a weight of 0 drops the value (even NaN).
          const Lanes<U> d = wi != zero ? LoadLanes<U>(xs + e) - sh : zero;
          const Lanes<U> wd = wi * d;
          v1 += wd;
          v2 += wd * d;
        }
        StoreLanes<U>(a1, v1);
        StoreLanes<U>(a2, v2);
      }
      for (int l = 0; e < n; ++e, ++l) {
        const U wi = static_cast<U>(ws[e]) * wscale;
        const U d = wi != U(0) ? xs[e] - shift : U(0);
        const U wd = wi * d;
        a1[l] += wd;
        a2[l] += wd * d;
      }
      pending += n;
      if (pending >= kFlushElements) {
        flush();
        pending = 0;
      }
    }
    j += len;
  }
  flush();
  for (int l = 0; l < kLanes; ++l) {
    *s1 += t1[l];
    *s2 += t2[l];
  }
}

// dx = ga * dy + w * (gb * ((x - hi) - lo) + gc). Inputs are read into buffers first, so
// dx may be dy itself (the op forwards dy's buffer).
// Channels-last rows [r0, r1): one weight per row, per-channel coefficients. Short rows
// go R = kSeg / C at a time through one flat loop (the coefficients tiled R times, the
// row weights spread over their C elements), so narrow layers still run long vector loops.
template <typename T>
TFBN_CLONES void WeightedGradRows(const T* dy, const T* x, T* dx, const float* w, V<T> wscale,
                                  int64_t C, int64_t r0, int64_t r1, int64_t R, const V<T>* hi,
                                  const V<T>* lo, const V<T>* ga, const V<T>* gb,
                                  const V<T>* gc) {
  using U = V<T>;
  alignas(64) U bdy[kSeg], bx[kSeg], bw[kSeg], out[kSeg];
  for (int64_t r = r0; r < r1; r += R) {
    const int64_t rows = std::min(R, r1 - r);
    if (R > 1)  // R * C <= kSeg
      for (int64_t q = 0; q < rows; ++q)
        std::fill(bw + q * C, bw + (q + 1) * C, U(w[r + q]) * wscale);
    const int64_t span = R > 1 ? rows * C : C;
    for (int64_t c0 = 0; c0 < span; c0 += kSeg) {
      const int64_t m = std::min(kSeg, span - c0), e = r * C + c0;
      const U* __restrict g = In(dy + e, m, bdy);
      const U* __restrict v = In(x + e, m, bx);
      const U* __restrict ws = R > 1 ? bw : nullptr;
      const U wr = static_cast<U>(w[r]) * wscale;
      const U *__restrict h = hi + c0, *__restrict l = lo + c0, *__restrict a = ga + c0,
                          *__restrict b = gb + c0, *__restrict k = gc + c0;
      U* __restrict o = out;
      if (ws) {
        for (int64_t c = 0; c < m; ++c)
          o[c] = a[c] * g[c] + ws[c] * (b[c] * ((v[c] - h[c]) - l[c]) + k[c]);
      } else {
        for (int64_t c = 0; c < m; ++c)
          o[c] = a[c] * g[c] + wr * (b[c] * ((v[c] - h[c]) - l[c]) + k[c]);
      }
      for (int64_t c = 0; c < m; ++c) dx[e + c] = static_cast<T>(o[c]);
    }
  }
}

// Planar planes [p0, p1) (plane p = o * C + c: `inner` elements of channel c), one weight
// per element.
template <typename T>
TFBN_CLONES void WeightedGradPlanes(const T* dy, const T* x, T* dx, const float* w,
                                    V<T> wscale, int64_t C, int64_t inner, int64_t p0,
                                    int64_t p1, const V<T>* hi,
                                    const V<T>* lo, const V<T>* ga, const V<T>* gb,
                                    const V<T>* gc) {
  using U = V<T>;
  alignas(64) U bdy[kSeg], bx[kSeg], out[kSeg];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t o = p / C, ch = p - o * C;
    const U h = hi[ch], l = lo[ch], a = ga[ch], b = gb[ch], k = gc[ch];
    for (int64_t i0 = 0; i0 < inner; i0 += kSeg) {
      const int64_t m = std::min(kSeg, inner - i0), e = p * inner + i0;
      const U* __restrict g = In(dy + e, m, bdy);
      const U* __restrict v = In(x + e, m, bx);
      const float* __restrict ws = w + o * inner + i0;
      U* __restrict out_p = out;
      for (int64_t i = 0; i < m; ++i)
        out_p[i] = a * g[i] + static_cast<U>(ws[i]) * wscale * (b * ((v[i] - h) - l) + k);
      for (int64_t i = 0; i < m; ++i) dx[e + i] = static_cast<T>(out_p[i]);
    }
  }
}

// Per-channel W = sum w, S1 = sum w * (x - K), S2 = sum w * (x - K)^2 over the fixed
// block partition, blocks added in order. W is the same for every channel (one weight per
// position). S1 and S2 are summed with the weights times wscale (see WeightScale).
template <typename T>
void WeightedSums(const Layout& layout, const T* x, const float* w, V<T> wscale,
                  const V<T>* shift, double* s0, double* s1, double* s2,
                  const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel(), inner = layout.inner;
  const int64_t nb = NumBlocks(layout);
  std::vector<double> part(static_cast<size_t>(nb * 3 * C), 0.0);  // [b][s0 | s1 | s2][C]
  auto block = [&](int64_t b) { return &part[b * 3 * C]; };
  const int64_t cost = 4 * std::max<int64_t>(1, layout.size() / nb);
  if (inner == 1) {
    parallel_for(nb, cost, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* p = block(b);
        WeightedRows(x, w, wscale, C, BlockBegin(b, nb, m), BlockBegin(b + 1, nb, m), shift, p + C,
                     p + 2 * C);
      }
    });
  } else {
    parallel_for(nb * C, cost / C + 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / C, c = t % C;
        double* p = block(b);
        WeightedPlanar(x, w, wscale, C, inner, c, BlockBegin(b, nb, m), BlockBegin(b + 1, nb, m),
                       shift[c], p + C + c, p + 2 * C + c);
      }
    });
  }
  // The weight sum of a block is the same for every channel: once, in double.
  for (int64_t b = 0; b < nb; ++b) {
    double sw = 0.0;
    for (int64_t j = BlockBegin(b, nb, m), e = BlockBegin(b + 1, nb, m); j < e; ++j)
      sw += static_cast<double>(w[j]);
    std::fill(block(b), block(b) + C, sw);
  }
  std::fill(s0, s0 + C, 0.0);
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);
  for (int64_t b = 0; b < nb; ++b) {
    const double* p = block(b);
    for (int64_t c = 0; c < C; ++c) {
      s0[c] += p[c];
      s1[c] += p[C + c];
      s2[c] += p[2 * C + c];
    }
  }
  const double unscale = 1.0 / static_cast<double>(wscale);  // a power of two: exact
  for (int64_t c = 0; c < C; ++c) {
    s1[c] *= unscale;
    s2[c] *= unscale;
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
  std::vector<V<T>> shift(static_cast<size_t>(C));
  std::vector<double> s0(C), s1(C), s2(C);
  const V<T> wscale = WeightScale<V<T>>(weights + first, m - first);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<V<T>>(x[(o * C + c) * inner + i]);
  for (int pass = 0; pass < 2; ++pass) {
    WeightedSums(layout, x, weights, wscale, shift.data(), s0.data(), s1.data(), s2.data(),
                 parallel_for);
    bool far = false;
    for (int64_t c = 0; c < C; ++c) {
      const double d = s1[c] / s0[c];
      count[c] = s0[c];
      mean[c] = static_cast<double>(shift[c]) + d;
      const double v = s2[c] - s1[c] * d;
      m2[c] = v < 0.0 ? 0.0 : v;  // rounding can dip below zero; NaN passes through
      if (d * d > kFarShift * kFarShift * (m2[c] / s0[c]) && std::isfinite(mean[c])) {
        far = true;
        shift[c] = static_cast<V<T>>(mean[c]);
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
  // The loops below take w * wscale, so the coefficients divide by W * wscale.
  const U wscale = WeightScale<U>(weights, layout.per_channel());
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
    const double W = count[c] * static_cast<double>(wscale);
    const double sum_dy = global_sums[c], sum_dy_xc = global_sums[C + c];
    const double dmu = global_rows == 4 ? global_sums[2 * C + c] : 0.0;
    const double dvar = global_rows == 4 ? global_sums[3 * C + c] : 0.0;
    ga[c] = static_cast<U>(s * r);
    gb[c] = W > 0.0 ? static_cast<U>(-s * r * r * r * sum_dy_xc / W + 2.0 * dvar / W) : U(0);
    gc[c] = W > 0.0 ? static_cast<U>(-s * r * sum_dy / W + dmu / W) : U(0);
  }
  if (inner == 1) {
    const int64_t R = std::max<int64_t>(1, kSeg / std::max<int64_t>(C, 1));
    std::vector<U> th(R * C), tl(R * C), ta(R * C), tb(R * C), tc(R * C);  // tiled R times
    for (int64_t k = 0; k < R * C; ++k) {
      th[k] = hi[k % C], tl[k] = lo[k % C], ta[k] = ga[k % C];
      tb[k] = gb[k % C], tc[k] = gc[k % C];
    }
    ForEachUnit(layout, parallel_for, [&](int64_t r0, int64_t r1) {
      WeightedGradRows(dy, x, dx, weights, wscale, C, r0, r1, R, th.data(), tl.data(), ta.data(),
                       tb.data(), tc.data());
    });
  } else {
    ForEachUnit(layout, parallel_for, [&](int64_t p0, int64_t p1) {
      WeightedGradPlanes(dy, x, dx, weights, wscale, C, inner, p0, p1, hi.data(), lo.data(),
                         ga.data(), gb.data(), gc.data());
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
