// A/B timing of two builds of the CPU kernels in one process: a base (the kernels of a
// git revision, their AVX-512 tables renamed Base...) and the working tree's. Each
// repetition runs the base's kernel, then the new one's, on the same buffers, so both see
// the same machine load; the ratio printed is base time / new time of the medians
// (above 1: the new kernels are faster), and "BITS DIFFER" where the two builds' outputs
// are not the same bits. Built and run by ab.sh; see benchmarks/README.md.
//
// Usage: ab ELEMENTS DTYPES THREADS OPS C... (environment: INNER, REPS, STREAM)
//   ELEMENTS  elements per tensor; DTYPES any of f (float32), b (bfloat16), h (float16);
//   OPS       one letter per kernel, timed in that order (the first one also warms up):
//             m moments_rows, g grad_sums_rows, e epilogue_sums_rows (relu, dz out),
//             a affine (channels-last), d grad (channels-last), w weighted_moments_rows,
//             M moments_planar, G grad_sums_planar, p affine (planar), q grad (planar);
//   C...      channel counts; INNER = elements per plane for the planar kernels (1);
//             STREAM=0: outputs with plain stores (1: non-temporal, as the driver does
//             for outputs of 4 MiB and more).
// The work is cut into tasks as the driver (batch_norm_cpu.cc) cuts it, and THREADS
// threads take equal runs of them.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/cpu_kernels.h"

namespace tfbn {
const CpuKernelTable& BaseAvx512Bf16CpuKernels();
}  // namespace tfbn

namespace {

using namespace tfbn;

int g_threads = 1;
int g_reps = 11;
int64_t g_inner = 1;
bool g_stream = true;

// Runs task(i) for i in [0, n), THREADS threads each taking an equal run of tasks.
template <class Task>
void Parallel(int64_t n, Task task) {
  if (g_threads == 1) {
    for (int64_t i = 0; i < n; ++i) task(i);
    return;
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < g_threads; ++t)
    threads.emplace_back([&, t] {
      for (int64_t i = t * n / g_threads; i < (t + 1) * n / g_threads; ++i) task(i);
    });
  for (auto& th : threads) th.join();
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename T>
T FromFloat(float v);
template <>
float FromFloat<float>(float v) {
  return v;
}
template <>
BFloat16Bits FromFloat<BFloat16Bits>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return BFloat16Bits{static_cast<uint16_t>(u >> 16)};
}
template <>
HalfBits FromFloat<HalfBits>(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  HalfBits b;
  std::memcpy(&b, &h, 2);
  return b;
}

// A 64-byte aligned buffer, as TensorFlow's allocator gives (an unaligned one would take
// the kernels' slower unaligned walks).
template <typename T>
T* Aligned(int64_t n) {
  return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
}

template <typename T>
void Run(const char* name, const CpuKernels<T, float>& base, const CpuKernels<T, float>& fresh,
         int64_t total, const std::vector<int64_t>& channels, const std::string& ops) {
  T* x = Aligned<T>(total);
  T* dy = Aligned<T>(total);
  T* y = Aligned<T>(total);
  std::memset(static_cast<void*>(y), 0, total * sizeof(T));
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(1.f, 2.f);
  for (int64_t i = 0; i < total; ++i) x[i] = FromFloat<T>(normal(gen));
  for (int64_t i = 0; i < total; ++i) dy[i] = FromFloat<T>(normal(gen));
  for (const int64_t C : channels) {
    const int64_t inner = g_inner, per_channel = total / C, Cp = C + kParamPadding;
    if (total % (C * inner) != 0) {
      std::fprintf(stderr, "\nELEMENTS %ld is not a multiple of C * INNER = %ld * %ld\n",
                   static_cast<long>(total), static_cast<long>(C), static_cast<long>(inner));
      std::exit(2);
    }
    std::vector<float> shift(Cp), hi(Cp), lo(Cp, 0.f), a(Cp, 1.5f), b(Cp, .5f), ga(Cp, .3f),
        gb(Cp, .2f), gc(Cp, .1f);
    for (int64_t c = 0; c < Cp; ++c) shift[c] = hi[c] = 1.f + 0.01f * (c % C);
    std::vector<float> w(per_channel);
    for (int64_t j = 0; j < per_channel; ++j) w[j] = (j % 5 == 3) ? 0.f : 1.f;
    // Tasks as the driver cuts them: row blocks of channels-last reductions, sample blocks
    // times channel groups of planar ones, 16384-element chunks of elementwise passes.
    const int64_t row_blocks = std::min<int64_t>(64, std::max<int64_t>(8, 262144 / (16 * C)));
    const int64_t chunks = (total + 16383) / 16384;
    const int64_t sample_blocks =
        std::max<int64_t>(1, std::min<int64_t>(64, (per_channel + 65535) / 65536));
    const int64_t group = std::clamp<int64_t>(sample_blocks * C / 16, 1, C);
    const int64_t groups = (C + group - 1) / group;
    const int64_t blocks = std::max(row_blocks, sample_blocks);
    std::vector<double> partials(2 * blocks * C);
    auto s1 = [&](int64_t k) { return &partials[2 * k * C]; };
    auto s2 = [&](int64_t k) { return &partials[2 * k * C + C]; };
    std::printf("%s C=%5ld", name, static_cast<long>(C));
    for (const char op : ops) {
      auto once = [&](const CpuKernels<T, float>& k) {
        auto by_rows = [&](auto kernel) {
          Parallel(row_blocks, [&](int64_t q) {
            kernel(per_channel * q / row_blocks, per_channel * (q + 1) / row_blocks, q);
          });
        };
        auto planar = [&](auto kernel) {
          Parallel(sample_blocks * groups, [&](int64_t t) {
            const int64_t sb = t / groups, c0 = (t % groups) * group;
            kernel(c0, std::min(C, c0 + group), per_channel * sb / sample_blocks,
                   per_channel * (sb + 1) / sample_blocks, sb);
          });
        };
        auto flat = [&](auto kernel) {
          Parallel(chunks, [&](int64_t i) {
            kernel(i * 16384, std::min<int64_t>(total, (i + 1) * 16384));
          });
        };
        switch (op) {
          case 'm':
            by_rows([&](int64_t r0, int64_t r1, int64_t q) {
              k.moments_rows(x, C, r0, r1, shift.data(), s1(q), s2(q));
            });
            break;
          case 'g':
            by_rows([&](int64_t r0, int64_t r1, int64_t q) {
              k.grad_sums_rows(dy, x, C, r0, r1, hi.data(), lo.data(), s1(q), s2(q));
            });
            break;
          case 'e':
            by_rows([&](int64_t r0, int64_t r1, int64_t q) {
              k.epilogue_sums_rows[1](dy, x, x, C, r0, r1, hi.data(), lo.data(), a.data(), b.data(),
                                      s1(q), s2(q), y, g_stream);
            });
            break;
          case 'w':
            by_rows([&](int64_t r0, int64_t r1, int64_t q) {
              k.weighted_moments_rows(x, w.data(), 1.f, C, r0, r1, shift.data(), s1(q), s2(q));
            });
            break;
          case 'a':
          case 'p':
            flat([&](int64_t e0, int64_t e1) {
              k.affine(x, y, C, op == 'a' ? 1 : inner, e0, e1, hi.data(), lo.data(), a.data(),
                       b.data(), g_stream);
            });
            break;
          case 'd':
          case 'q':
            flat([&](int64_t e0, int64_t e1) {
              k.grad(dy, x, y, C, op == 'd' ? 1 : inner, e0, e1, hi.data(), lo.data(), ga.data(),
                     gb.data(), gc.data(), g_stream);
            });
            break;
          case 'M':
            planar([&](int64_t c0, int64_t c1, int64_t j0, int64_t j1, int64_t sb) {
              k.moments_planar(x, C, inner, c0, c1, j0, j1, shift.data(), s1(sb), s2(sb));
            });
            break;
          case 'G':
            planar([&](int64_t c0, int64_t c1, int64_t j0, int64_t j1, int64_t sb) {
              k.grad_sums_planar(dy, x, C, inner, c0, c1, j0, j1, hi.data(), lo.data(), s1(sb),
                                 s2(sb));
            });
            break;
          default:
            std::fprintf(stderr, "\nunknown op '%c'\n", op);
            std::exit(2);
        }
      };
      std::vector<double> t_base, t_new;
      once(base);
      once(fresh);
      for (int i = 0; i < g_reps; ++i) {
        const double t0 = Now();
        once(base);
        const double t1 = Now();
        once(fresh);
        const double t2 = Now();
        t_base.push_back(t1 - t0);
        t_new.push_back(t2 - t1);
      }
      std::sort(t_base.begin(), t_base.end());
      std::sort(t_new.begin(), t_new.end());
      const double mb = t_base[g_reps / 2] * 1e3, mn = t_new[g_reps / 2] * 1e3;
      // The same bits from both builds: the outputs (the partial sums, y) after one call
      // of each, from the same starting state.
      std::fill(partials.begin(), partials.end(), 0.0);
      once(base);
      const std::vector<double> partials_base = partials;
      const std::vector<T> y_base(y, y + total);
      std::fill(partials.begin(), partials.end(), 0.0);
      once(fresh);
      const bool same =
          std::memcmp(partials.data(), partials_base.data(), partials.size() * 8) == 0 &&
          std::memcmp(y, y_base.data(), total * sizeof(T)) == 0;
      std::printf("  %c %.3f/%.3f=%.2fx%s", op, mb, mn, mb / mn, same ? "" : " BITS DIFFER");
      std::fflush(stdout);
    }
    std::printf("\n");
  }
  std::free(x), std::free(dy), std::free(y);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s ELEMENTS DTYPES THREADS OPS C... (see ab.cc)\n", argv[0]);
    return 2;
  }
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::fprintf(stderr, "ab compares the AVX-512 BF16 tables: this CPU lacks avx512_bf16\n");
    return 2;
  }
  const CpuKernelTable& base = BaseAvx512Bf16CpuKernels();
  const CpuKernelTable& fresh = Avx512Bf16CpuKernels();
  const int64_t total = std::atoll(argv[1]);
  const std::string dtypes = argv[2];
  g_threads = std::atoi(argv[3]);
  const std::string ops = argv[4];
  if (const char* v = std::getenv("INNER")) g_inner = std::atoll(v);
  if (const char* v = std::getenv("REPS")) g_reps = std::atoi(v);
  if (const char* v = std::getenv("STREAM")) g_stream = std::atoi(v) != 0;
  std::vector<int64_t> channels;
  for (int i = 5; i < argc; ++i) channels.push_back(std::atoll(argv[i]));
  if (dtypes.find('f') != std::string::npos)
    Run<float>("f32 ", base.f32, fresh.f32, total, channels, ops);
  if (dtypes.find('b') != std::string::npos)
    Run<BFloat16Bits>("bf16", base.bfloat16, fresh.bfloat16, total, channels, ops);
  if (dtypes.find('h') != std::string::npos)
    Run<HalfBits>("f16 ", base.half, fresh.half, total, channels, ops);
}
