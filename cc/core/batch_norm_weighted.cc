// Weighted pieces of the split op family (see batch_norm.h): partial statistics with one
// weight per (outer, inner) position, shared by all channels (a Keras mask), and the
// gradient's apply step that goes with them. The drivers: partition, threads, shifts and
// per-channel coefficients; the inner loops are the weighted entries of the CPU kernel
// table (cpu_weighted.inc, one build per instruction set). Sums of values shifted by a
// sample, in the compute type over short stretches, then in double; the block partition
// depends on the shape only and blocks are added in block order, so results are bitwise
// identical for any number of threads and instruction set.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/batch_norm.h"
#include "core/batch_norm_math.h"
#include "core/cpu_kernel_select.h"
#include "core/huge_pages.h"
#include "core/instantiate.h"
#include "core/partition.h"
#include "core/split_coefficients.h"

namespace tfbn {
namespace {

using partition::BlockBegin;
using partition::kPieceElements;

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

// Per-channel W = sum w, S1 = sum w * (x - K), S2 = sum w * (x - K)^2 over the fixed
// block partition, blocks added in order. W is the same for every channel (one weight per
// position). S1 and S2 are summed with the weights times wscale (see WeightScale).
template <typename T>
void WeightedSums(const Layout& layout, const T* x, const float* w, V<T> wscale, const V<T>* shift,
                  double* s0, double* s1, double* s2, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel(), inner = layout.inner;
  const int64_t nb = NumBlocks(layout);
  const auto& k = cpu::Kernels<T, V<T>>();
  std::vector<double> part(static_cast<size_t>(nb * 3 * C), 0.0);  // [b][s0 | s1 | s2][C]
  auto block = [&](int64_t b) { return &part[b * 3 * C]; };
  const int64_t cost = 4 * std::max<int64_t>(1, layout.size() / nb);
  if (inner == 1) {
    parallel_for(nb, cost, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* p = block(b);
        k.weighted_moments_rows(cpu::Raw(x), w, wscale, C, BlockBegin(b, nb, m),
                                BlockBegin(b + 1, nb, m), shift, p + C, p + 2 * C);
      }
    });
  } else {
    parallel_for(nb * C, cost / C + 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / C, c = t % C;
        double* p = block(b);
        k.weighted_moments_planar(cpu::Raw(x), w, wscale, C, inner, c, BlockBegin(b, nb, m),
                                  BlockBegin(b + 1, nb, m), shift[c], p + C + c, p + 2 * C + c);
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

// Channels-last rows per pass of the weighted gradient kernel: as many as fit its span.
int64_t WeightedRowsPerCall(int64_t C) {
  return C >= kWeightedRowsSpan ? 1 : kWeightedRowsSpan / (C > 0 ? C : 1);
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
void WeightedPartialMoments(const Layout& layout, const T* x, const float* weights, double* partial,
                            const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel(), inner = layout.inner;
  double* count = partial;
  double* mean = partial + C;
  double* m2 = partial + 2 * C;
  std::fill(partial, partial + kPartialRows * C, 0.0);
  // The first position with weight: its sample of each channel is the first shift.
  const int64_t first =
      std::find_if(weights, weights + m, [](float v) { return v != 0.0f; }) - weights;
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
      const auto moments =
          MomentsFromShiftedSums(static_cast<double>(shift[c]), s1[c], s2[c], s0[c]);
      count[c] = s0[c];
      mean[c] = moments.mean;
      m2[c] = moments.m2;
      if (ShiftTooFar(moments, s0[c]) && std::isfinite(mean[c])) {
        far = true;
        shift[c] = static_cast<V<T>>(mean[c]);
      }
    }
    if (!far) break;
  }
}

template <typename T, typename U>
void WeightedApplyGradWithSums(const Layout& layout, const T* dy, const T* x, const U* scale,
                               const U* mean, const U* mean_lo, const U* variance,
                               const double* local_sums, const double* global_sums,
                               int64_t global_rows, const double* count, const float* weights,
                               float epsilon, T* dx, U* dscale, U* doffset,
                               const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, inner = layout.inner;
  // The statistics depend on x through the weighted sums, so every term that comes from
  // them is scaled by the element's weight w (applied per element by the kernels), and the
  // weight sum W replaces the count:
  // dx = s*r*dy + w * (-s*r*S1/W - s*r*xhat*S2/W + d_mean/W + 2*d_var*(x - mean)/W)
  // The kernels take w * wscale, so the coefficients divide by W * wscale.
  const U wscale = WeightScale<U>(weights, layout.per_channel());
  const auto g = SplitGradCoefficientsFromSums(
      layout, scale, mean_lo, variance, local_sums, global_sums, global_rows, count,
      static_cast<double>(wscale), epsilon, dscale, doffset);
  const U* hi = mean;
  const auto& k = cpu::Kernels<T, U>();
  AdviseHugePages(dx, layout.size() * static_cast<int64_t>(sizeof(T)));
  if (inner == 1) {
    const int64_t R = WeightedRowsPerCall(C);
    std::vector<U> th(R * C), tl(R * C), ta(R * C), tb(R * C), tc(R * C);  // tiled R times
    for (int64_t r = 0; r < R; ++r) {  // row by row: no division per element
      std::copy(hi, hi + C, th.begin() + r * C);
      std::copy(g.lo.begin(), g.lo.begin() + C, tl.begin() + r * C);
      std::copy(g.ga.begin(), g.ga.begin() + C, ta.begin() + r * C);
      std::copy(g.gb.begin(), g.gb.begin() + C, tb.begin() + r * C);
      std::copy(g.gc.begin(), g.gc.begin() + C, tc.begin() + r * C);
    }
    ForEachUnit(layout, parallel_for, [&](int64_t r0, int64_t r1) {
      k.weighted_grad_rows(cpu::Raw(dy), cpu::Raw(x), cpu::Raw(dx), weights, wscale, C, r0, r1, R,
                           th.data(), tl.data(), ta.data(), tb.data(), tc.data());
    });
  } else {
    ForEachUnit(layout, parallel_for, [&](int64_t p0, int64_t p1) {
      k.weighted_grad_planes(cpu::Raw(dy), cpu::Raw(x), cpu::Raw(dx), weights, wscale, C, inner, p0,
                             p1, hi, g.lo.data(), g.ga.data(), g.gb.data(), g.gc.data());
    });
  }
}

#define TFBN_INSTANTIATE_WEIGHTED(T, U)       \
  TFBN_INSTANTIATE(WeightedPartialMoments<T>) \
  TFBN_INSTANTIATE(WeightedApplyGradWithSums<T, U>)
TFBN_FOR_EACH_TYPE(TFBN_INSTANTIATE_WEIGHTED)
#undef TFBN_INSTANTIATE_WEIGHTED

}  // namespace tfbn
