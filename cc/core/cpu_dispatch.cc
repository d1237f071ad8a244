// Picks the CPU kernels for the instruction sets this processor has, once.
#include <cstdlib>
#include <cstring>

#include "core/cpu_kernels.h"

namespace tfbn {
namespace {

const CpuKernelTable& Detect() {
#if defined(TFBN_X86_ISAS)
  const char* forced = std::getenv("TFBN_CPU_ISA");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return GenericCpuKernels();
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0 && avx2) return Avx2CpuKernels();
  if (avx512) return Avx512CpuKernels();
  if (avx2) return Avx2CpuKernels();
#endif
  return GenericCpuKernels();
}

}  // namespace

const CpuKernelTable& BestCpuKernels() {
  static const CpuKernelTable& table = Detect();
  return table;
}

}  // namespace tfbn
