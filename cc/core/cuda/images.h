// The kernel images embedded in the library at build time (cmake/nvrtc_compile.py writes
// the table; a build without CUDA kernels has none).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace tfbn {
namespace cuda {

struct KernelImage {
  const char* arch;  // "sm_80" (SASS) or "compute_90" (PTX)
  int sm;            // 80 for sm_80 / compute_80
  bool ptx;
  const unsigned char* begin;  // PTX: NUL-terminated text
  const unsigned char* end;
  // 0: stored as is; else zlib-compressed, and this many bytes once inflated (a build with
  // zlib compresses its images to a fifth, and inflates only the device's, at its first use).
  std::size_t inflated_size;
};

struct ImageTable {
  const KernelImage* images;
  int image_count;
  const char* const* names;    // name expressions, as the launchers ask for them
  const char* const* lowered;  // the same kernels' symbols in every image
  int kernel_count;
  int compiler_version;  // NVRTC's, e.g. 12050
  const char* architectures;
  const char* compression;  // "zlib" or "none"
};

const ImageTable& EmbeddedImages();

// The image's bytes, ready for cuModuleLoadData: the embedded ones, or the inflated ones
// in *storage. nullptr, with *error set, where a compressed image cannot be inflated.
const unsigned char* ImageBytes(const KernelImage& image, std::vector<unsigned char>* storage,
                                std::string* error);

}  // namespace cuda
}  // namespace tfbn
