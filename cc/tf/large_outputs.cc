#include "tf/large_outputs.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "tensorflow/core/framework/allocator.h"

namespace tfbn {
namespace {

// Below this, glibc serves blocks from its arenas, whose pages stay mapped.
constexpr size_t kReuseMinBytes = size_t{1} << 20;
constexpr size_t kAlignment = 64;  // TensorFlow's EIGEN_MAX_ALIGN_BYTES on x86-64

// How many bytes of freed blocks the cache may hold: TFBN_OUTPUT_CACHE_BYTES if set (0
// turns the cache off), else an eighth of the machine's memory, at most 2 GiB.
size_t CacheLimit() {
  const char* env = std::getenv("TFBN_OUTPUT_CACHE_BYTES");
  if (env != nullptr && *env != '\0') return static_cast<size_t>(std::strtoull(env, nullptr, 10));
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const size_t memory = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : 0;
  return std::min(memory / 8, size_t{2} << 30);
}

// Blocks freed by TensorFlow are kept, by size, for the next request of that size (the
// most recently freed first: its pages are the likeliest to be cached), up to
// CacheLimit() bytes; beyond that they go back to malloc.
class ReusingAllocator final : public tensorflow::Allocator {
 public:
  explicit ReusingAllocator(size_t limit) : limit_(limit) {}
  std::string Name() override { return "tfbn_reusing_cpu"; }

  void* AllocateRaw(size_t alignment, size_t bytes) override {
    const size_t size = RoundUp(bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        free_bytes_ -= size;
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, std::max(alignment, kAlignment), size) != 0) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = size;
    return p;
  }

  void DeallocateRaw(void* p) override {
    if (p == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = sizes_.find(p);
    if (it == sizes_.end()) return;  // not a block of this allocator: never ours to free
    const size_t size = it->second;
    if (free_bytes_ + size <= limit_) {
      free_[size].push_back(p);
      free_bytes_ += size;
      return;
    }
    sizes_.erase(it);
    std::free(p);
  }

 private:
  static size_t RoundUp(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

  const size_t limit_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // size -> freed blocks
  std::unordered_map<void*, size_t> sizes_;              // every block held: its size
  size_t free_bytes_ = 0;
};

// The process's cache, or nullptr where its limit is 0 (turned off).
ReusingAllocator* Reusing() {
  static ReusingAllocator* const allocator = [] {
    const size_t limit = CacheLimit();
    return limit > 0 ? new ReusingAllocator(limit) : nullptr;  // tensors may outlive exit
  }();
  return allocator;
}

// TensorFlow's plain CPU allocator (malloc, no cache of its own) is named "cpu"; oneDNN's
// is "mklcpu", the BFC one another name, and GPU memory never "cpu".
bool PlainCpuAllocator(tensorflow::OpKernelContext* ctx, int index) {
  return ctx->device()->GetAllocator(ctx->output_alloc_attr(index))->Name() == "cpu";
}

}  // namespace

absl::Status ForwardOrAllocateLarge(tensorflow::OpKernelContext* ctx,
                                    absl::Span<const int> candidates, int index,
                                    const tensorflow::TensorShape& shape,
                                    tensorflow::Tensor** out) {
  for (const int input : candidates)
    if (ctx->forward_input_to_output_with_shape(input, index, shape, out)) return absl::OkStatus();
  const tensorflow::DataType dtype = ctx->expected_output_dtype(index);
  const size_t bytes = static_cast<size_t>(shape.num_elements()) * tensorflow::DataTypeSize(dtype);
  ReusingAllocator* const reusing = Reusing();
  if (reusing == nullptr || bytes < kReuseMinBytes || !PlainCpuAllocator(ctx, index))
    return ctx->allocate_output(index, shape, out);
  tensorflow::Tensor tensor(reusing, dtype, shape);
  if (!tensor.IsInitialized())
    return absl::ResourceExhaustedError("tfbn: could not allocate " + std::to_string(bytes) +
                                        " bytes for output " + std::to_string(index));
  ctx->set_output(index, std::move(tensor));
  *out = ctx->mutable_output(index);
  return absl::OkStatus();
}

}  // namespace tfbn
