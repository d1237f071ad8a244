// PLACEHOLDER until the split family's CUDA kernels land: every launcher refuses.
#include "core/batch_norm_cuda.h"
#include "core/cuda/kernel_names.h"

namespace tfbn {
namespace cuda {

size_t StatsWorkspaceBytes(DType, const Layout&, bool) { return 0; }
Result PartialMoments(DType, const Layout&, const void*, const float*, double*, void*, size_t,
                      Stream) {
  return kNotSupported;
}
Result MergeMoments(DType, int64_t, int64_t, const double*, void*, void*, void*, double*, Stream) {
  return kNotSupported;
}
size_t ApplyWorkspaceBytes(DType, const Layout&) { return 0; }
Result ApplyStatistics(DType, const Layout&, const void*, const void*, const void*, const void*,
                       const void*, const void*, float, void*, void*, size_t, Stream) {
  return kNotSupported;
}
size_t GradSumsWorkspaceBytes(DType, const Layout&) { return 0; }
Result GradSums(DType, const Layout&, const void*, const void*, const void*, const void*, double*,
                void*, size_t, Stream) {
  return kNotSupported;
}
size_t GradApplyWorkspaceBytes(DType, const Layout&) { return 0; }
Result ApplyGradWithSums(DType, const Layout&, const void*, const void*, const void*, const void*,
                         const void*, const void*, const double*, const double*, int64_t,
                         const double*, const float*, float, void*, void*, void*, void*, size_t,
                         Stream) {
  return kNotSupported;
}
void ForEachSplitKernelName(const NameSink&) {}

}  // namespace cuda
}  // namespace tfbn
