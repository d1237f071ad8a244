// The epilogue's activations y = act(z) and their gradients dy * act'(z), written once for
// scalars and for GCC lane vectors (the CPU kernels use both: lanes in the body, scalars
// for heads and tails, and they must agree bit for bit).
//
// Only IEEE operations, compares and selects, so a scalar and a lane give the same bits on
// every instruction set (the kernels are built without FMA contraction). act'(z) follows
// TensorFlow's gradients: relu passes dy where z > 0, relu6 where 0 < z < 6, silu
// multiplies by s * (1 + z * (1 - s)), s = sigmoid(z). NaN z gives NaN y (relu, relu6:
// the comparisons are false) and zero dz (relu, relu6).
//
// Every function is static: the CPU kernels include this header in translation units
// built for different instruction sets, and a shared (inline, external) copy could let
// one built for AVX-512 run where only the baseline is supported.
#pragma once

#if defined(__CUDACC_RTC__)  // NVRTC has libcu++ in place of the standard headers
#include <cuda/std/cstdint>
#include <cuda/std/limits>
#include <cuda/std/type_traits>
#include <cuda/std/utility>
#else
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#endif

#include "core/activation.h"
#include "core/host_device.h"

namespace tfbn {
namespace activation_math {

#if defined(__CUDACC_RTC__)
namespace stdx = ::cuda::std;
#else
namespace stdx = ::std;
#endif

// V's element type S and the integers I of the same width (a lane vector's compare
// result is the integer vector of its width).
template <typename V, typename = void>
struct Elements {
  using S = V;
  using I = stdx::conditional_t<sizeof(V) == 4, int32_t, int64_t>;
};
template <typename V>
struct Elements<V, stdx::void_t<decltype(stdx::declval<V>()[0])>> {
  using S = stdx::remove_cv_t<stdx::remove_reference_t<decltype(stdx::declval<V>()[0])>>;
  using I = decltype(stdx::declval<V>() < stdx::declval<V>());
};

template <typename V, typename S>
static TFBN_HD V Splat(S v) {
  return V{} + static_cast<typename Elements<V>::S>(v);
}

// exp(x): Cephes' expf / exp (range reduction by ln 2 in two parts, then a polynomial,
// for double a rational function), scaled by 2^n through the exponent bits. Within 2 ulp
// for float, 1 ulp for double; the argument is clamped to keep 2^n a normal number, and
// above the clamp the result is +inf (so the sigmoid is exactly 0 there: a clamped exp
// leaves it a denormal, and silu(z) = z * s of a huge negative z would not be near 0).
template <typename V>
static TFBN_HD V Exp(V x) {
  using S = typename Elements<V>::S;
  using I = typename Elements<V>::I;
  constexpr bool kFloat = stdx::is_same_v<S, float>;
  const V hi = Splat<V>(kFloat ? 88.0 : 709.0), lo = Splat<V>(kFloat ? -87.0 : -708.0);
  const auto overflow = x > hi;
  x = x > hi ? hi : x;  // NaN stays NaN through both selects and the polynomial
  x = x < lo ? lo : x;
  constexpr S kMagic = kFloat ? S(12582912.0) : S(6755399441055744.0);  // 1.5 * 2^(digits-1)
  V k = (x * S(1.44269504088896340736) + kMagic) - kMagic;  // round to nearest integer
  k = k == k ? k : V{};                                      // no NaN into the conversion
  V p;
  if constexpr (kFloat) {
    const V r = (x - k * S(0.693359375)) - k * S(-2.12194440e-4);
    const V r2 = r * r;
    p = (((((S(1.9875691500e-4) * r + S(1.3981999507e-3)) * r + S(8.3334519073e-3)) * r +
           S(4.1665795894e-2)) *
              r +
          S(1.6666665459e-1)) *
             r +
         S(5.0000001201e-1)) *
            r2 +
        r + S(1.0);
  } else {
    const V r = (x - k * S(6.93145751953125e-1)) - k * S(1.42860682030941723212e-6);
    const V r2 = r * r;
    const V px = r * ((S(1.26177193074810590878e-4) * r2 + S(3.02994407707441961300e-2)) * r2 +
                      S(9.99999999999999999910e-1));
    const V qx = ((S(3.00198505138664455042e-6) * r2 + S(2.52448340349684104192e-3)) * r2 +
                  S(2.27265548208155028766e-1)) *
                     r2 +
                 S(2.00000000000000000009e0);
    p = S(1.0) + S(2.0) * (px / (qx - px));
  }
  I n;
  if constexpr (stdx::is_same_v<V, S>) {
    n = static_cast<I>(k);
  } else {
#if !defined(__CUDACC_RTC__)  // lane vectors are host-only
    n = __builtin_convertvector(k, I);
#endif
  }
  constexpr int kMantissa = kFloat ? 23 : 52;
  constexpr int kBias = kFloat ? 127 : 1023;
  const V e = p * __builtin_bit_cast(V, static_cast<I>((n + kBias) << kMantissa));
  return overflow ? Splat<V>(stdx::numeric_limits<S>::infinity()) : e;
}

template <typename V>
static TFBN_HD V Sigmoid(V z) {
  return Splat<V>(1.0) / (Splat<V>(1.0) + Exp(-z));
}

// y = act(z)
template <Activation kAct, typename V>
static TFBN_HD V Activate(V z) {
  if constexpr (kAct == Activation::kRelu) {
    return z < V{} ? V{} : z;
  } else if constexpr (kAct == Activation::kRelu6) {
    const V six = Splat<V>(6.0);
    return z < V{} ? V{} : (z > six ? six : z);
  } else if constexpr (kAct == Activation::kSilu) {
    return z * Sigmoid(z);
  } else {
    return z;
  }
}

// dy * act'(z)
template <Activation kAct, typename V>
static TFBN_HD V ActivationGrad(V dy, V z) {
  if constexpr (kAct == Activation::kRelu) {
    return z > V{} ? dy : V{};
  } else if constexpr (kAct == Activation::kRelu6) {
    return (z > V{}) & (z < Splat<V>(6.0)) ? dy : V{};
  } else if constexpr (kAct == Activation::kSilu) {
    const V s = Sigmoid(z);
    return (dy * s) * (Splat<V>(1.0) + z * (Splat<V>(1.0) - s));
  } else {
    return dy;
  }
}

}  // namespace activation_math
}  // namespace tfbn
