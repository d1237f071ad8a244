// The CUDA driver API as tfbn uses it: libcuda.so.1 opened with dlopen at first use (never
// on a machine that makes no GPU call), modules of the embedded images loaded per context,
// kernels launched by name (launch.h). These few calls also serve the Python module, which
// takes device pointers from any framework.
#pragma once

#include <cstddef>

#include "core/batch_norm_cuda.h"

namespace tfbn {
namespace cuda {

// The context that owns device memory at `pointer` and its device ordinal.
Result PointerContext(const void* pointer, void** context, int* device);

// Stream-ordered device memory in `context` (cuMemAllocAsync), or plain cuMemAlloc where
// the device has no stream-ordered allocator (*synchronous is then true: free it after
// synchronizing the stream).
Result AllocateAsync(void* context, size_t bytes, Stream stream, void** pointer, bool* synchronous);
Result FreeAsync(void* context, void* pointer, Stream stream, bool synchronous);

}  // namespace cuda
}  // namespace tfbn
