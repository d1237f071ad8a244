// Host side of the CUDA kernels: launching a kernel of the embedded images by its name.
//
// Kernels are named by their NVRTC name expression, the template-id as written in the
// device sources, e.g. "tfbn::cuda::ReduceRowsKernel<tfbn::cuda::MomentsOp<float>, true>".
// Every name a launcher may ask for must be listed by one of the ForEach*KernelName
// functions (kernel_names.h): the build compiles exactly those instantiations, for every
// architecture.
//
// Kernel arguments are passed by address, as cuLaunchKernel takes them: each must have the
// size and layout of the kernel's parameter (int64_t for int64_t, a pointer for a pointer,
// the same struct from kernel_args.h for a struct).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/batch_norm_cuda.h"

namespace tfbn {
namespace cuda {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Enqueues kernel `name` on `stream`, in the stream's context (the current context for the
// legacy default stream), loading the context's module at its first use.
Result LaunchKernel(const std::string& name, Dim3 grid, Dim3 block, size_t shared_bytes,
                    Stream stream, void** args);

template <class... Args>
Result Launch(const std::string& name, Dim3 grid, Dim3 block, size_t shared_bytes, Stream stream,
              const Args&... args) {
  void* pointers[] = {const_cast<void*>(static_cast<const void*>(&args))..., nullptr};
  return LaunchKernel(name, grid, block, shared_bytes, stream, pointers);
}

// In a launcher: returns the result of a launch (or of a launcher) that failed, so a
// sequence of launches stops at the first failure.
#define TFBN_LAUNCH(expr)                                \
  do {                                                   \
    const Result launch_result = (expr);                 \
    if (launch_result != kSuccess) return launch_result; \
  } while (0)

// Blocks of `block_threads` threads (no dynamic shared memory) of kernel `name` that the
// stream's device holds at once, over all its SMs; 0 when the driver cannot say.
int64_t ResidentBlocks(const std::string& name, int block_threads, Stream stream);

// "name<arg, arg>": a name expression from a template name and its arguments.
std::string Instance(const std::string& templ, std::initializer_list<std::string> args);

// The device type name of a DType ("__half", "__nv_bfloat16", "float", "double").
const char* DeviceTypeName(DType dtype);

}  // namespace cuda
}  // namespace tfbn
