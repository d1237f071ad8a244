// Transparent huge pages for large outputs.
//
// A large output is often memory the process has never touched: glibc serves blocks above
// its mmap threshold (at most 32 MiB) with a fresh mmap per allocation, and that is what
// TensorFlow's CPU allocator hands out when oneDNN (and with it oneDNN's caching
// allocator) is off. The first write to each 4 KiB page then costs a page fault, which on
// a 25 MB output takes several times the kernel's own time. Where the system leaves
// transparent huge pages to the program ("madvise" mode), asking for them before the first
// write makes those faults 2 MiB at a time. NumPy does the same for its large arrays.
#pragma once

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tfbn {

inline void AdviseHugePages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Only whole huge pages inside [p, p + bytes): the advice must not reach memory that
  // other allocations own.
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end =
      (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace tfbn
