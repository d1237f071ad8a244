// Runs the weighted split kernels (cc/core/batch_norm_weighted.cc) on fixed pseudo-random
// data in four layouts and four dtypes and prints a hash of every output's bytes.
// test_weighted_isa.py builds it once per instruction set and compares the hashes.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include <Eigen/Core>

#include "core/batch_norm.h"

namespace {

uint64_t hash = 1469598103934665603ull;  // FNV-1a

void Mix(const void* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    hash ^= static_cast<const unsigned char*>(p)[i];
    hash *= 1099511628211ull;
  }
}

template <typename T, typename U>
void Run(const tfbn::Layout& layout) {
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<T> x(layout.size()), dy(layout.size()), dx(layout.size());
  std::vector<float> w(layout.per_channel());
  for (auto& v : x) v = T(normal(gen));
  for (auto& v : dy) v = T(normal(gen));
  for (auto& v : w) v = uniform(gen) < 0.3f ? 0.0f : 2.0f * uniform(gen);
  const tfbn::ParallelFor serial = [](int64_t n, int64_t, const tfbn::RangeFn& fn) {
    for (int64_t i = 0; i < n; ++i) fn(i, i + 1);
  };
  const int64_t C = layout.channels;
  std::vector<double> partial(3 * C), sums(4 * C), count(C);
  tfbn::WeightedPartialMoments<T>(layout, x.data(), w.data(), partial.data(), serial);
  Mix(partial.data(), partial.size() * sizeof(double));
  std::vector<U> mean(C), lo(C, U(0)), var(C), scale(C), dscale(C), doffset(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = U(partial[C + c]);
    var[c] = U(partial[2 * C + c] / partial[c]);
    scale[c] = U(1.0 + 0.01 * c);
    count[c] = partial[c];
    sums[c] = 0.5 * c, sums[C + c] = -0.25 * c, sums[2 * C + c] = 0.1, sums[3 * C + c] = 0.2;
  }
  tfbn::WeightedApplyGradWithSums<T, U>(layout, dy.data(), x.data(), scale.data(), mean.data(),
                                        lo.data(), var.data(), sums.data(), sums.data(), 4,
                                        count.data(), w.data(), 1e-3f, dx.data(), dscale.data(),
                                        doffset.data(), serial);
  Mix(dx.data(), dx.size() * sizeof(T));
  Mix(dscale.data(), C * sizeof(U));
}

}  // namespace

int main() {
  for (const tfbn::Layout& layout : {tfbn::Layout{3000, 64, 1}, tfbn::Layout{700, 517, 1},
                                     tfbn::Layout{16, 8, 1023}, tfbn::Layout{4, 37, 49},
                                     tfbn::Layout{50, 1500, 1}}) {
    Run<float, float>(layout);
    Run<double, double>(layout);
    Run<Eigen::half, float>(layout);
    Run<Eigen::bfloat16, float>(layout);
  }
  std::printf("%016llx\n", static_cast<unsigned long long>(hash));
  return 0;
}
