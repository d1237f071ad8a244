// The core's ParallelFor over TensorFlow's intra-op thread pool (CPU kernels). The core's
// fixed partition keeps results independent of the pool's size.
#pragma once

#include "core/batch_norm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tfbn {

inline ParallelFor IntraOpParallelFor(tensorflow::OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [pool](int64_t n, int64_t cost, const RangeFn& fn) {
    using Params = tensorflow::thread::ThreadPool::SchedulingParams;
    if (n > 0) pool->ParallelFor(n, Params::Adaptive(cost), fn);
  };
}

}  // namespace tfbn
