// An empty image table, for the build tool that lists the kernel names (it links the
// launchers, which need a table, before the images exist).
#include "core/cuda/images.h"

namespace tfbn {
namespace cuda {

const ImageTable& EmbeddedImages() {
  static const ImageTable table{nullptr, 0, nullptr, nullptr, 0, 0, "", "none"};
  return table;
}

}  // namespace cuda
}  // namespace tfbn
