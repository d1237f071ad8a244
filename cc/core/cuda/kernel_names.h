// Every kernel instantiation the launchers may ask for, by name expression. The build runs
// print_kernel_names (which calls ForEachKernelName) and has NVRTC compile exactly these;
// a launcher that names a kernel missing here fails with kNoBinary and says which.
#pragma once

#include <functional>
#include <string>

namespace tfbn {
namespace cuda {

using NameSink = std::function<void(const std::string&)>;

void ForEachFusedKernelName(const NameSink& sink);     // batch_norm_cuda.cc
void ForEachSplitKernelName(const NameSink& sink);     // batch_norm_cuda_split.cc
void ForEachEpilogueKernelName(const NameSink& sink);  // batch_norm_cuda_epilogue.cc

inline void ForEachKernelName(const NameSink& sink) {
  ForEachFusedKernelName(sink);
  ForEachSplitKernelName(sink);
  ForEachEpilogueKernelName(sink);
}

}  // namespace cuda
}  // namespace tfbn
