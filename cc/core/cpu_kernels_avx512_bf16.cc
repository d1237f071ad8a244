// The CPU inner loops built for avx512 plus AVX512_BF16 (flags set in CMakeLists.txt): the
// bfloat16 kernels round with vcvtneps2bf16; every other kernel is avx512's.
#define TFBN_ISA_NAME "avx512_bf16"
#define TFBN_ISA_TABLE Avx512Bf16CpuKernels
#define TFBN_ISA_BASE Avx512CpuKernels
#include "core/cpu_kernel_table.inc"
