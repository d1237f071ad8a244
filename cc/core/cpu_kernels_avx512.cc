// The CPU inner loops built for the avx512 instruction set (flags set in CMakeLists.txt).
#define TFBN_ISA_NAME "avx512"
#define TFBN_ISA_TABLE Avx512CpuKernels
#include "core/cpu_kernel_table.inc"
