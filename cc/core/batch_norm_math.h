// The per-channel formulas of BatchNorm, written once: the CPU drivers, the CUDA finalize
// kernels and (as templates over the value type) the XLA lowerings evaluate these, so every
// path normalizes and differentiates with the same operations in the same order, which is
// what keeps their bits equal.
//
// D is the wide type the formulas are evaluated in (double on the CPU and GPU; an
// xla::XlaOp in an XLA lowering, which specializes FormulaOps for it), U the per-channel
// parameter type (float, or double for double data).
#pragma once

#if !defined(__CUDACC_RTC__)  // NVRTC has the device math built in, and no <cmath>
#include <cmath>
#endif

#include "core/host_device.h"

namespace tfbn {

// How the formulas make a constant and a square root of D. An XLA lowering specializes it:
//   template <> struct FormulaOps<xla::XlaOp> {
//     static xla::XlaOp Constant(xla::XlaOp like, double v) { return xla::ScalarLike(like, v); }
//     static xla::XlaOp Sqrt(xla::XlaOp v) { return xla::Sqrt(v); }
//   };
template <typename D>
struct FormulaOps {
  static TFBN_HD D Constant(const D&, double value) { return static_cast<D>(value); }
  static TFBN_HD D Sqrt(const D& value) { return ::sqrt(value); }
};

// r = 1 / sqrt(variance + epsilon).
template <typename D>
TFBN_HD D InverseStd(const D& variance, const D& epsilon) {
  return FormulaOps<D>::Constant(variance, 1.0) / FormulaOps<D>::Sqrt(variance + epsilon);
}

// The mean as two parts of U, hi = U(mean) and lo = U(mean - hi): x is centred as
// (x - hi) - lo, which keeps the data's precision when the mean is far from zero.
template <typename U>
struct MeanParts {
  U hi, lo;
};
template <typename U, typename D>
TFBN_HD MeanParts<U> SplitMean(const D& mean) {
  const U hi = static_cast<U>(mean);
  return {hi, static_cast<U>(mean - static_cast<D>(hi))};
}

// (x - hi) - lo: x centred on the mean carried in two parts.
template <typename V>
TFBN_HD V Centre(const V& x, const V& hi, const V& lo) {
  return (x - hi) - lo;
}

// Mean and M2 (sum of squared deviations) of `count` values from the sums of their
// deviations from a shift, s1 = sum (x - shift) and s2 = sum (x - shift)^2 (weighted
// sums and the weight sum as count work the same). M2 is clamped at zero, where rounding
// can take it below; NaN passes through. `deviation` is the mean's distance from the shift.
template <typename D>
struct ShiftedMoments {
  D mean, m2, deviation;
};
template <typename D>
TFBN_HD ShiftedMoments<D> MomentsFromShiftedSums(const D& shift, const D& s1, const D& s2,
                                                 const D& count) {
  const D d = s1 / count;
  const D v = s2 - s1 * d;
  return {shift + d, v < D(0) ? D(0) : v, d};
}

// A shift further than this many standard deviations from the mean costs precision in
// s2 - s1^2 / count: the statistics are then summed again, shifted by the mean found.
constexpr double kFarShift = 8.0;
template <typename D>
TFBN_HD bool ShiftTooFar(const ShiftedMoments<D>& moments, const D& count) {
  const D d = moments.deviation;
  return d * d > D(kFarShift * kFarShift) * (moments.m2 / count);
}

// The backward pass's per-channel coefficients, dx = ga * dy + gb * ((x - hi) - lo) + gc:
//   dx = s*r*(dy - sum_dy/m - xhat*sum_dy_xhat/m) + d_mean/m + 2*d_variance*(x - mean)/m
// with s the scale, r the inverse std, sum_dy and sum_dy_xc = sum dy * ((x - hi) - lo) over
// the batch of m elements (or weight sum m: the weighted kernels then scale gb and gc by
// each element's weight), and d_mean, d_variance the gradients reaching the forward's
// statistics outputs. Inference: ga only (gb = gc = 0).
template <typename D>
struct GradCoefficients {
  D ga, gb, gc;
};
template <typename D>
TFBN_HD GradCoefficients<D> TrainingGradCoefficients(const D& s, const D& r, const D& sum_dy,
                                                     const D& sum_dy_xc, const D& d_mean,
                                                     const D& d_variance, const D& m) {
  // (d_variance + d_variance) is 2 * d_variance exactly, without a constant of type D.
  return {s * r, -s * r * r * r * sum_dy_xc / m + (d_variance + d_variance) / m,
          -s * r * sum_dy / m + d_mean / m};
}

}  // namespace tfbn
