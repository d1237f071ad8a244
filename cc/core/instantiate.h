// Explicit instantiation of the core's templates without restating their signatures: each
// entry point is declared once in batch_norm.h, defined once in its .cc, and instantiated
// here by name for every type the kernels support.
#pragma once

#include <Eigen/Core>  // Eigen::half, Eigen::bfloat16: the same types TensorFlow uses.

// X(T, U) for every data type T with its parameter and statistics type U.
#define TFBN_FOR_EACH_TYPE(X) \
  X(Eigen::half, float)       \
  X(Eigen::bfloat16, float)   \
  X(float, float)             \
  X(double, double)

// Explicitly instantiates one specialization, e.g. TFBN_INSTANTIATE(ApplyAffine<float, float>),
// with the signature its declaration already gives.
#define TFBN_INSTANTIATE(...) template decltype(__VA_ARGS__) __VA_ARGS__;
