// How the CPU kernels cut their work: reduction blocks and elementwise pieces. The
// partition depends on the shape only (never on the thread count), which is what makes
// the statistics bitwise reproducible. Shared by the fused (batch_norm_cpu.cc) and the
// weighted (batch_norm_weighted.cc) kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/batch_norm.h"

namespace tfbn {
namespace partition {

// Reductions are split into at most kMaxBlocks blocks of about kBlockElements elements.
// With many channels fewer blocks keep the partials near kPartialBytes (at least
// kMinBlocks blocks remain for the threads).
constexpr int64_t kBlockElements = int64_t{1} << 16;
constexpr int64_t kMaxBlocks = 64;
constexpr int64_t kMinBlocks = 8;
constexpr int64_t kPartialBytes = int64_t{1} << 18;
// Elementwise passes are cut into pieces of about this many elements for the threads.
constexpr int64_t kPieceElements = int64_t{1} << 14;

// The number of reduction blocks for x's layout, where each block keeps
// partial_bytes_per_channel bytes of partials per channel. Channels-last blocks hold all
// channels of their rows; planar tasks are (block, channel) pairs, so there a block is
// cut per channel and channels add parallelism.
inline int64_t NumBlocks(const Layout& layout, int64_t partial_bytes_per_channel) {
  const int64_t work = layout.inner == 1 ? layout.size() : layout.per_channel();
  const int64_t wanted = (work + kBlockElements - 1) / kBlockElements;
  const int64_t by_partials =
      std::max(kMinBlocks,
               kPartialBytes / std::max<int64_t>(1, partial_bytes_per_channel * layout.channels));
  return std::clamp<int64_t>(wanted, 1, std::min({kMaxBlocks, by_partials, layout.per_channel()}));
}

// Block b of nb over [0, n): a split that depends on (n, nb) only.
inline int64_t BlockBegin(int64_t b, int64_t nb, int64_t n) {
  return static_cast<int64_t>((static_cast<__int128>(n) * b) / nb);
}

}  // namespace partition
}  // namespace tfbn
