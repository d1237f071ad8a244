// The CPU inner loops built for the generic instruction set (flags set in CMakeLists.txt).
#define TFBN_ISA_NAME "generic"
#define TFBN_ISA_TABLE GenericCpuKernels
#include "core/cpu_kernel_table.inc"
