// Large outputs on the CPU: where TensorFlow's CPU allocator is the plain one (glibc's
// malloc, which is what TensorFlow uses when oneDNN is off), the op takes its large
// outputs from a small cache of blocks it has used before.
//
// Why: glibc serves a block of tens of MB with a fresh mmap, or from heap memory it has
// just given back to the kernel, whenever other ops' allocations have moved its
// thresholds; every page of it is then a page fault and a zero-fill on first write,
// which costs more than the op itself (measured 2-3x on a 25 MB forward). oneDNN's
// caching allocator hides that when oneDNN is on; this cache gives the same to tfbn's
// outputs when it is off, so that tfbn's speed does not depend on that setting. Training
// asks for the same sizes step after step, so a block freed by one step is the next
// step's output.
#pragma once

#include "absl/types/span.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace tfbn {

// Output `index` of `shape` for an op that writes all of it: takes over the first of
// `candidates` (inputs) that TensorFlow lets it forward; otherwise, on the CPU with
// TensorFlow's plain allocator and at least kReuseMinBytes, a block from the cache;
// otherwise TensorFlow's allocate_output.
absl::Status ForwardOrAllocateLarge(tensorflow::OpKernelContext* ctx,
                                    absl::Span<const int> candidates, int index,
                                    const tensorflow::TensorShape& shape, tensorflow::Tensor** out);

}  // namespace tfbn
