// The kernel images embedded in the library at build time (cmake/nvrtc_compile.py writes
// the table; a build without CUDA kernels has none).
#pragma once

namespace tfbn {
namespace cuda {

struct KernelImage {
  const char* arch;  // "sm_80" (SASS) or "compute_90" (PTX)
  int sm;            // 80 for sm_80 / compute_80
  bool ptx;
  const unsigned char* begin;  // PTX: NUL-terminated text
  const unsigned char* end;
};

struct ImageTable {
  const KernelImage* images;
  int image_count;
  const char* const* names;    // name expressions, as the launchers ask for them
  const char* const* lowered;  // the same kernels' symbols in every image
  int kernel_count;
  int compiler_version;  // NVRTC's, e.g. 12050
  const char* architectures;
};

const ImageTable& EmbeddedImages();

}  // namespace cuda
}  // namespace tfbn
