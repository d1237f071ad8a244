// Picks the CPU kernels once: the best instruction set this processor supports, or the one
// TFBN_CPU_ISA names. A request that cannot be honoured (an unknown name, or an instruction
// set this processor lacks) is not silent: the best supported set runs instead, a warning
// goes to stderr once, and CpuInstructionSetWarning() says why.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/batch_norm.h"
#include "core/cpu_kernels.h"

namespace tfbn {
namespace {

struct Choice {
  const CpuKernelTable* table = nullptr;
  std::string supported;  // e.g. "generic avx2 avx512"
  std::string requested;  // TFBN_CPU_ISA, "" when unset
  std::string warning;    // why the request was not honoured, "" when it was
};

Choice Choose() {
  Choice choice;
  bool avx2 = false, avx512 = false, avx512_bf16 = false;
#if defined(TFBN_X86_ISAS)
  avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
  avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  const CpuKernelTable* best = &GenericCpuKernels();
  choice.supported = "generic";
#if defined(TFBN_X86_ISAS)
  if (avx2) best = &Avx2CpuKernels(), choice.supported += " avx2";
  if (avx512) best = &Avx512CpuKernels(), choice.supported += " avx512";
  if (avx512_bf16) best = &Avx512Bf16CpuKernels(), choice.supported += " avx512_bf16";
#endif
  choice.table = best;
  const char* forced = std::getenv("TFBN_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0') return choice;
  choice.requested = forced;
  const std::string name = forced;
  if (name == "generic") {
    choice.table = &GenericCpuKernels();
  } else if (name == "avx2" || name == "avx512" || name == "avx512_bf16") {
    const bool have = name == "avx2" ? avx2 : name == "avx512" ? avx512 : avx512_bf16;
    if (have) {
#if defined(TFBN_X86_ISAS)
      choice.table = name == "avx2"     ? &Avx2CpuKernels()
                     : name == "avx512" ? &Avx512CpuKernels()
                                        : &Avx512Bf16CpuKernels();
#endif
    } else {
      choice.warning = "TFBN_CPU_ISA=" + name +
                       " asks for an instruction set this processor "
                       "(or this build) lacks; it supports " +
                       choice.supported + ", so the " + best->isa + " kernels run";
    }
  } else {
    choice.warning = "TFBN_CPU_ISA=" + name +
                     " is not an instruction set of tfbn (generic, "
                     "avx2, avx512 or avx512_bf16); the " +
                     std::string(best->isa) + " kernels run";
  }
  if (!choice.warning.empty()) std::fprintf(stderr, "tfbn: warning: %s\n", choice.warning.c_str());
  return choice;
}

const Choice& Chosen() {
  static const Choice choice = Choose();
  return choice;
}

}  // namespace

const CpuKernelTable& BestCpuKernels() { return *Chosen().table; }

const char* CpuInstructionSet() { return Chosen().table->isa; }
const char* CpuInstructionSetsSupported() { return Chosen().supported.c_str(); }
const char* CpuInstructionSetRequested() { return Chosen().requested.c_str(); }
const char* CpuInstructionSetWarning() { return Chosen().warning.c_str(); }

}  // namespace tfbn
