// TFBN_HD marks the functions of the shared math headers: host and device functions under
// nvcc, plain inline functions elsewhere.
#pragma once

#if defined(__CUDACC__)
#define TFBN_HD __host__ __device__ __forceinline__
#else
#define TFBN_HD inline
#endif
