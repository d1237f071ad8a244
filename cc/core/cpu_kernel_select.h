// The CPU drivers' view of the kernel table (cpu_kernels.h): Eigen's half types mapped onto
// the kernels' storage stand-ins, and the kernels of the instruction set chosen at run time
// for a data type T and its compute type U. For the drivers only (built for the baseline
// instruction set); the per-ISA kernels never include Eigen.
#pragma once

#include <Eigen/Core>  // Eigen::half, Eigen::bfloat16: the same types TensorFlow uses.

#include "core/cpu_kernels.h"

namespace tfbn {
namespace cpu {

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<Eigen::half> {
  using type = HalfBits;
};
template <>
struct Storage<Eigen::bfloat16> {
  using type = BFloat16Bits;
};
static_assert(sizeof(Eigen::half) == sizeof(HalfBits) &&
              sizeof(Eigen::bfloat16) == sizeof(BFloat16Bits));

template <typename T>
using S = typename Storage<T>::type;

template <typename T>
inline const S<T>* Raw(const T* p) {
  return reinterpret_cast<const S<T>*>(p);
}
template <typename T>
inline S<T>* Raw(T* p) {
  return reinterpret_cast<S<T>*>(p);
}

template <typename T, typename U>
const CpuKernels<S<T>, U>& Kernels();
template <>
inline const CpuKernels<HalfBits, float>& Kernels<Eigen::half, float>() {
  return BestCpuKernels().half;
}
template <>
inline const CpuKernels<BFloat16Bits, float>& Kernels<Eigen::bfloat16, float>() {
  return BestCpuKernels().bfloat16;
}
template <>
inline const CpuKernels<float, float>& Kernels<float, float>() {
  return BestCpuKernels().f32;
}
template <>
inline const CpuKernels<double, double>& Kernels<double, double>() {
  return BestCpuKernels().f64;
}

}  // namespace cpu
}  // namespace tfbn
