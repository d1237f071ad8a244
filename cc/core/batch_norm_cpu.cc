// CPU kernels for the core Batch Normalization math (see batch_norm.h).
#include "core/batch_norm.h"
#include "core/batch_norm_math.h"
#include "core/cpu_kernel_select.h"
#include "core/huge_pages.h"
#include "core/instantiate.h"
#include "core/partition.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace tfbn {
namespace {

using partition::BlockBegin;
using partition::kPieceElements;

// Outputs this large are written with non-temporal stores: they would not stay in the
// cache anyway, and skipping the read of each destination line saves a third of the
// traffic.
constexpr int64_t kStreamBytes = int64_t{4} << 20;

// Readies an output of layout's size about to be written: asks for transparent huge pages
// where it is large (see AdviseHugePages) and says whether to write it with non-temporal
// stores.
template <typename T>
bool PrepareOutput(const Layout& layout, T* out) {
  const int64_t bytes = layout.size() * static_cast<int64_t>(sizeof(T));
  if (bytes < kStreamBytes) return false;
  if (out != nullptr) AdviseHugePages(out, bytes);
  return true;
}

// Partials per block: mean and M2 (or two gradient sums), a double each per channel.
int64_t NumBlocks(const Layout& layout) { return partition::NumBlocks(layout, 16); }

using cpu::Kernels;
using cpu::Raw;

// Two per-channel double sums over a partition that depends on the shape only.
//   rows(r0, r1, s1, s2): add rows [r0, r1) of a channels-last layout into s1[C], s2[C];
//   planar(c0, c1, j0, j1, s1, s2): sum channels [c0, c1) over their per-channel indices
//   [j0, j1) into s1[c], s2[c].
template <class RowsFn, class PlanarFn>
void ReducePerChannel(const Layout& layout, const RowsFn& rows, const PlanarFn& planar,
                      double* out1, double* out2, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels, m = layout.per_channel();
  if (C == 0) return;
  const int64_t nb = NumBlocks(layout);
  std::vector<double> partial(static_cast<size_t>(2 * nb * C), 0.0);  // [block][2][C]
  const int64_t block_cost = 2 * std::max<int64_t>(1, layout.size() / nb);
  if (layout.inner == 1) {
    parallel_for(nb, block_cost, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* s1 = &partial[2 * b * C];
        rows(BlockBegin(b, nb, m), BlockBegin(b + 1, nb, m), s1, s1 + C);
      }
    });
  } else {
    // Tasks are (block, group of channels): a group walks its planes in memory order, and
    // enough groups keep the threads busy. How channels are grouped does not change a bit.
    const int64_t group = std::clamp<int64_t>(nb * C / 16, 1, C);
    const int64_t groups = (C + group - 1) / group;
    parallel_for(nb * groups, block_cost * group / C + 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / groups, c0 = (t % groups) * group;
        planar(c0, std::min(C, c0 + group), BlockBegin(b, nb, m), BlockBegin(b + 1, nb, m),
               &partial[2 * b * C], &partial[(2 * b + 1) * C]);
      }
    });
  }
  // Fixed merge order: block 0, 1, ... for every channel (walked row by row in memory).
  std::fill(out1, out1 + C, 0.0);
  std::fill(out2, out2 + C, 0.0);
  for (int64_t b = 0; b < nb; ++b) {
    const double* p1 = &partial[2 * b * C];
    const double* p2 = p1 + C;
    for (int64_t c = 0; c < C; ++c) {
      out1[c] += p1[c];
      out2[c] += p2[c];
    }
  }
}

// Elementwise passes: fn(e0, e1) over pieces of the flat element range, spread over
// threads. Pieces start on multiples of kPieceElements (aligned outputs stay aligned).
template <class Fn>
void ForEachPiece(const Layout& layout, int64_t cost_per_element, const ParallelFor& parallel_for,
                  const Fn& fn) {
  const int64_t n = layout.size();
  const int64_t pieces = (n + kPieceElements - 1) / kPieceElements;
  parallel_for(pieces, cost_per_element * kPieceElements, [&](int64_t p0, int64_t p1) {
    fn(p0 * kPieceElements, std::min(n, p1 * kPieceElements));
  });
}

}  // namespace

void StreamCopy(const void* src, void* dst, int64_t nbytes, const ParallelFor& parallel_for) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  const auto copy = BestCpuKernels().stream_copy;
  parallel_for((nbytes + kChunk - 1) / kChunk, kChunk / 8, [&](int64_t b, int64_t e) {
    const int64_t begin = b * kChunk, end = std::min(nbytes, e * kChunk);
    copy(static_cast<const char*>(src) + begin, static_cast<char*>(dst) + begin, end - begin);
  });
}

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
  // The sums are of d = x - shift. A shift near the mean keeps sum(d^2) - sum(d)^2/m free
  // of cancellation (the terms are summed in U over short stretches): the first pass
  // shifts by one sample of each channel; where that sample lies far out (ShiftTooFar) a
  // second pass shifts by the mean found.
  using U = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::vector<U> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<U>(x[c * layout.inner]);
  std::vector<double> s1(static_cast<size_t>(C)), s2(static_cast<size_t>(C));
  const auto& k = Kernels<T, U>();
  const int64_t inner = layout.inner;
  for (int pass = 0; pass < 2; ++pass) {
    ReducePerChannel(
        layout,
        [&](int64_t r0, int64_t r1, double* p1, double* p2) {
          k.moments_rows(Raw(x), C, r0, r1, shift.data(), p1, p2);
        },
        [&](int64_t c0, int64_t c1, int64_t j0, int64_t j1, double* p1, double* p2) {
          k.moments_planar(Raw(x), C, inner, c0, c1, j0, j1, shift.data(), p1, p2);
        },
        s1.data(), s2.data(), parallel_for);
    bool far = false;
    const double count = static_cast<double>(m);
    for (int64_t c = 0; c < C; ++c) {
      const auto moments =
          MomentsFromShiftedSums(static_cast<double>(shift[c]), s1[c], s2[c], count);
      mean[c] = moments.mean;
      m2[c] = moments.m2;
      if (ShiftTooFar(moments, count) && std::isfinite(mean[c])) {
        far = true;
        shift[c] = static_cast<U>(mean[c]);
      }
    }
    if (!far) break;
  }
}

// A copy of a per-channel array with the periodic padding the elementwise kernels read.
// padded[j] = values[j % C], without a division per element (which cost small tensors
// more than their kernels).
template <typename U>
std::vector<U> Padded(const U* values, int64_t C) {
  std::vector<U> padded(static_cast<size_t>(C + kParamPadding));
  if (C == 0) return padded;
  std::copy(values, values + C, padded.begin());
  for (int64_t j = C; j < C + kParamPadding; ++j) padded[j] = padded[j - C];
  return padded;
}

template <typename T, typename U>
void ApplyAffine(const Layout& layout, const T* x, const U* mean_hi, const U* mean_lo, const U* a,
                 const U* b, T* y, const ParallelFor& parallel_for) {
  const auto& k = Kernels<T, U>();
  const bool stream = PrepareOutput(layout, y);
  const int64_t C = layout.channels;
  const auto ph = Padded(mean_hi, C), pl = Padded(mean_lo, C);
  const auto pa = Padded(a, C), pb = Padded(b, C);
  ForEachPiece(layout, 2, parallel_for, [&](int64_t e0, int64_t e1) {
    k.affine(Raw(x), Raw(y), C, layout.inner, e0, e1, ph.data(), pl.data(), pa.data(), pb.data(),
             stream);
  });
}

template <typename T, typename U>
void GradSums(const Layout& layout, const T* dy, const T* x, const U* mean_hi, const U* mean_lo,
              double* sum_dy, double* sum_dy_xc, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  if (layout.per_channel() == 0) {
    std::fill(sum_dy, sum_dy + C, 0.0);
    std::fill(sum_dy_xc, sum_dy_xc + C, 0.0);
    return;
  }
  const auto& k = Kernels<T, U>();
  const int64_t inner = layout.inner;
  ReducePerChannel(
      layout,
      [&](int64_t r0, int64_t r1, double* p1, double* p2) {
        k.grad_sums_rows(Raw(dy), Raw(x), C, r0, r1, mean_hi, mean_lo, p1, p2);
      },
      [&](int64_t c0, int64_t c1, int64_t j0, int64_t j1, double* p1, double* p2) {
        k.grad_sums_planar(Raw(dy), Raw(x), C, inner, c0, c1, j0, j1, mean_hi, mean_lo, p1, p2);
      },
      sum_dy, sum_dy_xc, parallel_for);
}

template <typename T, typename U>
void ApplyGrad(const Layout& layout, const T* dy, const T* x, const U* mean_hi, const U* mean_lo,
               const U* ga, const U* gb, const U* gc, T* dx, const ParallelFor& parallel_for) {
  const auto& k = Kernels<T, U>();
  const bool stream = PrepareOutput(layout, dx);
  const int64_t C = layout.channels;
  const auto ph = Padded(mean_hi, C), pl = Padded(mean_lo, C), pa = Padded(ga, C);
  const auto pb = gb ? Padded(gb, C) : std::vector<U>(), pc = gb ? Padded(gc, C) : std::vector<U>();
  ForEachPiece(layout, gb ? 3 : 1, parallel_for, [&](int64_t e0, int64_t e1) {
    k.grad(Raw(dy), Raw(x), Raw(dx), C, layout.inner, e0, e1, ph.data(), pl.data(), pa.data(),
           gb ? pb.data() : nullptr, gb ? pc.data() : nullptr, stream);
  });
}

template <typename T, typename U>
void BatchNormForwardEpilogue(const Layout& layout, const T* x, const U* scale, const U* offset,
                              const U* mean, const U* variance, const T* residual,
                              const ForwardArgs& args, T* y, U* batch_mean, U* batch_variance,
                              U* mean_lo, const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(args.epsilon);
  const int act = static_cast<int>(args.activation);
  // With a kink or curve after the normalization the gradient must see the same z: it
  // gets the variance as U, so the forward normalizes with that value too.
  const bool variance_as_u = args.activation != Activation::kIdentity;
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
      if (variance_as_u) var = static_cast<double>(static_cast<U>(var));
      const MeanParts<U> parts = SplitMean<U>(mean_d[c]);
      hi[c] = parts.hi;
      lo[c] = parts.lo;
    } else {
      var = static_cast<double>(variance[c]);
      hi[c] = mean[c];
      lo[c] = U(0);
    }
    batch_mean[c] = hi[c];
    batch_variance[c] = args.training ? static_cast<U>(var) : variance[c];
    mean_lo[c] = lo[c];
    const double inv_std = InverseStd(var, eps);
    a[c] = static_cast<U>(inv_std * (scale ? static_cast<double>(scale[c]) : 1.0));
    b[c] = offset ? offset[c] : U(0);
  }
  if (residual == nullptr && args.activation == Activation::kIdentity) {
    ApplyAffine(layout, x, hi.data(), lo.data(), a.data(), b.data(), y, parallel_for);
    return;
  }
  const auto& k = Kernels<T, U>();
  const bool stream = PrepareOutput(layout, y);
  const auto ph = Padded(hi.data(), C), pl = Padded(lo.data(), C);
  const auto pa = Padded(a.data(), C), pb = Padded(b.data(), C);
  const auto* res = residual ? Raw(residual) : nullptr;
  ForEachPiece(layout, args.activation == Activation::kSilu ? 8 : 3, parallel_for,
               [&](int64_t e0, int64_t e1) {
                 k.affine_epilogue[act](Raw(x), res, Raw(y), C, layout.inner, e0, e1, ph.data(),
                                        pl.data(), pa.data(), pb.data(), stream);
               });
}

template <typename T, typename U>
void BatchNormForward(const Layout& layout, const T* x, const U* scale, const U* offset,
                      const U* mean, const U* variance, const ForwardArgs& args, T* y,
                      U* batch_mean, U* batch_variance, U* mean_lo,
                      const ParallelFor& parallel_for) {
  BatchNormForwardEpilogue<T, U>(layout, x, scale, offset, mean, variance, nullptr, args, y,
                                 batch_mean, batch_variance, mean_lo, parallel_for);
}

template <typename T, typename U>
void BatchNormBackwardEpilogue(const Layout& layout, const T* dy, const T* x, const U* scale,
                               const U* offset, const T* residual, const U* mean, const U* mean_lo,
                               const U* variance, const U* d_batch_mean, const U* d_batch_variance,
                               const ForwardArgs& args, T* dx, T* dresidual, U* dscale, U* doffset,
                               const ParallelFor& parallel_for) {
  const int64_t C = layout.channels;
  const double eps = static_cast<double>(args.epsilon);
  const double m = static_cast<double>(layout.per_channel());
  const bool empty = layout.per_channel() == 0;
  // identity: dz = dy, the plain kernels, and dresidual (if wanted) is a copy of dy.
  const bool plain = args.activation == Activation::kIdentity;
  const int act = static_cast<int>(args.activation);
  std::vector<U> hi(C), lo(C), a(C), b(C), ga(C), gb(C), gc(C);
  std::vector<double> r(C), s(C);
  for (int64_t c = 0; c < C; ++c) {
    hi[c] = mean[c];
    lo[c] = mean_lo ? mean_lo[c] : U(0);
    r[c] = InverseStd(static_cast<double>(variance[c]), eps);
    s[c] = scale ? static_cast<double>(scale[c]) : 1.0;
    a[c] = static_cast<U>(r[c] * s[c]);  // the forward's factor, bit for bit
    b[c] = offset ? offset[c] : U(0);
  }
  const auto& k = Kernels<T, U>();
  const auto* res = residual ? Raw(residual) : nullptr;
  std::vector<double> sum_dy(C), sum_dy_xc(C);
  if (plain) {
    GradSums(layout, dy, x, hi.data(), lo.data(), sum_dy.data(), sum_dy_xc.data(), parallel_for);
  } else if (empty) {
    std::fill(sum_dy.begin(), sum_dy.end(), 0.0);
    std::fill(sum_dy_xc.begin(), sum_dy_xc.end(), 0.0);
  } else {
    // Where dresidual is wanted the sums pass writes dz there (an output, not a
    // temporary), and the apply pass reads it in place of dy instead of recomputing z.
    const bool stream = PrepareOutput(layout, dresidual);
    auto* dz = dresidual ? Raw(dresidual) : nullptr;
    const int64_t inner = layout.inner;
    ReducePerChannel(
        layout,
        [&](int64_t r0, int64_t r1, double* p1, double* p2) {
          k.epilogue_sums_rows[act](Raw(dy), Raw(x), res, C, r0, r1, hi.data(), lo.data(), a.data(),
                                    b.data(), p1, p2, dz, stream);
        },
        [&](int64_t c0, int64_t c1, int64_t j0, int64_t j1, double* p1, double* p2) {
          k.epilogue_sums_planar[act](Raw(dy), Raw(x), res, C, inner, c0, c1, j0, j1, hi.data(),
                                      lo.data(), a.data(), b.data(), p1, p2, dz, stream);
        },
        sum_dy.data(), sum_dy_xc.data(), parallel_for);
  }
  for (int64_t c = 0; c < C; ++c) {
    doffset[c] = static_cast<U>(sum_dy[c]);
    dscale[c] = empty ? U(0) : static_cast<U>(r[c] * sum_dy_xc[c]);
    ga[c] = static_cast<U>(s[c] * r[c]);
    if (args.training && !empty) {
      const double dmu = d_batch_mean ? static_cast<double>(d_batch_mean[c]) : 0.0;
      const double dvar = d_batch_variance ? static_cast<double>(d_batch_variance[c]) : 0.0;
      const auto g = TrainingGradCoefficients(s[c], r[c], sum_dy[c], sum_dy_xc[c], dmu, dvar, m);
      gb[c] = static_cast<U>(g.gb);
      gc[c] = static_cast<U>(g.gc);
    }
  }
  const bool full = args.training;
  // dz as stored in dresidual is rounded to T: for float16/bfloat16 that rounding would
  // reach dx (where dz - mean(dz) cancels, by many ulp), so there the last pass recomputes
  // z and dz in U instead, reading dy and the residual again.
  constexpr bool kReadStoredDz = std::is_same_v<T, U>;
  if (plain || (kReadStoredDz && dresidual != nullptr && !empty)) {
    // dz is dy (identity) or was written to dresidual by the sums pass.
    const T* dz = plain ? dy : dresidual;
    ApplyGrad(layout, dz, x, hi.data(), lo.data(), ga.data(), full ? gb.data() : nullptr,
              full ? gc.data() : nullptr, dx, parallel_for);
    if (!plain) return;
    if (dresidual != nullptr) {
      PrepareOutput(layout, dresidual);
      ForEachPiece(layout, 1, parallel_for,
                   [&](int64_t e0, int64_t e1) { std::copy(dy + e0, dy + e1, dresidual + e0); });
    }
    return;
  }
  // No dresidual output, or a half-precision one: the last pass recomputes z.
  const bool stream = PrepareOutput(layout, dx);
  const auto ph = Padded(hi.data(), C), pl = Padded(lo.data(), C), pa = Padded(a.data(), C);
  const auto pb = Padded(b.data(), C), pga = Padded(ga.data(), C);
  const auto pgb = full ? Padded(gb.data(), C) : std::vector<U>();
  const auto pgc = full ? Padded(gc.data(), C) : std::vector<U>();
  ForEachPiece(layout, args.activation == Activation::kSilu ? 10 : 5, parallel_for,
               [&](int64_t e0, int64_t e1) {
                 k.epilogue_grad[act](Raw(dy), Raw(x), res, Raw(dx), C, layout.inner, e0, e1,
                                      ph.data(), pl.data(), pa.data(), pb.data(), pga.data(),
                                      full ? pgb.data() : nullptr, full ? pgc.data() : nullptr,
                                      stream);
               });
}

template <typename T, typename U>
void BatchNormBackward(const Layout& layout, const T* dy, const T* x, const U* scale, const U* mean,
                       const U* mean_lo, const U* variance, const U* d_batch_mean,
                       const U* d_batch_variance, const ForwardArgs& args, T* dx, U* dscale,
                       U* doffset, const ParallelFor& parallel_for) {
  ForwardArgs plain = args;
  plain.activation = Activation::kIdentity;
  BatchNormBackwardEpilogue<T, U>(layout, dy, x, scale, nullptr, nullptr, mean, mean_lo, variance,
                                  d_batch_mean, d_batch_variance, plain, dx, nullptr, dscale,
                                  doffset, parallel_for);
}

#define TFBN_INSTANTIATE_FUSED(T, U)               \
  TFBN_INSTANTIATE(ChannelMoments<T>)              \
  TFBN_INSTANTIATE(ApplyAffine<T, U>)              \
  TFBN_INSTANTIATE(GradSums<T, U>)                 \
  TFBN_INSTANTIATE(ApplyGrad<T, U>)                \
  TFBN_INSTANTIATE(BatchNormForward<T, U>)         \
  TFBN_INSTANTIATE(BatchNormBackward<T, U>)        \
  TFBN_INSTANTIATE(BatchNormForwardEpilogue<T, U>) \
  TFBN_INSTANTIATE(BatchNormBackwardEpilogue<T, U>)
TFBN_FOR_EACH_TYPE(TFBN_INSTANTIATE_FUSED)
#undef TFBN_INSTANTIATE_FUSED

}  // namespace tfbn
