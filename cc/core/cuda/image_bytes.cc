// Inflating an embedded kernel image (see images.h). Built with zlib where the build found
// it (TFBN_CUDA_ZLIB=1); a build without zlib embeds its images as they are.
#include <string>
#include <vector>

#include "core/cuda/images.h"

#if TFBN_CUDA_ZLIB
#include <zlib.h>
#endif

namespace tfbn {
namespace cuda {

const unsigned char* ImageBytes(const KernelImage& image, std::vector<unsigned char>* storage,
                                std::string* error) {
  if (image.inflated_size == 0) return image.begin;
  const std::string what = std::string("inflating the ") + image.arch + " kernels: ";
#if TFBN_CUDA_ZLIB
  storage->resize(image.inflated_size);
  uLongf size = image.inflated_size;
  const int z =
      uncompress(storage->data(), &size, image.begin, static_cast<uLong>(image.end - image.begin));
  if (z == Z_OK && size == image.inflated_size) return storage->data();
  if (z != Z_OK)
    *error = what + "zlib error " + std::to_string(z) + " (" + zError(z) + ")";
  else
    *error =
        what + "got " + std::to_string(size) + " bytes, not " + std::to_string(image.inflated_size);
  storage->clear();
  storage->shrink_to_fit();
#else
  (void)storage;
  *error = what + "the image is compressed, but this build has no zlib";
#endif
  return nullptr;
}

}  // namespace cuda
}  // namespace tfbn
