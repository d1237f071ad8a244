// The CPU inner loops built for the avx2 instruction set (flags set in CMakeLists.txt).
#define TFBN_ISA_NAME "avx2"
#define TFBN_ISA_TABLE Avx2CpuKernels
#include "core/cpu_kernel_table.inc"
